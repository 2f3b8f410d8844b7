"""What lenet knows about each dataset before reading a byte: its files, shapes, classes and
split sizes, the publishers' checksums, and where the cache lives."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lenet_spec import SHAPES
from lenet_train.paths import cache_root
from lenet_util.errors import LenetError

MANIFEST = "manifest.json"
STATS = "stats.json"
STATS_DECIMALS = 4
"""What the normalisation is rounded to; an entry of stats.json made otherwise is recomputed."""

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_FILES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
CIFAR_FOLDER = "cifar-10-batches-bin"
CIFAR_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR_RECORD = 1 + 3 * 32 * 32
CIFAR_PER_FILE = 10_000

MNIST_MD5 = {  # of the uncompressed official files
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
# SHA-256 of the publishers' compressed files, as TFDS ships them in its own package
# (tensorflow_datasets/url_checksums/NAME.txt; the tests compare the two).
TFDS_SHA256 = {
    "mnist": {
        "t10k-images-idx3-ubyte.gz":
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz":
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        "train-images-idx3-ubyte.gz":
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz":
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    },
    "fashion_mnist": {
        "t10k-images-idx3-ubyte.gz":
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz":
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        "train-images-idx3-ubyte.gz":
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz":
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    },
    "kmnist": {
        "t10k-images-idx3-ubyte.gz":
            "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5",
        "t10k-labels-idx1-ubyte.gz":
            "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c",
        "train-images-idx3-ubyte.gz":
            "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4",
        "train-labels-idx1-ubyte.gz":
            "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17",
    },
    "cifar10": {
        CIFAR_ARCHIVE: "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
    },
}
CIFAR_ARCHIVE_SIZE = 170_052_171


@dataclass(frozen=True)
class Dataset:
    """A dataset's facts: its format, image shape (C, H, W), classes and split sizes."""

    name: str
    title: str
    format: str  # "idx" or "cifar"
    shape: tuple[int, int, int]
    classes: int
    counts: dict[str, int] = field(default_factory=dict)
    url: str = ""
    """Where its publisher offers the files."""

    def files(self, split: str) -> tuple[str, ...]:
        return (IDX_FILES if self.format == "idx" else CIFAR_FILES)[split]

    def all_files(self) -> tuple[str, ...]:
        """Every file of both splits (the training files first)."""
        return (*self.files("train"), *self.files("test"))


DATASETS = {d.name: d for d in (
    Dataset("mnist", "MNIST", "idx", SHAPES["mnist"], 10, {"train": 60_000, "test": 10_000},
            "https://storage.googleapis.com/cvdf-datasets/mnist/ (the .gz files)"),
    Dataset("fashion_mnist", "Fashion-MNIST", "idx", SHAPES["fashion_mnist"], 10,
            {"train": 60_000, "test": 10_000},
            "https://github.com/zalandoresearch/fashion-mnist (data/fashion/*.gz)"),
    Dataset("kmnist", "KMNIST", "idx", SHAPES["kmnist"], 10, {"train": 60_000, "test": 10_000},
            "http://codh.rois.ac.jp/kmnist/dataset/kmnist/ (the *-ubyte.gz files)"),
    Dataset("cifar10", "CIFAR-10", "cifar", SHAPES["cifar10"], 10,
            {"train": 50_000, "test": 10_000},
            "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz (the binary version)"),
)}


class DataError(LenetError, RuntimeError):
    """Data that cannot be found or read; the message names the file and the problem."""


@dataclass
class Split:
    """One split of a dataset: images uint8 (N, C, H, W), labels int64 (N,), where they came
    from and what their checksums said."""

    images: np.ndarray
    labels: np.ndarray
    source: str
    checksum: str
    digests: dict[str, str] = field(default_factory=dict)
    """A digest of each file read, by name (MD5 where the official check needed it, else
    SHA-256)."""


def get(name: str) -> Dataset:
    """The dataset called ``name``; a clear error for any other name."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return DATASETS[name]


def archive_dir(name: str) -> Path:
    """Where an archive given with --data-dir is extracted: beside the cache, never into it,
    so that a cache filled from elsewhere keeps its files and its provenance."""
    return cache_root() / f"{name}-archive"


def cache_dir(name: str) -> Path:
    """The cache folder of dataset ``name``."""
    return cache_root() / name

