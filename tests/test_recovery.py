"""Runs that are killed, interrupted, diverge, or meet damaged files, through the real programs.

A short run (2,560 training images, batch 128: 20 steps an epoch, 3 epochs, a checkpoint every
7 steps) is killed with SIGKILL at several points and resumed until it finishes; it must end
with the same weights file, byte for byte, and the same metrics as a run never interrupted.
lenet5_bn's run does so too: its BatchNorm statistics and dropout randomness are restored.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import HANG, PROGRAMS, SLOW, fast_only, run_program

from lenet_train.checkpoints import load_checkpoint
from lenet_train.runlog import read_jsonl

RUN = ["--train-size", "2560", "--epochs", "3", "--checkpoint-every", "7", "--log-steps",
       "--quiet"]
TIMING = {"epoch_s", "images_per_sec", "wall_s"}
STOP_AT = 25
"""The step a SIGINT stops the run after: mid-epoch 1, between two checkpoints."""


def _cmd(framework: str, workdir: Path, mnist_dir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", PROGRAMS[framework], *RUN, "--data-dir", mnist_dir,
            "--workdir", str(workdir), *extra]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    """``cmd`` (a program's :func:`_cmd`) run to its end in this process; the runs that are
    killed or signalled are started as processes."""
    assert cmd[:2] == [sys.executable, "-m"], cmd
    return run_program(cmd[2], *cmd[3:])


def _checkpoint_meta(workdir: Path) -> dict | None:
    """The checkpoint's metadata, read from the safetensors header alone (cheap to poll)."""
    try:
        raw = (workdir / "checkpoint.safetensors").read_bytes()
    except FileNotFoundError:
        return None
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(json.loads(raw[8 : 8 + n])["__metadata__"]["meta"])


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def _kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    """SIGKILL ``proc`` as soon as ``ready()``; it must still have been running."""
    deadline = time.monotonic() + HANG
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"not killed at {what}: {proc.returncode}"


def _same_run(a: Path, b: Path) -> None:
    assert (a / "weights.safetensors").read_bytes() == (b / "weights.safetensors").read_bytes()
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["epoch"] for r in rb] == [0, 1, 2]
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in ra] == \
           [{k: v for k, v in r.items() if k not in TIMING} for r in rb]
    assert (a / "steps.jsonl").read_text() == (b / "steps.jsonl").read_text()


class References(dict):
    """Each framework's run of a spec, never interrupted, made when first asked for."""

    def __init__(self, root: Path, mnist_dir: str) -> None:
        super().__init__()
        self.root, self.mnist_dir = root, mnist_dir

    def __getitem__(self, key: str | tuple[str, str]) -> Path:
        return super().__getitem__(key if isinstance(key, tuple) else (key, "lenet5"))

    def __missing__(self, key: tuple[str, str]) -> Path:
        framework, spec = key
        workdir = self.root / f"{framework}-{spec}"
        res = _run(_cmd(framework, workdir, self.mnist_dir, "--spec", spec))
        assert res.returncode == 0, res.stderr[-3000:]
        self[key] = workdir
        return workdir


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_dir) -> References:
    return References(tmp_path_factory.mktemp("reference"), mnist_dir)


@SLOW
@pytest.mark.parametrize("spec", ["lenet5", "lenet5_bn"])
@pytest.mark.parametrize("framework", PROGRAMS)
def test_sigkill_at_several_points_then_resume_is_bit_exact(tmp_path, mnist_dir, reference,
                                                           framework: str, spec: str) -> None:
    workdir = tmp_path / "run"
    metrics = workdir / "metrics.jsonl"
    resumed_from = []

    def start(*extra: str) -> subprocess.Popen:
        return subprocess.Popen(_cmd(framework, workdir, mnist_dir, "--spec", spec, *extra),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def resume() -> subprocess.Popen:
        resumed_from.append(_checkpoint_meta(workdir))
        return start("--resume")

    # 1: mid-epoch 0, as soon as the first checkpoint exists
    _kill_when(start(), lambda: _checkpoint_meta(workdir) is not None, "the first checkpoint")
    # 2: the moment an epoch's metrics line is written (its checkpoint may not be yet)
    lines = _lines(metrics)
    _kill_when(resume(), lambda: _lines(metrics) > lines, "an epoch's metrics line")
    # 3: a few checkpoints later, mid-epoch
    later = (_checkpoint_meta(workdir)["step"] + 14, 45)

    def far_enough() -> bool:
        meta = _checkpoint_meta(workdir)
        return meta["step"] >= min(later)

    _kill_when(resume(), far_enough, f"step {min(later)}")
    final = resume()
    assert final.wait(timeout=HANG) == 0, final.stderr.read()[-3000:]
    assert any(m["done"] > 0 for m in resumed_from), resumed_from  # resumed mid-epoch at least once
    _same_run(reference[framework, spec], workdir)


@pytest.mark.parametrize("framework", fast_only(PROGRAMS, "jax"))
def test_sigkill_of_a_population_then_resume_is_exact(tmp_path, mnist_dir, framework) -> None:
    """A population (seeds 1 and 3) killed right after its first checkpoint, which is held
    until the next step's loss is known, then resumed: each member's weights file and
    steps.jsonl byte for byte, and every metrics record (the training accuracy too) as the
    population never killed. The held checkpoint once shared its correct counts with the
    running epoch, which went on adding to them: a resumed train_accuracy of 0.5195 against
    0.517."""
    seeds = ("--seeds", "1,3")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _run(_cmd(framework, whole, mnist_dir, *seeds)).returncode == 0
    proc = subprocess.Popen(_cmd(framework, killed, mnist_dir, *seeds),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_when(proc, lambda: _checkpoint_meta(killed) is not None, "the first checkpoint")
    assert _checkpoint_meta(killed)["done"] > 0  # mid-epoch: a held checkpoint
    res = _run([*_cmd(framework, killed, mnist_dir, *seeds), "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("weights-seed-1.safetensors", "weights-seed-3.safetensors", "steps.jsonl"):
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert strip(read_jsonl(killed / "metrics.jsonl")) == strip(read_jsonl(whole / "metrics.jsonl"))


@SLOW
@pytest.mark.parametrize("framework", PROGRAMS)
def test_sigint_checkpoints_says_how_to_resume_and_resumes_exactly(tmp_path, mnist_dir,
                                                                  reference, framework) -> None:
    """A real SIGINT, sent by the run to itself at a step of epoch 1 (LENET_FAULT: the same
    step whatever the machine's load): exit 130, the checkpoint at that step, the command that
    continues, and the continued run is the run never stopped."""
    workdir = tmp_path / "run"
    proc = subprocess.run(_cmd(framework, workdir, mnist_dir), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=HANG,
                          env={**os.environ, "LENET_FAULT": f"SIGINT@{STOP_AT}"})
    stderr = proc.stderr
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    match = re.search(r"SIGINT: stopped at step (\d+) .*Continue with:\n  (.*--resume)", stderr,
                      re.S)
    assert match, stderr
    # the stop comes after the train call that holds STOP_AT (JAX trains several steps a call)
    assert STOP_AT <= int(match[1]) < 40 and _checkpoint_meta(workdir)["step"] == int(match[1])
    assert f"--workdir {workdir}" in match[2] and "lenet_" + framework in match[2]
    res = _run([*_cmd(framework, workdir, mnist_dir), "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    _same_run(reference[framework], workdir)


@SLOW
def test_jax_resume_with_steps_per_call_is_bit_exact(tmp_path, mnist_dir) -> None:
    """With --steps-per-call 4 a killed and resumed run repeats the same lax.scan chunks."""
    runs = {}
    for name in ("whole", "killed"):
        workdir = runs[name] = tmp_path / name
        cmd = _cmd("jax", workdir, mnist_dir, "--steps-per-call", "4")
        if name == "killed":
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
            _kill_when(proc, lambda w=workdir: (_checkpoint_meta(w) or {}).get("step", 0) >= 21,
                       "step 21")
            cmd = [*cmd, "--resume"]
        res = _run(cmd)
        assert res.returncode == 0, res.stderr[-3000:]
    _same_run(runs["whole"], runs["killed"])


@pytest.mark.parametrize("framework", fast_only(PROGRAMS, "torch"))
def test_diverging_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(
        tmp_path, mnist_dir, framework: str) -> None:
    workdir = tmp_path / "run"
    # one step per call, so that there is a checkpoint after every step (with K steps per
    # call, JAX's checkpoints fall on the calls' boundaries)
    per_call = ["--steps-per-call", "1"] if framework == "jax" else []
    res = _run([*_cmd(framework, workdir, mnist_dir), "--optimizer", "sgd", "--schedule",
                "constant", "--lr", "1e8", "--checkpoint-every", "1", *per_call])
    assert res.returncode == 3, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    match = re.search(r"error: the loss is (nan|inf|-inf) at step (\d+); run stopped.*"
                      r"the last good checkpoint, (\S+) \(step (\d+)\), is kept", res.stderr)
    assert match, res.stderr
    bad, kept = int(match[2]), int(match[4])
    assert Path(match[3]) == workdir / "checkpoint.safetensors"
    tensors, meta = load_checkpoint(workdir / "checkpoint.safetensors")
    assert meta["step"] == kept and kept <= bad
    assert all(np.all(np.isfinite(v)) for v in tensors.values())
    assert np.all(np.isfinite(tensors["progress.losses"]))
    assert not (workdir / "weights.safetensors").exists()
    assert not (workdir / "metrics.jsonl").exists()  # it diverged in epoch 0


@SLOW
@pytest.mark.parametrize("framework", PROGRAMS)
def test_damaged_checkpoint_is_one_clear_error(tmp_path, mnist_dir, reference,
                                               framework: str) -> None:
    workdir = tmp_path / "run"
    workdir.mkdir()
    raw = (reference[framework] / "checkpoint.safetensors").read_bytes()
    for damage, message in ((raw[: len(raw) // 2], "not a readable safetensors file"),
                            (raw[:8] + b"[" + raw[9:], "not a readable safetensors file")):
        (workdir / "checkpoint.safetensors").write_bytes(damage)
        res = _run([*_cmd(framework, workdir, mnist_dir), "--resume", "--epochs", "4"])
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
        assert f"error: {workdir / 'checkpoint.safetensors'}: {message}" in res.stderr


@SLOW
@pytest.mark.parametrize("framework", PROGRAMS)
def test_workdir_is_never_overwritten_by_surprise(tmp_path, mnist_dir, framework: str) -> None:
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    short = ["--train-size", "256", "--epochs", "1"]
    res = _run([*_cmd(framework, workdir, mnist_dir), *short])
    assert res.returncode == 2
    assert f"error: {workdir} is not empty; pass --resume" in res.stderr
    assert "--overwrite" in res.stderr
    res = _run([*_cmd(framework, workdir, mnist_dir), *short, "--resume"])
    assert res.returncode == 2 and "does not exist" in res.stderr
    res = _run([*_cmd(framework, workdir, mnist_dir), *short, "--overwrite", "--resume"])
    assert res.returncode == 2 and "contradict" in res.stderr
    res = _run([*_cmd(framework, workdir, mnist_dir), *short, "--overwrite"])
    assert res.returncode == 2 and "--overwrite: " in res.stderr and "holds no lenet run" in \
        res.stderr  # not a run's folder: nothing there is ours to delete
    assert sorted(p.name for p in workdir.iterdir()) == [".lenet.lock", "notes.txt"]
    (workdir / "notes.txt").unlink()
    assert _run([*_cmd(framework, workdir, mnist_dir), *short]).returncode == 0
    (workdir / "notes.txt").write_text("mine")
    res = _run([*_cmd(framework, workdir, mnist_dir), *short, "--overwrite"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert (workdir / "notes.txt").read_text() == "mine"  # only the run's own files go
    assert len(read_jsonl(workdir / "metrics.jsonl")) == 1
    res = _run([*_cmd(framework, workdir, mnist_dir), *short, "--resume", "--batch-size", "64"])
    assert res.returncode == 2 and "written with --batch-size 128, now 64" in res.stderr


@pytest.mark.parametrize("framework", fast_only(PROGRAMS, "torch"))
def test_ctrl_c_from_the_first_moment_is_one_line(tmp_path, mnist_dir, framework: str) -> None:
    """SIGINT while the framework imports, while the data loads: exit 130 with one line, never
    a traceback or an interrupt the framework swallows (JAX's garbage-collector callback
    ignored KeyboardInterrupt and trained on)."""
    for k, delay in enumerate((0.2, 1.0, 2.0)):
        proc = subprocess.Popen([*_cmd(framework, tmp_path / f"run{k}", mnist_dir)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=HANG)
        assert proc.returncode == 130, err[-2000:]
        assert "Traceback" not in err and "Exception ignored" not in err, err
        # one line; if training had begun, the checkpointed stop's (with the resume command)
        assert any(line.startswith("SIGINT: ") for line in err.splitlines()), err


def test_a_fault_names_its_variable_when_malformed(monkeypatch) -> None:
    """LENET_FAULT (the tests' exact-step signals): unset nothing; malformed one line naming it."""
    from lenet_train.errors import ConfigError
    from lenet_train.fault import planned

    monkeypatch.delenv("LENET_FAULT", raising=False)
    assert planned() is None
    monkeypatch.setenv("LENET_FAULT", "SIGTERM@7")
    assert (planned().signal, planned().step) == (signal.SIGTERM, 7)
    for bad in ("SIGINT", "SIGHUP@3", "SIGINT@0", "SIGINT@x"):
        monkeypatch.setenv("LENET_FAULT", bad)
        with pytest.raises(ConfigError, match=f"LENET_FAULT: must be SIGNAL@STEP .* got '{bad}'"):
            planned()
