"""StorageDevice: reads and writes buffers at byte offsets of files, as queue work.

Each storage queue is its own axis, so a read or a write carries a frontier like any
other work and whatever waits on it inherits the storage axis. CPU memory (NumPy
arrays, CPU tensors, ``bytearray``, any writable buffer) moves with positional I/O
(``os.pwrite`` / ``os.preadv``) straight from and into the caller's memory, in the
device's worker threads. CUDA tensors go through KvikIO's ``CuFile`` (GPUDirect Storage
where the platform has it) when the CUDA driver is loadable and ``kvikio`` is
installed (the ``gds`` extra), or bounce through a host buffer
otherwise. torch and kvikio are imported only when such a tensor shows up.

A transfer can carry a checksum: a write with ``checksum=True`` returns the CRC32C of
the bytes it wrote, and a read given ``checksum=`` that value verifies the bytes it
read, raising :class:`ChecksumError` when they differ. The CRC runs in the worker
thread on the memory the bytes pass through anyway (the caller's buffer, or the host
bounce buffer), piece by piece right after each piece moves, so it reads memory that
is still in the CPU's cache and costs no copy. It is the hardware CRC32C of the
``crc32c`` package (SSE 4.2 / ARMv8 instructions, several GB/s).
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._base import DeviceStatistics
from ._threaded import ThreadPoolDevice

if TYPE_CHECKING:
    from .._queue import DeviceQueue, Submission
    from .._runtime import Runtime
    from .._semaphore import TimelineSemaphore

__all__ = (
    "ChecksumError",
    "ShortReadError",
    "ShortWriteError",
    "StorageDevice",
    "StorageError",
    "StorageReadError",
    "StorageStatistics",
    "StorageWriteError",
    "kvikio_available",
)

SemaphoreValue = tuple["TimelineSemaphore", int]

_CHECKSUM_PIECE = 1 << 20
"""Bytes moved between CRC updates in a checksummed transfer: small enough to be cached."""


class StorageError(Exception):
    """A read or write moved fewer bytes than asked; the numbers say where and how many.

    Attributes:
        path: the file.
        offset: where in the file the transfer started.
        expected: bytes asked for.
        actual: bytes moved before the transfer stopped.
    """

    operation = "transfer"

    def __init__(
        self, path: str | os.PathLike[str], offset: int, expected: int, actual: int, reason: str
    ) -> None:
        super().__init__(
            f"{self.operation} of {expected:,} bytes at offset {offset:,} of {os.fspath(path)!r} "
            f"stopped after {actual:,} bytes: {reason}"
        )
        self.path = os.fspath(path)
        self.offset = offset
        self.expected = expected
        self.actual = actual


class StorageReadError(StorageError):
    """A read failed (the operating system's error is the ``__cause__``)."""

    operation = "read"


class ShortReadError(StorageReadError):
    """A read reached the end of the file before it had every byte it asked for."""


class ChecksumError(StorageReadError):
    """A read's bytes do not have the CRC32C they were written with: the file changed.

    Attributes:
        expected_checksum: the CRC32C the bytes were written with.
        actual_checksum: the CRC32C of the bytes read.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        offset: int,
        nbytes: int,
        expected_checksum: int,
        actual_checksum: int,
    ) -> None:
        reason = f"CRC32C {actual_checksum:#010x}, written as {expected_checksum:#010x}"
        super().__init__(path, offset, nbytes, nbytes, reason)
        self.args = (
            f"{nbytes:,} bytes read at offset {offset:,} of {os.fspath(path)!r} differ from "
            f"what was written there: {reason}",
        )
        self.expected_checksum = expected_checksum
        self.actual_checksum = actual_checksum


class StorageWriteError(StorageError):
    """A write failed (the operating system's error is the ``__cause__``)."""

    operation = "write"


class ShortWriteError(StorageWriteError):
    """A write was accepted only in part and the file took no more bytes."""


@dataclass(frozen=True)
class StorageStatistics(DeviceStatistics):
    """A snapshot of a storage device: its slots and the bytes it moved."""

    reads: int
    writes: int
    bytes_read: int
    bytes_written: int
    open_files: int
    kvikio: bool


def kvikio_available() -> bool:
    """Whether the CUDA driver (``libcuda.so.1``) loads and ``kvikio`` is importable."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return importlib.util.find_spec("kvikio") is not None


def _torch_tensor(obj: object) -> Any:
    """``obj`` if it is a torch tensor (without importing torch), else None."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj
    return None


def _tensor_bytes(tensor: Any) -> Any:
    """A flat ``uint8`` view of a contiguous tensor's memory (no copy)."""
    import torch

    if not tensor.is_contiguous():
        raise ValueError(
            f"storage I/O needs contiguous memory; got a tensor of shape {tuple(tensor.shape)} "
            f"with strides {tensor.stride()} (pass tensor.contiguous())"
        )
    return tensor.detach().reshape(-1).view(torch.uint8)


def _host_view(obj: object, *, writable: bool) -> memoryview:
    """A flat byte view sharing ``obj``'s host memory (a CPU tensor or any buffer)."""
    tensor = _torch_tensor(obj)
    view = memoryview(_tensor_bytes(tensor).numpy()) if tensor is not None else memoryview(obj)  # type: ignore[arg-type]
    if not view.c_contiguous:
        raise ValueError("storage I/O needs C-contiguous memory")
    if writable and view.readonly:
        raise ValueError(f"cannot read into a read-only buffer ({type(obj).__name__})")
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


class StorageDevice(ThreadPoolDevice):
    """A directory on a storage device; its queues read and write buffers at file offsets.

    ``write``/``read``/``sync`` submit the transfer to a queue of this device and
    return the :class:`~asyncfront.Submission` at once; awaiting it gives the bytes
    moved. A transfer that stops short raises a :class:`StorageError` subclass with the
    path, offset and byte counts; the queue goes on with its next submission and the
    caller's buffer stays the caller's (nothing is freed).

    Args:
        path: the directory that holds the files (created if missing). Relative file
            names resolve under it; absolute paths are used as they are.
        name: the device name (and the prefix of its queues' axes).
        workers: transfers that may run at once (threads).
        use_kvikio: KvikIO for CUDA tensors: None picks it when the CUDA driver and
            kvikio are present, True insists (and raises here when they are not),
            False never uses it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        name: str = "nvme",
        workers: int = 2,
        use_kvikio: bool | None = None,
    ) -> None:
        super().__init__(name, workers)
        self.kind = "storage"
        self.path = Path(path)
        if use_kvikio is None:
            use_kvikio = kvikio_available()
        elif use_kvikio and not kvikio_available():
            from .._install import install_hint

            raise RuntimeError(
                f"StorageDevice {name!r}: use_kvikio=True needs the CUDA driver (libcuda.so.1) "
                f"and kvikio; on a CUDA machine, install kvikio with {install_hint('gds')}"
            )
        self.kvikio = use_kvikio
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}  # path -> read-write descriptor
        self._read_fds: dict[str, int] = {}  # path -> read-only descriptor
        self._cufiles: dict[str, Any] = {}
        self._reads = self._writes = self._bytes_read = self._bytes_written = 0

    # -- submissions -----------------------------------------------------------------

    def write(
        self,
        queue: DeviceQueue,
        data: object,
        file: str | os.PathLike[str],
        offset: int = 0,
        *,
        waits: Iterable[SemaphoreValue] = (),
        signals: Iterable[SemaphoreValue] = (),
        name: str | None = None,
        checksum: bool = False,
    ) -> Submission:
        """Queue a write of all of ``data`` (a tensor or buffer) at ``offset`` of ``file``.

        ``data`` must stay unchanged until the write has run: the device reads it then,
        in place. The submission's result is the number of bytes written, or with
        ``checksum=True`` the CRC32C of those bytes (pass it to :meth:`read` to verify).
        """
        self._check(queue, offset)
        return queue.submit(
            self._write_sync,
            data,
            file,
            offset,
            checksum,
            waits=waits,
            signals=signals,
            name=name or "write",
        )

    def read(
        self,
        queue: DeviceQueue,
        out: object,
        file: str | os.PathLike[str],
        offset: int = 0,
        *,
        waits: Iterable[SemaphoreValue] = (),
        signals: Iterable[SemaphoreValue] = (),
        name: str | None = None,
        checksum: int | None = None,
    ) -> Submission:
        """Queue a read filling all of ``out`` (a tensor or writable buffer) from ``offset``.

        The submission's result is the number of bytes read. With ``checksum`` (the
        CRC32C a ``write(..., checksum=True)`` returned) the bytes read are verified,
        and a mismatch raises :class:`ChecksumError` (``out`` then holds the bytes read).
        """
        self._check(queue, offset)
        if checksum is not None and (
            isinstance(checksum, bool) or not isinstance(checksum, int) or checksum >> 32
        ):
            raise ValueError(f"checksum must be a CRC32C (an int in [0, 2**32)), got {checksum!r}")
        return queue.submit(
            self._read_sync,
            out,
            file,
            offset,
            checksum,
            waits=waits,
            signals=signals,
            name=name or "read",
        )

    def sync(
        self,
        queue: DeviceQueue,
        file: str | os.PathLike[str],
        *,
        waits: Iterable[SemaphoreValue] = (),
        signals: Iterable[SemaphoreValue] = (),
        name: str | None = None,
    ) -> Submission:
        """Queue an ``fsync`` of ``file``: what was written reaches the device."""
        self._check(queue, 0)
        return queue.submit(
            self._sync_sync, file, waits=waits, signals=signals, name=name or "sync"
        )

    def _check(self, queue: DeviceQueue, offset: int) -> None:
        if queue.device is not self:
            raise ValueError(
                f"queue {queue.name!r} belongs to device {queue.device.name!r}, not {self.name!r}"
            )
        if offset < 0:
            raise ValueError(f"file offset must be >= 0, got {offset}")

    # -- what can move where ---------------------------------------------------------

    def can_access(self, obj: object) -> bool:
        """Whether transfers move ``obj``'s memory directly (no bounce through the host).

        True for host memory, and for CUDA tensors when KvikIO is in use.
        """
        tensor = _torch_tensor(obj)
        if tensor is None or tensor.device.type == "cpu":
            return True
        return self.kvikio and tensor.device.type == "cuda"

    def resolve(self, file: str | os.PathLike[str]) -> Path:
        """The path of ``file``: under the device's directory unless absolute."""
        path = Path(file)
        return path if path.is_absolute() else self.path / path

    # -- work (runs in the device's threads) -----------------------------------------

    def _write_sync(
        self, data: object, file: str | os.PathLike[str], offset: int, checksum: bool = False
    ) -> int:
        done, crc = self._transfer_sync(True, data, file, offset, checksum)
        return crc if crc is not None else done

    def _read_sync(
        self,
        out: object,
        file: str | os.PathLike[str],
        offset: int,
        checksum: int | None = None,
    ) -> int:
        done, crc = self._transfer_sync(False, out, file, offset, checksum is not None)
        if checksum is not None and crc != checksum:
            assert crc is not None
            raise ChecksumError(self.resolve(file), offset, done, checksum, crc)
        return done

    def _transfer_sync(
        self,
        write: bool,
        buffer: object,
        file: str | os.PathLike[str],
        offset: int,
        checksum: bool = False,
    ) -> tuple[int, int | None]:
        """Write all of ``buffer`` to, or fill it from, ``file`` at ``offset``.

        Returns the bytes moved and, with ``checksum``, their CRC32C (else None).
        """
        path = self.resolve(file)
        tensor = _torch_tensor(buffer)
        if tensor is not None and tensor.device.type != "cpu":
            done, crc = self._device_transfer(write, tensor, path, offset, checksum)
        else:
            view = _host_view(buffer, writable=not write)
            try:
                fd = self._fd(path, writable=write)
            except OSError as exc:
                error = StorageWriteError if write else StorageReadError
                raise error(path, offset, len(view), 0, _reason(exc)) from exc
            done, crc = self._move_all(write, fd, view, path, offset, checksum)
        with self._lock:
            if write:
                self._writes += 1
                self._bytes_written += done
            else:
                self._reads += 1
                self._bytes_read += done
        return done, crc

    def _sync_sync(self, file: str | os.PathLike[str]) -> None:
        os.fsync(self._fd(self.resolve(file), writable=True))

    def _fd(self, path: Path, *, writable: bool) -> int:
        """A cached descriptor of ``path``: read-write (created) for writers.

        Readers use the read-write descriptor when there is one. Descriptors stay open
        until the device closes, so a thread never loses one while another uses it.
        """
        key = os.fspath(path)
        with self._lock:
            fd = self._fds.get(key)
            if fd is None and not writable:
                fd = self._read_fds.get(key)
            if fd is None:
                if writable:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    fd = self._fds[key] = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
                else:
                    fd = self._read_fds[key] = os.open(key, os.O_RDONLY)
            return fd

    @staticmethod
    def _move_all(
        write: bool, fd: int, view: memoryview, path: Path, offset: int, checksum: bool = False
    ) -> tuple[int, int | None]:
        """pwrite or preadv until the whole view moved; short moves raise.

        With ``checksum``, the view moves in pieces and each piece's CRC32C is folded in
        right after it moved, while its bytes are still cached; returns the bytes moved
        and the CRC (None without ``checksum``).
        """
        expected = len(view)
        crc = 0
        piece = _CHECKSUM_PIECE if checksum else expected
        done = 0
        while done < expected:
            end = min(done + piece, expected)
            try:
                if write:
                    n = os.pwrite(fd, view[done:end], offset + done)
                else:
                    n = os.preadv(fd, [view[done:end]], offset + done)
            except OSError as exc:
                error = StorageWriteError if write else StorageReadError
                raise error(path, offset, expected, done, _reason(exc)) from exc
            if n == 0:
                if write:
                    raise ShortWriteError(
                        path, offset, expected, done, "the file took no more bytes"
                    )
                raise ShortReadError(path, offset, expected, done, "end of file")
            if checksum:
                crc = _crc32c(view[done : done + n], crc)
            done += n
        return done, crc if checksum else None

    def _device_transfer(
        self, write: bool, tensor: Any, path: Path, offset: int, checksum: bool = False
    ) -> tuple[int, int | None]:
        """Move a device (CUDA) tensor: KvikIO when in use, else through a host buffer.

        Through a host buffer, the checksum is taken there; KvikIO moves the bytes
        without host memory, so a checksum costs a copy to the host.
        """
        data = _tensor_bytes(tensor)
        expected = data.numel()
        error = StorageWriteError if write else StorageReadError
        if not self.kvikio:
            import torch

            host = torch.empty(expected, dtype=torch.uint8, pin_memory=True)
            if write:
                host.copy_(data)
            done, crc = self._move_all(
                write, self._fd(path, writable=write), _host_view(host, writable=not write), path,
                offset, checksum,
            )  # fmt: skip
            if not write:
                data.copy_(host)
            return done, crc
        handle = self._cufile(path)
        # The future's get() blocks this worker thread; ``data`` stays referenced (alive)
        # until it returns, as KvikIO requires.
        try:
            future = (
                handle.pwrite(data, expected, offset)
                if write
                else handle.pread(data, expected, offset)
            )
            done = int(future.get())
        except Exception as exc:
            raise error(path, offset, expected, 0, f"{type(exc).__name__}: {exc}") from exc
        if done != expected:
            short = ShortWriteError if write else ShortReadError
            raise short(path, offset, expected, done, "KvikIO moved fewer bytes")
        if not checksum:
            return done, None
        return done, _crc32c(_host_view(data.cpu(), writable=False))

    def _cufile(self, path: Path) -> Any:
        key = os.fspath(path)
        with self._lock:
            handle = self._cufiles.get(key)
            if handle is None:
                kvikio = importlib.import_module("kvikio")
                path.parent.mkdir(parents=True, exist_ok=True)
                os.close(os.open(key, os.O_RDWR | os.O_CREAT, 0o644))  # "r+" needs the file
                handle = self._cufiles[key] = kvikio.CuFile(key, "r+")
            return handle

    # -- lifecycle and state ---------------------------------------------------------

    async def start(self, runtime: Runtime) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        await super().start(runtime)

    async def aclose(self) -> None:
        await super().aclose()  # running transfers finish first
        with self._lock:
            fds = [*self._fds.values(), *self._read_fds.values()]
            self._fds, self._read_fds = {}, {}
            cufiles, self._cufiles = self._cufiles, {}
        for fd in fds:
            os.close(fd)
        for handle in cufiles.values():
            handle.close()

    def statistics(self) -> StorageStatistics:
        """A frozen snapshot: slots, transfers and bytes moved, open files."""
        base = super().statistics()
        with self._lock:
            return StorageStatistics(
                name=base.name,
                kind=base.kind,
                concurrency=base.concurrency,
                busy_slots=base.busy_slots,
                waiting_queues=base.waiting_queues,
                executed=base.executed,
                reads=self._reads,
                writes=self._writes,
                bytes_read=self._bytes_read,
                bytes_written=self._bytes_written,
                open_files=len(self._fds) + len(self._read_fds) + len(self._cufiles),
                kvikio=self.kvikio,
            )

    def __repr__(self) -> str:
        return (
            f"<StorageDevice {self.name!r} path={os.fspath(self.path)!r} "
            f"io={'kvikio' if self.kvikio else 'positional'} "
            f"busy={self.concurrency - self._arbiter.free}/{self.concurrency}>"
        )


def _crc32c(data: memoryview, value: int = 0) -> int:
    """The CRC32C of ``data`` continuing from ``value`` (hardware instructions; GIL released)."""
    from crc32c import crc32c as hardware_crc32c

    return hardware_crc32c(data, value)


def _reason(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else type(exc).__name__
    return f"{code}: {exc.strerror or exc}"
