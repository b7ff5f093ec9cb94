"""StorageDevice: positional reads and writes at file offsets as queue work on their own axis."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest

import asyncfront as af
from asyncfront.devices import (
    ChecksumError,
    CpuDevice,
    ShortReadError,
    StorageDevice,
    StorageError,
    StorageReadError,
    StorageWriteError,
    kvikio_available,
)

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")
crc32c = pytest.importorskip("crc32c")


def _random(shape: tuple[int, ...], dtype: Any, seed: int = 0) -> Any:
    """Random bits of any dtype: raw bytes reinterpreted, so every bit pattern occurs."""
    gen = torch.Generator().manual_seed(seed)
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


async def test_tensors_round_trip_bit_for_bit_at_offsets(tmp_path: Path) -> None:
    """Tensors of several dtypes written at offsets read back with identical bytes."""
    tensors = [
        _random((64, 33), torch.float16, 1),
        _random((17,), torch.bfloat16, 2),
        _random((5, 7, 3), torch.float32, 3),
        _random((129,), torch.int64, 4),
        _random((31,), torch.uint8, 5),
    ]
    async with af.open_runtime([StorageDevice(tmp_path, name="nvme")]) as rt:
        storage = rt.device("nvme")
        assert isinstance(storage, StorageDevice)
        q = storage.queue(name="nvme.q")
        offsets, offset = [], 4096
        for t in tensors:
            offsets.append(offset)
            n = await storage.write(q, t, "blob.bin", offset)
            assert n == t.numel() * t.element_size()
            offset += n + 100  # unaligned gaps on purpose
        for t, off in zip(tensors, offsets, strict=True):
            out = torch.empty_like(t)
            await storage.read(q, out, "blob.bin", off)
            assert torch.equal(out.view(torch.uint8), t.view(torch.uint8))


async def test_reads_fill_the_callers_memory_in_place(tmp_path: Path) -> None:
    """A read lands in the given tensor, NumPy array or bytearray, which stays the same object."""
    payload = bytes(range(256)) * 16
    (tmp_path / "data.bin").write_bytes(payload)
    async with af.open_runtime([StorageDevice(tmp_path)]) as rt:
        storage = rt.device("nvme")
        assert isinstance(storage, StorageDevice)
        q = storage.queue()
        tensor = torch.zeros(1024, dtype=torch.int32)
        pointer = tensor.data_ptr()
        array = np.zeros(512, dtype=np.uint8)
        buffer = bytearray(100)
        await storage.read(q, tensor, "data.bin")
        await storage.read(q, array, "data.bin", 512)
        await storage.read(q, buffer, "data.bin", 1000)
        assert tensor.data_ptr() == pointer
        assert bytes(tensor.numpy().tobytes()) == payload
        assert array.tobytes() == payload[512:1024]
        assert bytes(buffer) == payload[1000:1100]


async def test_short_read_raises_with_the_numbers_and_the_queue_goes_on(tmp_path: Path) -> None:
    """Reading past the end raises ShortReadError naming path, offset, expected and actual."""
    (tmp_path / "small.bin").write_bytes(b"x" * 100)
    async with af.open_runtime([StorageDevice(tmp_path)]) as rt:
        storage = rt.device("nvme")
        assert isinstance(storage, StorageDevice)
        q = storage.queue()
        sem = af.TimelineSemaphore(name="after")
        out = bytearray(64)
        short = storage.read(q, out, "small.bin", 60, signals=[(sem, 1)])
        ok = storage.read(q, bytearray(10), "small.bin", 0)
        with pytest.raises(ShortReadError) as info:
            await short
        err = info.value
        assert isinstance(err, StorageReadError) and isinstance(err, StorageError)
        assert (err.offset, err.expected, err.actual) == (60, 64, 40)
        assert err.path == str(tmp_path / "small.bin")
        assert "64 bytes at offset 60" in str(err) and "after 40 bytes" in str(err)
        assert sem.failure is err
        assert await ok == 10


async def test_failed_write_raises_storage_write_error(tmp_path: Path) -> None:
    """A write the device refuses (ENOSPC) raises StorageWriteError with the OS error as cause."""
    (tmp_path / "full.bin").symlink_to("/dev/full")
    async with af.open_runtime([StorageDevice(tmp_path)]) as rt:
        storage = rt.device("nvme")
        assert isinstance(storage, StorageDevice)
        q = storage.queue()
        data = torch.arange(1000, dtype=torch.float32)
        with pytest.raises(StorageWriteError) as info:
            await storage.write(q, data, "full.bin", 0)
        assert info.value.expected == 4000 and info.value.actual == 0
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.__cause__.errno == errno.ENOSPC
        assert "ENOSPC" in str(info.value)
        assert torch.equal(data, torch.arange(1000, dtype=torch.float32))  # untouched


async def test_missing_file_read_raises_storage_read_error(tmp_path: Path) -> None:
    """Reading a file that does not exist raises StorageReadError (no bytes moved)."""
    async with af.open_runtime([StorageDevice(tmp_path)]) as rt:
        storage = rt.device("nvme")
        assert isinstance(storage, StorageDevice)
        with pytest.raises(StorageReadError) as info:
            await storage.read(storage.queue(), bytearray(8), "nope.bin")
        assert info.value.actual == 0 and "ENOENT" in str(info.value)


async def test_storage_queue_is_its_own_axis_in_frontiers(tmp_path: Path) -> None:
    """Work waiting on a read inherits the storage queue's axis and the writer's history."""
    devices = [CpuDevice("cpu"), StorageDevice(tmp_path, name="nvme")]
    async with af.open_runtime(devices) as rt:
        storage = rt.device("nvme")
        assert isinstance(storage, StorageDevice)
        compute, nvme = rt.queue("cpu", name="compute"), storage.queue(name="nvme.io")
        produce = rt.queue("cpu", name="produce")
        produced, written, loaded = (af.TimelineSemaphore(name=n) for n in ("p", "w", "l"))
        src = torch.zeros(256, dtype=torch.float32)
        dst = torch.empty(256, dtype=torch.float32)
        # consumers first: submitting never waits for the producers
        consume = compute.submit(lambda: float(dst.sum()), waits=[(loaded, 1)])
        storage.write(nvme, src, "x.bin", waits=[(produced, 1)], signals=[(written, 1)])
        storage.read(nvme, dst, "x.bin", waits=[(written, 1)], signals=[(loaded, 1)])
        produce.submit(lambda: src.fill_(2.0), signals=[(produced, 1)])
        assert await consume == 512.0
        assert consume.frontier is not None
        assert consume.frontier.get(nvme.axis) == 2
        assert consume.frontier.get(produce.axis) == 1
        assert consume.frontier.get(compute.axis) == 1


async def test_two_storage_queues_transfer_at_once(tmp_path: Path) -> None:
    """With two workers, transfers on two storage queues overlap (both are inside at once)."""
    inside = threading.Barrier(2, timeout=10)

    class Gated(StorageDevice):
        def _write_sync(
            self, data: object, file: str | os.PathLike[str], offset: int, checksum: bool = False
        ) -> int:
            inside.wait()  # returns only once the other transfer is running too
            return super()._write_sync(data, file, offset, checksum)

    async with af.open_runtime([Gated(tmp_path, workers=2)]) as rt:
        storage = rt.device("nvme")
        assert isinstance(storage, StorageDevice)
        a, b = storage.queue(name="a"), storage.queue(name="b")
        done = await asyncio.gather(
            storage.write(a, b"a" * 10, "a.bin"), storage.write(b, b"b" * 10, "b.bin")
        )
        assert done == [10, 10]
        assert not inside.broken


async def test_sync_and_statistics(tmp_path: Path) -> None:
    """sync() fsyncs a written file; statistics count transfers and bytes."""
    async with af.open_runtime([StorageDevice(tmp_path)]) as rt:
        storage = rt.device("nvme")
        assert isinstance(storage, StorageDevice)
        q = storage.queue()
        await storage.write(q, b"abc" * 100, "s.bin", 10)
        await storage.sync(q, "s.bin")
        await storage.read(q, bytearray(300), "s.bin", 10)
        stats = storage.statistics()
        assert (stats.writes, stats.reads) == (1, 1)
        assert (stats.bytes_written, stats.bytes_read) == (300, 300)
        assert stats.kind == "storage" and stats.open_files == 1 and not stats.kvikio
        assert "io=positional" in repr(storage)
    assert (tmp_path / "s.bin").read_bytes()[10:] == b"abc" * 100


async def test_bad_arguments_are_rejected_at_submission(tmp_path: Path) -> None:
    """A queue of another device, a negative offset or read-only or strided memory is refused."""
    async with af.open_runtime([StorageDevice(tmp_path), CpuDevice("cpu")]) as rt:
        storage = rt.device("nvme")
        assert isinstance(storage, StorageDevice)
        with pytest.raises(ValueError, match="belongs to device 'cpu'"):
            storage.write(rt.queue("cpu"), b"x", "f.bin")
        q = storage.queue()
        with pytest.raises(ValueError, match="offset must be >= 0"):
            storage.read(q, bytearray(1), "f.bin", -1)
        await storage.write(q, b"xyz", "f.bin")
        with pytest.raises(ValueError, match="read-only"):
            await storage.read(q, b"abc", "f.bin")
        with pytest.raises(ValueError, match="contiguous"):
            await storage.read(q, torch.zeros(4, 4).t(), "f.bin")


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("nbytes", [0, 1000, 3 * (1 << 20) + 5], ids=["empty", "small", "pieces"])
async def test_checksummed_transfers_return_and_verify_the_crc32c(
    tmp_path: Path, nbytes: int
) -> None:
    """write(checksum=True) returns the bytes' CRC32C; read(checksum=) verifies them."""
    data = _random((nbytes,), torch.uint8, seed=5)
    expected = crc32c.crc32c(data.numpy().tobytes())
    async with af.open_runtime([StorageDevice(tmp_path)]) as rt:
        storage = rt.device("nvme")
        assert isinstance(storage, StorageDevice)
        q = storage.queue()
        assert await storage.write(q, data, "c.bin", 4096, checksum=True) == expected
        out = torch.empty_like(data)
        assert await storage.read(q, out, "c.bin", 4096, checksum=expected) == nbytes
        assert torch.equal(out, data)
        assert storage.statistics().bytes_read == storage.statistics().bytes_written == nbytes


async def test_a_checksum_mismatch_raises_with_the_numbers_and_the_queue_goes_on(
    tmp_path: Path,
) -> None:
    """Changed bytes fail the read with ChecksumError (both CRCs, path, offset); no hang."""
    data = bytes(range(256)) * 16
    async with af.open_runtime([StorageDevice(tmp_path)]) as rt:
        storage = rt.device("nvme")
        assert isinstance(storage, StorageDevice)
        q = storage.queue()
        crc = await storage.write(q, data, "c.bin", 8192, checksum=True)
        _overwrite(tmp_path / "c.bin", 8192 + 100, b"\xff")
        sem = af.TimelineSemaphore(name="read")
        bad = storage.read(q, bytearray(len(data)), "c.bin", 8192, checksum=crc, signals=[(sem, 1)])
        ok = storage.read(q, bytearray(10), "c.bin", 8192)
        with pytest.raises(ChecksumError) as info:
            await bad
        err = info.value
        assert isinstance(err, StorageReadError)
        assert (err.path, err.offset, err.expected, err.actual) == (
            str(tmp_path / "c.bin"),
            8192,
            4096,
            4096,
        )
        assert err.expected_checksum == crc and err.actual_checksum != crc
        assert f"written as {crc:#010x}" in str(err) and "offset 8,192" in str(err)
        assert sem.failure is err
        assert await ok == 10
        with pytest.raises(ValueError, match="checksum must be a CRC32C"):
            storage.read(q, bytearray(1), "c.bin", checksum=1 << 32)


def test_kvikio_is_chosen_only_where_the_driver_and_package_exist(tmp_path: Path) -> None:
    """use_kvikio=None follows availability; True without driver or kvikio raises clearly."""
    assert StorageDevice(tmp_path).kvikio is kvikio_available()
    assert StorageDevice(tmp_path, use_kvikio=False).kvikio is False
    if not kvikio_available():
        with pytest.raises(RuntimeError, match=r"install -e '\.\[gds\]'"):
            StorageDevice(tmp_path, use_kvikio=True)
    cpu_tensor = torch.zeros(3)
    assert StorageDevice(tmp_path, use_kvikio=False).can_access(cpu_tensor)


@pytest.mark.gpu
async def test_cuda_tensors_round_trip_through_kvikio(tmp_path: Path) -> None:
    """A CUDA tensor written and read back through KvikIO CuFile is bit-identical."""
    if not torch.cuda.is_available() or not kvikio_available():
        pytest.skip("needs a CUDA device and kvikio")
    async with af.open_runtime([StorageDevice(tmp_path, use_kvikio=True)]) as rt:
        storage = rt.device("nvme")
        assert isinstance(storage, StorageDevice)
        q = storage.queue()
        src = _random((1 << 20,), torch.float16).cuda()
        dst = torch.empty_like(src)
        assert storage.can_access(src)
        crc = await storage.write(q, src, "gpu.bin", 4096, checksum=True)
        assert crc == crc32c.crc32c(src.cpu().view(torch.uint8).numpy().tobytes())
        await storage.read(q, dst, "gpu.bin", 4096, checksum=crc)
        assert torch.equal(src.view(torch.uint8), dst.view(torch.uint8))


@pytest.mark.gpu
async def test_cuda_tensors_bounce_through_host_without_kvikio(tmp_path: Path) -> None:
    """Without KvikIO a CUDA tensor moves through a pinned host buffer, bit-identical."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    async with af.open_runtime([StorageDevice(tmp_path, use_kvikio=False)]) as rt:
        storage = rt.device("nvme")
        assert isinstance(storage, StorageDevice)
        q = storage.queue()
        src = _random((4096,), torch.bfloat16).cuda()
        dst = torch.empty_like(src)
        assert not storage.can_access(src)
        crc = await storage.write(q, src, "gpu.bin", checksum=True)
        assert crc == crc32c.crc32c(src.cpu().view(torch.uint8).numpy().tobytes())
        await storage.read(q, dst, "gpu.bin", checksum=crc)
        assert torch.equal(src.view(torch.uint8), dst.view(torch.uint8))
        with pytest.raises(ChecksumError):
            await storage.read(q, dst, "gpu.bin", checksum=crc ^ 1)
