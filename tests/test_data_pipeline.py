"""The data pipeline both trainers share: padding and normalisation to what a spec takes, the
training set's statistics, augmentation and batch order as functions of (seed, epoch), the
real MNIST, and both programs training on CIFAR-format files."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from helpers import SLOW, cifar_folder, mnist, run_program

from lenet_spec import PRESETS, fitting, misfit
from lenet_train.data import (
    MEAN,
    STD,
    DataError,
    augment,
    catalog,
    channel_stats,
    epoch_order,
    load,
    normalisation,
    prepare,
    store,
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Each test its own cache folder and no $LENET_DATA_DIR (CI points it at MNIST)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("LENET_DATA_DIR", raising=False)


def test_prepare_pads_with_background_and_normalises() -> None:
    images = np.full((2, 28, 28), 255, np.uint8)
    images[1] = 0
    x = prepare(images, PRESETS["lenet5"])
    assert x.shape == (2, 1, 32, 32) and x.dtype == np.float32
    background = (0 - MEAN) / STD
    assert np.allclose(x[:, :, :2, :], background) and np.allclose(x[:, :, :, -2:], background)
    assert np.allclose(x[0, 0, 2:30, 2:30], (1 - MEAN) / STD)
    assert np.allclose(x[1], background)  # a blank digit is all background, border included
    with pytest.raises(DataError, match="spec cifar10_cnn takes 3 input channels; mnist has 1"):
        prepare(images, PRESETS["cifar10_cnn"])

def test_epoch_order_is_a_function_of_seed_and_epoch() -> None:
    a = epoch_order(1000, 64, seed=3, epoch=2)
    assert a.shape == (15, 64)
    assert np.array_equal(a, epoch_order(1000, 64, seed=3, epoch=2))
    assert not np.array_equal(a, epoch_order(1000, 64, seed=3, epoch=3))
    assert not np.array_equal(a, epoch_order(1000, 64, seed=4, epoch=2))
    assert len(np.unique(a)) == a.size  # a permutation, last partial batch dropped

def test_real_mnist(mnist_dir: str) -> None:
    x, y = mnist("train", mnist_dir)
    assert x.shape == (60_000, 28, 28) and y.shape == (60_000,)
    assert abs(x.mean() / 255 - MEAN) < 1e-4 and abs((x / 255).std() - STD) < 1e-4
    assert channel_stats(x[:, None]) == ([MEAN], [STD])
    tx, ty = mnist("test", mnist_dir)
    assert tx.shape == (10_000, 28, 28) and np.bincount(ty).min() > 800


def test_normalisation_is_the_training_sets_and_is_kept(tmp_path, monkeypatch,
                                                       mnist_dir: str) -> None:
    images = np.random.default_rng(0).integers(0, 256, (50, 3, 32, 32), dtype=np.uint8)
    mean, std = channel_stats(images)
    scaled = images.astype(np.float64) / 255
    assert mean == [round(v, 4) for v in scaled.mean(axis=(0, 2, 3))]
    assert std == [round(v, 4) for v in scaled.std(axis=(0, 2, 3))]
    train = load("mnist", "train", mnist_dir)
    first = normalisation("mnist", train)
    assert first == ([MEAN], [STD])  # the pipeline's constants
    stats = tmp_path / "xdg" / "lenet" / "mnist" / catalog.STATS
    key = hashlib.sha256((train.digests["train-images-idx3-ubyte"]
                          + train.digests["train-labels-idx1-ubyte"]).encode()).hexdigest()
    assert json.loads(stats.read_text()) == {key: {"mean": first[0], "std": first[1],
                                                  "decimals": 4}}
    monkeypatch.setattr(store, "channel_stats", lambda _: pytest.fail("recomputed"))
    assert normalisation("mnist", train) == first

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

@SLOW
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
    res = run_program(program, "--dataset", "cifar10", "--spec", "cifar10_cnn", "--data-dir",
                      str(data), "--epochs", "3", "--lr", "2e-3", "--workdir", str(work), "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["test_accuracy"] >= 0.8, records
    assert records[-1]["data"]["dataset"] == "cifar10"
    assert records[-1]["data"]["checksum"]["train"].startswith("not checked")
    config = json.loads((work / "config.json").read_text())
    assert config["data"]["source"]["train"] == str(data)
    assert len(config["data"]["mean"]) == 3

@SLOW
@pytest.mark.parametrize("program", ["lenet_jax.train", "lenet_torch.train"])
def test_augmented_training_and_the_wrong_dataset(tmp_path, program: str) -> None:
    data = tmp_path / "cifar"
    cifar_folder(data, per_file=20, test=20)
    work = tmp_path / "run"
    res = run_program(program, "--dataset", "cifar10", "--spec", "cifar10_cnn", "--data-dir",
                      str(data), "--augment", "--epochs", "2", "--batch-size", "25", "--workdir",
                      str(work), "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((work / "config.json").read_text())["augment"] == ["crop", "flip"]
    res = run_program(program, "--spec", "cifar10_cnn", "--data-dir", str(data), "--workdir",
                      str(tmp_path / "r2"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        "error: spec cifar10_cnn takes 3 input channels; mnist has 1 (it fits --dataset "
        "cifar10)")
