"""``--seeds`` in both training programs: one process trains a population, member S as
``--seed S`` alone would; a record per member and a summary; a weights file per member; the
population's checkpoint resumes it exactly; and what a population cannot do is refused in one
line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import HANG, PROGRAMS, SLOW, fast_only, one_line_error, run_program, without_dropout
from safetensors.numpy import load_file
from test_population import MEMBER_TOL

from lenet_spec import PRESETS
from lenet_train.config import SEEDS_MAX, seed_list, shown_seeds
from lenet_train.runlog import read_jsonl

SHORT = ["--train-size", "512", "--batch-size", "64", "--epochs", "2", "--optimizer", "sgd",
         "--lr", "0.05", "--checkpoint-every", "5", "--log-steps", "--quiet"]
"""8 steps an epoch, 16 in all, of lenet5_bn without its dropout (:func:`spec_file`)."""
TIMING = {"epoch_s", "images_per_sec", "wall_s"}
RECORD_TOL = 1e-4
"""Max |Δ| of a member's losses and accuracies against the single run's (the weights within
:data:`MEMBER_TOL`; an accuracy differs by a multiple of 1/512 or 1/10,000 only when a
prediction flips, which weights this close do not do on these few steps)."""


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory) -> str:
    """lenet5_bn without dropout: batch statistics, kept per member, and no dropout masks,
    which a torch population draws from one generator for all its members (not each seed's
    own masks; JAX's members draw their seeds' own, tests/test_population.py)."""
    path = tmp_path_factory.mktemp("spec") / "lenet5_bn_no_dropout.json"
    path.write_text(without_dropout(PRESETS["lenet5_bn"]).to_json())
    return str(path)


@pytest.fixture(scope="module")
def base(spec_file, mnist_dir) -> list[str]:
    """The flags of every run here but --workdir and the seeds."""
    return [*SHORT, "--spec", spec_file, "--data-dir", mnist_dir]


def _run(framework: str, workdir: Path, base: list[str], *extra: str,
         check: bool = True) -> subprocess.CompletedProcess:
    res = run_program(framework, *base, "--workdir", str(workdir), *extra)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def _one_line_error(res: subprocess.CompletedProcess, *parts: str) -> str:
    return one_line_error(res, *parts)


def test_seed_lists() -> None:
    assert seed_list("4") == (0, 1, 2, 3)
    assert seed_list("5-7") == (5, 6, 7)
    assert seed_list("9,2-3,11") == (9, 2, 3, 11)
    assert shown_seeds([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    for bad, says in (("0", "N must be"), ("3-1", "empty"), ("1,1", "given twice"),
                      ("2,1-3", "given twice"), ("a", "expected N"), ("1-2-3", "expected N"),
                      (f"0-{SEEDS_MAX}", f"more than {SEEDS_MAX}"), ("4294967296", "N must be"),
                      ("1,4294967296", "must be in")):
        with pytest.raises(ValueError, match=says):
            seed_list(bad)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base):
    """Each framework's population of seeds 0 and 3, and its single run at seed 3, made when
    first asked for."""
    root, made = tmp_path_factory.mktemp("population"), {}

    def get(framework: str, what: str) -> Path:
        if (framework, what) not in made:
            workdir = root / f"{framework}-{what}"
            _run(framework, workdir, base,
                 *(["--seeds", "0,3"] if what == "population" else ["--seed", "3"]))
            made[framework, what] = workdir
        return made[framework, what]

    return get


@pytest.mark.parametrize("framework", fast_only(PROGRAMS, "jax"))
def test_member_is_the_single_run_at_its_seed(runs, framework: str) -> None:
    """Member 3's weights (batch statistics included) and its metrics are those of --seed 3
    within the member bound; the summary is the mean and sample s.d. of the members."""
    population, single = runs(framework, "population"), runs(framework, "single")
    files = sorted(p.name for p in population.iterdir())
    assert files == [".lenet.lock", "checkpoint.safetensors", "config.json", "metrics.jsonl",
                     "steps.jsonl", "weights-seed-0.safetensors", "weights-seed-3.safetensors"]
    member, alone = (load_file(p) for p in (population / "weights-seed-3.safetensors",
                                            single / "weights.safetensors"))
    other = load_file(population / "weights-seed-0.safetensors")
    assert member.keys() == alone.keys()
    gap = max(float(np.max(np.abs(member[k].astype(np.float64) - alone[k]))) for k in member)
    assert gap <= MEMBER_TOL, gap
    assert max(float(np.max(np.abs(other[k].astype(np.float64) - alone[k])))
               for k in other) > 100 * MEMBER_TOL  # seed 0 is another network
    assert member["bn1.num_batches_tracked"] == 16
    records = read_jsonl(population / "metrics.jsonl")
    assert [(r["epoch"], r.get("seed")) for r in records] == [(0, 0), (0, 3), (0, None),
                                                             (1, 0), (1, 3), (1, None)]
    for epoch, want in enumerate(read_jsonl(single / "metrics.jsonl")):
        got = records[3 * epoch + 1]
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            assert abs(got[key] - want[key]) <= RECORD_TOL, (epoch, key, got[key], want[key])
        assert got["step"] == want["step"] and got["lr"] == want["lr"]
        summary, members = records[3 * epoch + 2], records[3 * epoch : 3 * epoch + 2]
        assert summary["seeds"] == [0, 3] and summary["members"] == 2
        for key in ("train_loss", "test_accuracy"):
            values = [m[key] for m in members]
            assert summary[key] == pytest.approx(np.mean(values), abs=1e-12)
            assert summary[key + "_sd"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    steps = read_jsonl(population / "steps.jsonl")
    assert [(s["step"], s["seed"]) for s in steps[:3]] == [(0, 0), (0, 3), (1, 0)]
    assert len(steps) == 2 * 16


@SLOW
@pytest.mark.parametrize("framework", PROGRAMS)
def test_interrupted_population_resumes_exactly(tmp_path, runs, base, framework: str) -> None:
    """SIGINT at the first checkpoint's step, then --resume: the same weights files byte for byte,
    the same records and step losses as the population never interrupted."""
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", PROGRAMS[framework], *base, "--workdir", str(workdir),
           "--seeds", "0,3"]
    stderr = _interrupt_after_first_checkpoint(cmd, workdir)
    assert "Continue with:" in stderr and "--seeds 0,3" in stderr
    res = run_program(framework, *cmd[3:], "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    whole = runs(framework, "population")
    for name in ("weights-seed-0.safetensors", "weights-seed-3.safetensors", "steps.jsonl"):
        assert (workdir / name).read_bytes() == (whole / name).read_bytes(), name
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert strip(read_jsonl(workdir / "metrics.jsonl")) == \
        strip(read_jsonl(whole / "metrics.jsonl"))


def _interrupt_after_first_checkpoint(cmd: list[str], workdir: Path) -> str:
    """Run ``cmd`` with a SIGINT it sends itself after step 5, its first checkpoint's
    (``LENET_FAULT``: the same step on a machine of any speed or load; the run stops after
    the call of its train step that holds step 5); its stderr."""
    env = {**os.environ, "LENET_FAULT": "SIGINT@5"}
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=env, timeout=HANG)
    assert proc.returncode == 130, proc.stderr
    assert re.search(r"SIGINT: stopped at step [5-8] ", proc.stderr), proc.stderr
    return proc.stderr


@SLOW
def test_a_population_checkpoint_crosses_frameworks(tmp_path, runs, base) -> None:
    """JAX's population stopped by SIGINT at its first checkpoint's step and continued by
    torch: each member ends within the member bound of the JAX population never stopped (the
    canonical weights and optimizer state, stacked; the frameworks' own initialisations of a
    seed differ, so the reference is the run that started)."""
    workdir = tmp_path / "run"
    cmd = [*base, "--workdir", str(workdir), "--seeds", "0,3"]
    _interrupt_after_first_checkpoint([sys.executable, "-m", PROGRAMS["jax"], *cmd], workdir)
    loud = [a for a in cmd if a != "--quiet"]
    res = run_program("torch", *loud, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming a jax checkpoint" in res.stdout
    whole = runs("jax", "population")
    for seed in (0, 3):
        a, b = (load_file(w / f"weights-seed-{seed}.safetensors") for w in (workdir, whole))
        gap = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
        assert gap <= MEMBER_TOL, (seed, gap)


def test_what_a_population_cannot_do_is_refused(tmp_path, base) -> None:
    """Contradictory or unsupported flags: one line each, before any framework is imported."""
    for framework, extra, says in (
            ("jax", ["--seed", "1", "--seeds", "4"], "--seed and --seeds contradict"),
            ("jax", ["--seeds", "2", "--augment"], "--seeds: not with --augment"),
            ("torch", ["--seeds", "2", "--compile"], "--compile: not with --seeds"),
            ("torch", ["--seeds", "2", "--kernels", "fused"], "--kernels fused: not with"),
            ("jax", ["--seeds", "1,1"], "seed 1 is given twice")):
        res = _run(framework, tmp_path / "never", base, *extra, check=False)
        assert res.returncode == 2
        _one_line_error(res, says)
        assert not (tmp_path / "never").exists()


@SLOW
def test_resume_keeps_the_population(runs, base) -> None:
    """A population's checkpoint is refused without its --seeds or with others, and a single
    run's with --seeds, naming the flag and both values."""
    population, single = runs("jax", "population"), runs("jax", "single")
    for workdir, extra, says in (
            (population, [], "written with --seeds 0,3, now none"),
            (population, ["--seeds", "0-2"], "written with --seeds 0,3, now 0-2"),
            (single, ["--seeds", "3"], "--seed")):
        res = _run("jax", workdir, base, "--epochs", "3", "--resume", *extra, check=False)
        _one_line_error(res, says)


def test_a_diverging_member_stops_the_population_naming_its_seed(tmp_path, base) -> None:
    """A non-finite loss of any member stops the run (exit 3) at that step, naming the seed."""
    res = _run("torch", tmp_path / "run", base, "--seeds", "0,3", "--lr", "1e6", "--schedule",
               "constant", check=False)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert re.search(r"error: the loss of seed [03] is (nan|inf|-inf) at step \d+; run stopped",
                     res.stderr), res.stderr
