"""The publishers' file formats, read and written: IDX (the MNIST family, plain or .gz) and
CIFAR-10's binary records. Every header field and size is checked before anything is
allocated."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from lenet_train.data.catalog import CIFAR_RECORD, DataError

_IDX_DTYPES = {0x08: np.uint8}


def read_raw(path: Path, limit: int, what: str) -> bytes:
    """The file's bytes (decompressed if .gz), refused past ``limit`` bytes without reading
    further (a small .gz can inflate to any size)."""
    too_big = DataError(f"{path}: more than {limit:,} bytes, larger than the official {what}")
    try:
        if path.suffix != ".gz":
            if path.stat().st_size > limit:
                raise too_big
            return path.read_bytes()
        with gzip.open(path, "rb") as f:
            data = f.read(limit + 1)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if len(data) > limit:
        declared = _gzip_size(path)
        if declared is not None and declared <= limit:
            raise DataError(f"{path}: corrupted: inflates past {limit:,} bytes though its gzip "
                            f"trailer records {declared:,} (delete it to fetch a fresh copy)")
        raise too_big
    return data


def _gzip_size(path: Path) -> int | None:
    """The uncompressed size (mod 2³²) a .gz file's trailer records, or None if unreadable."""
    try:
        with open(path, "rb") as f:
            f.seek(-4, 2)
            return int.from_bytes(f.read(4), "little")
    except OSError:
        return None


def parse_idx(raw: bytes, source: str, ndim: int) -> np.ndarray:
    """An IDX byte string as an array, every header field checked before allocating."""
    if len(raw) < 4:
        raise DataError(f"{source}: too short for an IDX header ({len(raw)} bytes)")
    zero, dtype_code, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in _IDX_DTYPES:
        raise DataError(f"{source}: bad IDX magic number 0x{raw[:4].hex()} (not an IDX file)")
    if dims != ndim:
        raise DataError(f"{source}: IDX file has {dims} dimensions, expected {ndim}")
    header = 4 + 4 * dims
    if len(raw) < header:
        raise DataError(f"{source}: truncated IDX header")
    shape = struct.unpack(f">{dims}I", raw[4:header])
    expected = header + math.prod(shape) * np.dtype(_IDX_DTYPES[dtype_code]).itemsize
    if len(raw) != expected:
        raise DataError(
            f"{source}: file size {len(raw)} bytes does not match its header "
            f"(shape {shape} needs {expected} bytes)"
        )
    return np.frombuffer(raw, dtype=_IDX_DTYPES[dtype_code], offset=header).reshape(shape)


def idx_bytes(array: np.ndarray) -> bytes:
    """An uint8 array as IDX bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def parse_cifar(raw: bytes, source: str, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 binary records (1 label byte, 3,072 pixel bytes channel-major each) as images
    uint8 (N, 3, 32, 32) and labels int64."""
    if len(raw) == 0 or len(raw) % CIFAR_RECORD:
        raise DataError(f"{source}: {len(raw):,} bytes is not a whole number of "
                        f"{CIFAR_RECORD:,}-byte CIFAR-10 records (truncated or not CIFAR-10)")
    records = np.frombuffer(raw, np.uint8).reshape(-1, CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= classes:
        first = int(np.argmax(labels >= classes))
        raise DataError(f"{source}: record {first} has label {labels[first]}, out of range "
                        f"(0-{classes - 1})")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def cifar_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    """Images uint8 (N, 3, 32, 32) and labels as CIFAR-10 binary records."""
    records = np.empty((len(images), CIFAR_RECORD), np.uint8)
    records[:, 0] = labels
    records[:, 1:] = np.asarray(images, np.uint8).reshape(len(images), -1)
    return records.tobytes()
