"""Canonical weights: names and layouts of torch's ``state_dict`` (parameters and buffers), in
safetensors files that carry their spec.

A weights file is plain safetensors (no pickle, nothing executed on load); its metadata holds
``{"format": "lenet-weights", "spec": <the spec's JSON>}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from safetensors import safe_open

from lenet_spec.layers import Shape, SpecError
from lenet_spec.spec import COUNTERS, Spec
from lenet_util.errors import LenetError
from lenet_util.files import atomic_write_bytes, not_a_file

FORMAT = "lenet-weights"

INITS = ("torch", "lecun_normal")
"""The initial weights ``build(..., init=)`` draws in both ports: torch's layer defaults, or
LeCun-normal weights with zero biases."""


class WeightsError(LenetError, ValueError):
    """Weights that do not fit a spec, or a weights file that cannot be read."""


def check_weights(spec: Spec, weights: Mapping[str, np.ndarray]) -> None:
    """Raise :class:`WeightsError` unless ``weights`` has exactly the spec's canonical tensors,
    parameters and buffers (floats; batch counts integers).

    The message names the first mismatched tensor and both shapes, or the missing buffer.
    """
    expected = spec.state_shapes
    buffers = spec.buffer_shapes
    for name, shape in expected.items():
        if name not in weights:
            what = "buffer" if name in buffers else "tensor"
            raise WeightsError(f"{spec.name}: missing {what} {name!r} of shape {shape}")
        got = tuple(np.shape(weights[name]))
        if got != shape:
            raise WeightsError(
                f"{spec.name}: tensor {name!r} has shape {got}, the spec expects {shape}"
            )
        dtype = np.asarray(weights[name]).dtype
        counter = name.rsplit(".", 1)[-1] in COUNTERS
        if counter and not np.issubdtype(dtype, np.integer):
            raise WeightsError(f"{spec.name}: tensor {name!r} has dtype {dtype}, expected an "
                               "integer count")
        if not counter and not np.issubdtype(dtype, np.floating):
            raise WeightsError(f"{spec.name}: tensor {name!r} has dtype {dtype}, expected float")
    extra = [k for k in weights if k not in expected]
    if extra:
        raise WeightsError(
            f"{spec.name}: unexpected tensor {extra[0]!r} of shape "
            f"{tuple(np.shape(weights[extra[0]]))}; the spec has {', '.join(expected)}"
        )


def canonical_dtype(name: str) -> np.dtype:
    """The dtype a canonical tensor is stored in: int64 for batch counts, else float32."""
    return np.dtype(np.int64 if name.rsplit(".", 1)[-1] in COUNTERS else np.float32)


_DTYPES = {np.dtype(k): v for k, v in (
    ("float64", "F64"), ("float32", "F32"), ("float16", "F16"), ("int64", "I64"),
    ("int32", "I32"), ("int16", "I16"), ("int8", "I8"), ("uint64", "U64"), ("uint32", "U32"),
    ("uint16", "U16"), ("uint8", "U8"), ("bool", "BOOL"))}


def hwc_to_chw(a: np.ndarray, chw: Shape, axis: int) -> np.ndarray:
    """``a`` with its ``axis`` (a flattened (H, W, C) map, as an NHWC port flattens) put in
    the canonical flattened (C, H, W) order (:attr:`LayerInfo.flattened_from` gives ``chw``)."""
    c, h, w = chw
    a = np.moveaxis(np.asarray(a), axis, 0)
    rest = a.shape[1:]
    a = a.reshape(h, w, c, *rest).transpose(2, 0, 1, *range(3, 3 + len(rest)))
    return np.moveaxis(a.reshape(c * h * w, *rest), 0, axis)


def chw_to_hwc(a: np.ndarray, chw: Shape, axis: int) -> np.ndarray:
    """The inverse of :func:`hwc_to_chw`."""
    c, h, w = chw
    a = np.moveaxis(np.asarray(a), axis, 0)
    rest = a.shape[1:]
    a = a.reshape(c, h, w, *rest).transpose(1, 2, 0, *range(3, 3 + len(rest)))
    return np.moveaxis(a.reshape(h * w * c, *rest), 0, axis)


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray],
                      metadata: dict[str, str]) -> None:
    """Write ``tensors`` (0-d arrays stay 0-d) and string ``metadata`` to ``path`` atomically,
    as a safetensors file whose bytes depend only on its contents (the same state gives the
    same file, so runs can be compared by checksum)."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset, little = 0, {}
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype not in _DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {array.dtype} has no safetensors code")
        little[name] = array, dtype
        size = array.size * dtype.itemsize
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def chunks():  # one tensor's bytes at a time, no copy of the whole state
        yield len(text).to_bytes(8, "little") + text
        for array, dtype in little.values():
            if array.size:
                yield memoryview(np.ascontiguousarray(array, dtype=dtype)).cast("B")

    atomic_write_bytes(path, chunks())


def read_safetensors(
    path: Path, error: type[Exception]
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata of a safetensors file; anything unreadable raises ``error``
    naming the file (safetensors itself raises several exception types)."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a Rust panic in safetensors is a BaseException
        raise error(f"{path}: not a readable safetensors file ({e})") from None


HEADER_LIMIT = 16 * 2**20
"""The largest safetensors header read (ours are a few kilobytes)."""


def read_header(path: Path, error: type[Exception]) -> tuple[dict[str, Shape], dict[str, str]]:
    """The tensors' shapes and the metadata of a safetensors file, from its header alone:
    what a loader checks before reading any tensor."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than its header")
            n = int.from_bytes(head, "little")
            if n > min(HEADER_LIMIT, path.stat().st_size - 8):
                raise ValueError(f"a {n:,}-byte header")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        shapes = {}
        for name, entry in header.items():
            shape = entry.get("shape") if isinstance(entry, dict) else None
            if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool)
                                                    and d >= 0 for d in shape)):
                raise ValueError(f"tensor {name!r} has no valid shape")
            shapes[name] = tuple(shape)
        if not isinstance(metadata, dict):
            raise ValueError("its metadata is not a JSON object")
    except (OSError, ValueError, RecursionError) as e:
        raise error(f"{path}: not a readable safetensors file ({e})") from None
    return shapes, metadata


def read_lenet_file(path: str | Path, fmt: str, key: str, kind: str,
                    error: type[Exception],
                    check: Callable[[dict[str, Shape], dict[str, str]], None] | None = None,
                    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata of one of our safetensors files, whose metadata says ``format:
    fmt`` and holds ``key``; a missing or foreign file raises ``error`` naming it as ``kind``.
    ``check`` sees the header's shapes and metadata first and raises for a file it refuses,
    so nothing is read that the caller would not take (one huge tensor, say)."""
    path = Path(path)
    what = not_a_file(path)
    if what is not None:
        raise error(f"{path}: no such {kind}" if what.startswith("nothing")
                    else f"{path}: {what}, not a {kind}")
    shapes, metadata = read_header(path, error)
    if metadata.get("format") != fmt or key not in metadata:
        raise error(f"{path}: not a lenet {kind} (no {key} in its metadata)")
    if check is not None:
        check(shapes, metadata)
    tensors, metadata = read_safetensors(path, error)
    return tensors, metadata


def check_shapes(spec: Spec, shapes: Mapping[str, Shape]) -> None:
    """Raise ``WeightsError`` unless ``shapes`` are exactly ``spec``'s state's names and
    shapes (a file's header, before its tensors are read), with :func:`check_weights`'s
    messages."""
    expected, buffers = spec.state_shapes, spec.buffer_shapes
    for name, shape in expected.items():
        if name not in shapes:
            what = "buffer" if name in buffers else "tensor"
            raise WeightsError(f"{spec.name}: missing {what} {name!r} of shape {shape}")
        if tuple(shapes[name]) != shape:
            raise WeightsError(f"{spec.name}: tensor {name!r} has shape {tuple(shapes[name])}, "
                               f"the spec expects {shape}")
    extra = [k for k in shapes if k not in expected]
    if extra:
        raise WeightsError(f"{spec.name}: unexpected tensor {extra[0]!r} of shape "
                           f"{tuple(shapes[extra[0]])}; the spec has {', '.join(expected)}")


def save_weights(path: str | Path, weights: Mapping[str, np.ndarray], spec: Spec) -> None:
    """Write canonical ``weights`` (parameters float32, buffers as :func:`canonical_dtype`) and
    ``spec`` to a safetensors file, atomically."""
    check_weights(spec, weights)
    tensors = {k: np.asarray(weights[k], dtype=canonical_dtype(k)) for k in spec.state_shapes}
    write_safetensors(path, tensors, {"format": FORMAT, "spec": json.dumps(spec.to_dict())})


def load_weights(path: str | Path, expect: Spec | None = None
                 ) -> tuple[dict[str, np.ndarray], Spec]:
    """Read a file written by :func:`save_weights`: the canonical weights and their spec.
    Its header is checked against its spec (and ``expect``'s shapes, when given) before any
    tensor is read."""
    path = Path(path)

    def spec_of(metadata: Mapping[str, str]) -> Spec:
        try:
            return Spec.from_dict(json.loads(metadata["spec"]))
        except (json.JSONDecodeError, SpecError, RecursionError, ValueError) as e:
            raise WeightsError(f"{path}: the spec in its metadata is invalid: {e}") from None

    def check(shapes: dict[str, Shape], metadata: dict[str, str]) -> None:
        for spec in (spec_of(metadata), *((expect,) if expect is not None else ())):
            try:
                check_shapes(spec, shapes)
            except WeightsError as e:
                raise WeightsError(f"{path}: {e}") from None

    weights, metadata = read_lenet_file(path, FORMAT, "spec", "weights file", WeightsError,
                                        check)
    spec = spec_of(metadata)
    try:
        check_weights(spec, weights)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from None
    for k, v in weights.items():
        if v.dtype != canonical_dtype(k):
            raise WeightsError(f"{path}: tensor {k!r} is {v.dtype}, expected {canonical_dtype(k)}")
    return {k: weights[k] for k in spec.state_shapes}, spec
