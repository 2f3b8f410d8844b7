"""The equivalence test of ``python -m lenet_parity --train`` (Welch's TOST), on synthetic
samples with known answers, and the command on the real programs.

Rates are counted over T independent trials; a rate's standard error is √(r(1−r)/T), and each
assertion allows 4 of them (a correct test fails one by chance with probability < 1e-4)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from helpers import SLOW

from lenet_parity.population import compare, report
from lenet_parity.stats import tost

ALPHA = 0.05


def _rate(trials: int, draw, margin: float) -> float:
    """The share of ``trials`` in which the TOST shows equivalence."""
    rng = np.random.default_rng(0)
    return sum(tost(*draw(rng), margin, ALPHA).equivalent for _ in range(trials)) / trials


def _slack(rate: float, trials: int) -> float:
    return 4 * math.sqrt(rate * (1 - rate) / trials)


def test_false_positive_rate_at_the_margin_is_alpha() -> None:
    """True difference exactly at the margin (the worst case of H0): equivalence is shown in
    α of the trials, within 4 standard errors: equal samples (n = 16, σ = 1), and unequal
    sizes and variances (n = 30, σ = 1 against n = 60, σ = 0.3: Welch's degrees of
    freedom)."""
    trials = 4000
    equal = _rate(trials, lambda r: (r.normal(1.0, 1, 16), r.normal(0, 1, 16)), 1.0)
    assert abs(equal - ALPHA) <= _slack(ALPHA, trials), equal
    unequal = _rate(trials, lambda r: (r.normal(-0.5, 1, 30), r.normal(0, 0.3, 60)), 0.5)
    assert abs(unequal - ALPHA) <= _slack(ALPHA, trials), unequal
    far = _rate(1000, lambda r: (r.normal(2.0, 1, 16), r.normal(0, 1, 16)), 1.0)
    assert far <= _slack(ALPHA, 1000)  # beyond the margin: almost never


def test_power_when_the_samples_are_the_same() -> None:
    """Same distribution (σ = 1, n = 16 each), margin 1.5: the 90% CI's half-width is about
    1.70 · √(2/16) = 0.60, so equivalence is shown unless |difference| > 0.90, i.e. with
    probability ≈ P(|Z| < 0.90 / 0.354) = 0.989; asserted ≥ 0.989 − 4 s.e. of 1000 trials."""
    trials, power = 1000, 0.989
    rate = _rate(trials, lambda r: (r.normal(0, 1, 16), r.normal(0, 1, 16)), 1.5)
    assert rate >= power - _slack(power, trials), rate


def test_confidence_interval_and_p_value_agree() -> None:
    """p < α exactly when the (1 − 2α) interval lies inside the margins; the interval holds
    the difference of means; constant samples are judged by their difference alone; fewer
    than 2 values or a bad margin is one ValueError."""
    rng = np.random.default_rng(1)
    for _ in range(300):
        a, b = rng.normal(rng.normal(), rng.uniform(0.1, 2), (2, int(rng.integers(2, 20))))
        t = tost(a, b, margin=float(rng.uniform(0.1, 2)))
        assert t.low <= t.diff <= t.high
        assert t.diff == pytest.approx(a.mean() - b.mean())
        assert t.equivalent == (-t.margin < t.low and t.high < t.margin)
    assert tost([1, 1, 1], [1.1, 1.1], 0.2).equivalent
    assert not tost([1, 1, 1], [1.3, 1.3], 0.2).equivalent
    for bad in (([1.0], [1.0, 2.0], 0.1), ([1.0, 2.0], [1.0, 2.0], 0.0)):
        with pytest.raises(ValueError):
            tost(*bad)


def _records(rng, shift: float, sd: float, seeds: int, epochs: int = 2) -> list[list[dict]]:
    """Synthetic metrics records: epoch e's accuracy 0.97 + 0.01 e + shift + noise."""
    return [[{"test_accuracy": 0.97 + 0.01 * e + shift + rng.normal(0, sd),
              "test_loss": 0.1 - 0.01 * e + rng.normal(0, sd)} for e in range(epochs)]
            for _ in range(seeds)]


def test_compare_detects_a_planted_difference_and_accepts_none() -> None:
    """The final accuracy, final loss and every earlier epoch are tested; a 0.5-point shift of
    one side with a 0.05-point spread is not equivalent within ±0.15 points, the same
    populations are (each CI's half-width is ≈ 0.03 points)."""
    rng = np.random.default_rng(2)
    same = compare({"jax": _records(rng, 0, 5e-4, 16), "torch": _records(rng, 0, 5e-4, 16)},
                   margin=0.0015, loss_margin=0.01)
    assert same["equivalent"]
    assert list(same["tests"]) == ["final test accuracy", "final test loss",
                                   "epoch 1 test accuracy"]
    lines = report(same)
    assert lines[0].startswith("final test accuracy: JAX 98") and "vs torch 98" in lines[0]
    assert "points, 90% CI [" in lines[0] and lines[0].endswith(": equivalent")
    assert lines[-1] == "verdict: the two programs train the same within the margins"
    planted = compare({"jax": _records(rng, 0.005, 5e-4, 16),
                       "torch": _records(rng, 0, 5e-4, 16)}, margin=0.0015, loss_margin=0.01)
    assert not planted["equivalent"]
    assert not planted["tests"]["final test accuracy"].equivalent
    assert planted["tests"]["final test loss"].equivalent  # the loss was not shifted
    assert report(planted)[-1].startswith("verdict: equivalence not shown")


def _parity(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lenet_parity", *args], capture_output=True,
                          text=True, env=env)


def test_train_flags_and_a_failing_program_are_one_line() -> None:
    """Too few seeds, a bad margin or α are refused by the parser; a program that fails
    (here its own flag check) ends the comparison with its command and its error line."""
    for args, message in ((["--seeds", "1"], "--seeds: must be at least 2, got 1"),
                          (["--margin", "0"], "--margin: must be greater than 0"),
                          (["--alpha", "0.5"], "--alpha: must be below 0.5")):
        res = _parity("lenet5", "--train", *args)
        assert res.returncode == 2 and message in res.stderr, res.stderr
    res = _parity("lenet5", "--train", "--seeds", "2", "--train-args", "--batch-size 0")
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--seed 0" in errors[0] and "--batch-size" in errors[0], \
        res.stderr
    assert "Traceback" not in res.stderr


@SLOW
def test_train_runs_both_programs_per_seed(tmp_path, mnist_dir) -> None:
    """Two seeds of each program on 512 MNIST images: the verdict lines, exit status 0 or 1
    by the verdict, and the JSON record with every run's per-epoch records and each test."""
    import os

    out = tmp_path / "eq.json"
    res = _parity("lenet5", "--train", "--seeds", "2", "--epochs", "2", "--train-args",
                  "--train-size 512 --batch-size 64", "--json", str(out),
                  env=dict(os.environ, LENET_DATA_DIR=str(mnist_dir)))
    assert res.returncode in (0, 1), res.stderr
    data = json.loads(out.read_text())
    assert res.returncode == (0 if data["equivalent"] else 1)
    assert [len(data["runs"][fw]) for fw in ("jax", "torch")] == [2, 2]
    assert all(len(records) == 2 for fw in ("jax", "torch") for records in data["runs"][fw])
    assert set(data["tests"]) == {"final test accuracy", "final test loss",
                                  "epoch 1 test accuracy"}
    assert data["tests"]["final test accuracy"]["n_a"] == 2
    assert res.stdout.splitlines()[0].startswith("final test accuracy: JAX ")
    assert res.stdout.splitlines()[-1].startswith("verdict: ")
    assert "jax seed 1: test accuracy" in res.stderr and "torch seed 0" in res.stderr
