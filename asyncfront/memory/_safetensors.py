"""The safetensors header: parsed and checked whole before any byte of a file is trusted.

A safetensors file is an 8-byte little-endian header length, a JSON header, then the
data section. The header names every tensor's dtype, shape and ``data_offsets``
(begin and end, relative to the data section). Everything the residency later does
with a file (the size it charges to a budget, the views it makes of the loaded bytes)
follows from the header, so :func:`parse_safetensors_header` checks all of it against
the data section's real size first and raises one error class,
:class:`WeightsFormatError`, naming the file and the entry at fault.

The parser works on bytes and a size, not on a file, so the same checks serve a single
file (:func:`read_safetensors_layout`) and the shards of a sharded checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = (
    "MAX_HEADER_BYTES",
    "SAFETENSORS_DTYPES",
    "TensorLayout",
    "WeightsFormatError",
    "parse_safetensors_header",
    "read_safetensors_layout",
)

MAX_HEADER_BYTES = 100_000_000
"""The largest header the safetensors format allows (the reference library's limit)."""

SAFETENSORS_DTYPES: Mapping[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
"""Safetensors dtype code -> (torch dtype name, bytes per element), for the codes read."""


@dataclass(frozen=True)
class TensorLayout:
    """Where one tensor of a weights set lies in its bytes (offset from the data start)."""

    name: str
    dtype: str  # a torch dtype name: "float16", "bfloat16", ...
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class WeightsFormatError(ValueError):
    """A weights file's header is malformed; the message names the file and the entry.

    Attributes:
        path: the file (or whatever the header came from).
        entry: the header entry at fault (a tensor name, ``"__metadata__"``), or None
            when the fault is in the file's framing or the header as a whole.
        problem: what is wrong, with the numbers.
    """

    def __init__(
        self, path: str | os.PathLike[str], problem: str, entry: str | None = None
    ) -> None:
        where = f"{os.fspath(path)!r}" if entry is None else f"{os.fspath(path)!r}, entry {entry!r}"
        super().__init__(f"safetensors header of {where}: {problem}")
        self.path = os.fspath(path)
        self.entry = entry
        self.problem = problem


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _Duplicate(key)
        seen[key] = value
    return seen


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def parse_safetensors_header(
    header: bytes, data_size: int, *, source: str | os.PathLike[str] = "<header>"
) -> tuple[TensorLayout, ...]:
    """Every tensor's layout from a safetensors JSON header, checked against its data.

    Checks that the header is a JSON object of entries (``__metadata__``, a string to
    string map, aside); that every entry has a known ``dtype``, a ``shape`` of
    non-negative integers and ``data_offsets`` of two integers ``begin <= end`` within
    the ``data_size`` bytes of the data section; that ``end - begin`` is the shape's
    element count times the dtype's size; and that no two tensors' bytes overlap.

    Args:
        header: the JSON header's bytes (what follows the 8-byte length).
        data_size: bytes of the data section (the file's size less 8 and the header).
        source: the file the header came from, for the error message.

    Returns:
        The layouts in data order (by offset).

    Raises:
        WeightsFormatError: anything above does not hold; the message names ``source``
            and the entry.
    """
    try:
        parsed = json.loads(header.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as dup:
        raise WeightsFormatError(source, "the entry appears twice", dup.key) from None
    except UnicodeDecodeError as exc:
        raise WeightsFormatError(source, f"the header is not UTF-8 ({exc.reason})") from None
    except ValueError as exc:
        raise WeightsFormatError(source, f"the header is not JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise WeightsFormatError(
            source, f"the header must be a JSON object, got a JSON {_json_kind(parsed)}"
        )
    layouts: list[TensorLayout] = []
    for name, info in parsed.items():
        if name == "__metadata__":
            _check_metadata(source, info)
            continue
        layouts.append(_entry(source, name, info, data_size))
    layouts.sort(key=lambda t: (t.offset, t.nbytes))
    previous: TensorLayout | None = None
    for layout in layouts:
        if layout.nbytes == 0:
            continue
        if previous is not None and layout.offset < previous.offset + previous.nbytes:
            raise WeightsFormatError(
                source,
                f"bytes [{layout.offset:,}, {layout.offset + layout.nbytes:,}) overlap entry "
                f"{previous.name!r}'s [{previous.offset:,}, {previous.offset + previous.nbytes:,})",
                layout.name,
            )
        previous = layout
    return tuple(layouts)


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "null" if value is None else type(value).__name__


def _check_metadata(source: str | os.PathLike[str], info: object) -> None:
    if not isinstance(info, dict):
        raise WeightsFormatError(
            source, f"must be an object of strings, got a JSON {_json_kind(info)}", "__metadata__"
        )
    for key, value in info.items():
        if not isinstance(value, str):
            raise WeightsFormatError(
                source,
                f"value of {key!r} must be a string, got a JSON {_json_kind(value)}",
                "__metadata__",
            )


def _entry(source: str | os.PathLike[str], name: str, info: object, data_size: int) -> TensorLayout:
    if not isinstance(info, dict):
        raise WeightsFormatError(
            source,
            f"must be an object with dtype, shape and data_offsets, got a JSON {_json_kind(info)}",
            name,
        )
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in info]
    if missing:
        raise WeightsFormatError(source, f"has no {' or '.join(missing)}", name)
    code = info["dtype"]
    known = SAFETENSORS_DTYPES.get(code) if isinstance(code, str) else None
    if known is None:
        raise WeightsFormatError(
            source, f"unknown dtype {code!r}; known: {', '.join(SAFETENSORS_DTYPES)}", name
        )
    dtype, itemsize = known
    shape = info["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise WeightsFormatError(
            source, f"shape must be a list of non-negative integers, got {shape!r}", name
        )
    offsets = info["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise WeightsFormatError(
            source, f"data_offsets must be two integers [begin, end], got {offsets!r}", name
        )
    begin, end = offsets
    if not 0 <= begin <= end:
        raise WeightsFormatError(
            source, f"data_offsets [{begin:,}, {end:,}] must satisfy 0 <= begin <= end", name
        )
    if end > data_size:
        raise WeightsFormatError(
            source,
            f"data_offsets [{begin:,}, {end:,}] reach past the data section's {data_size:,} bytes",
            name,
        )
    expected = math.prod(shape) * itemsize
    if end - begin != expected:
        raise WeightsFormatError(
            source,
            f"shape {shape} of {code} takes {expected:,} bytes but data_offsets "
            f"[{begin:,}, {end:,}] hold {end - begin:,}",
            name,
        )
    return TensorLayout(name, dtype, tuple(shape), begin, end - begin)


def read_safetensors_layout(path: str | os.PathLike[str]) -> tuple[int, tuple[TensorLayout, ...]]:
    """The data section's file offset and every tensor's layout, from a safetensors file.

    The header length is checked against the file's size before anything is read, then
    the header is checked whole by :func:`parse_safetensors_header`.

    Raises:
        WeightsFormatError: the file is not a well-formed safetensors file.
        OSError: the file cannot be opened or read.
    """
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) != 8:
            raise WeightsFormatError(
                path, f"the file has {file_size:,} bytes, fewer than the 8 of the header length"
            )
        (size,) = struct.unpack("<Q", head)
        if size > file_size - 8:
            raise WeightsFormatError(
                path,
                f"the header length {size:,} exceeds the {file_size - 8:,} bytes after it",
            )
        if size > MAX_HEADER_BYTES:
            raise WeightsFormatError(
                path, f"the header length {size:,} exceeds the format's {MAX_HEADER_BYTES:,}"
            )
        raw = f.read(size)
    if len(raw) != size:
        raise WeightsFormatError(
            path, f"the header was cut short at {len(raw):,} of {size:,} bytes"
        )
    return 8 + size, parse_safetensors_header(raw, file_size - 8 - size, source=path)
