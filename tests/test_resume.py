"""``--resume`` continues only the run that wrote the checkpoint, with the settings it started
with; a workdir serves one run at a time; --overwrite deletes only a run's files; bad positions,
empty splits and bad seeds are one line each, before anything is written."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import SLOW, fast_only, idx_split, one_line_error, run_program

from lenet_spec import PRESETS
from lenet_train import CheckpointError, Config
from lenet_train.checkpoints import check_position, check_resume, read_meta, settings
from lenet_train.cli import parser
from lenet_train.config import KEPT
from lenet_train.setup import LOCK
from lenet_train.state import Position

PROGRAMS = ("jax", "torch")
SHORT = ["--train-size", "256", "--batch-size", "64", "--epochs", "1", "--max-steps", "3",
         "--quiet"]


def _run(framework: str, workdir: Path, data: str, *extra: str) -> subprocess.CompletedProcess:
    return run_program(framework, *SHORT, "--data-dir", data, "--workdir", str(workdir), *extra)


def _one_line_error(res: subprocess.CompletedProcess, *parts: str) -> None:
    assert one_line_error(res, *parts).startswith("error: ")


@SLOW
@pytest.mark.parametrize("framework", PROGRAMS)
def test_resume_refuses_another_run_and_keeps_its_files(tmp_path, mnist_dir,
                                                        framework: str) -> None:
    """Another spec with the same tensor shapes, a changed --weight-decay or --loss: refused,
    naming flag, old and new value, before config.json is touched; a finished run says it is
    complete; --max-steps may grow, and the run goes on."""
    workdir = tmp_path / "run"
    assert _run(framework, workdir, mnist_dir).returncode == 0
    config = (workdir / "config.json").read_bytes()
    metrics = (workdir / "metrics.jsonl").read_bytes()
    res = _run(framework, workdir, mnist_dir, "--resume", "--spec", "lenet5_classic")
    _one_line_error(res, "written for spec 'lenet5', not --spec 'lenet5_classic'")
    res = _run(framework, workdir, mnist_dir, "--resume", "--weight-decay", "0.1")
    _one_line_error(res, "written with --weight-decay 0.0, now 0.1",
                    "(--epochs, --max-steps and --lr may change)")
    res = _run(framework, workdir, mnist_dir, "--resume", "--loss", "mse")
    _one_line_error(res, "written with --loss ce, now mse")
    res = _run(framework, workdir, mnist_dir, "--resume")
    _one_line_error(res, "the run is complete (step 3 of --max-steps 3)",
                    "resume with a larger --max-steps")
    assert (workdir / "config.json").read_bytes() == config
    assert (workdir / "metrics.jsonl").read_bytes() == metrics
    # what the advice says works: the rest of the epoch --max-steps had cut (4 steps)
    res = _run(framework, workdir, mnist_dir, "--resume", "--max-steps", "5", "--lr", "1e-3")
    assert res.returncode == 0, res.stderr[-2000:]
    assert read_meta(workdir / "checkpoint.safetensors")["step"] == 4
    res = _run(framework, workdir, mnist_dir, "--resume", "--max-steps", "5")
    _one_line_error(res, "the run is complete (epoch 1 of --epochs 1)",
                    "resume with more --epochs")  # its epochs are done
    res = _run(framework, workdir, mnist_dir, "--resume", "--epochs", "2", "--max-steps", "5",
               "--lr", "1e-3")
    assert res.returncode == 0, res.stderr[-2000:]
    stored = json.loads((workdir / "config.json").read_text())
    assert (stored["epochs"], stored["max_steps"], stored["lr"]) == (2, 5, 1e-3)
    assert read_meta(workdir / "checkpoint.safetensors")["step"] == 5


DATA = {"content": {"train": "a" * 16, "test": "b" * 16}}
LENET5 = PRESETS["lenet5"]
CHANGED = {"spec": PRESETS["lenet5_classic"], "optimizer": "sgd", "momentum": 0.5,
           "weight_decay": 1e-4, "schedule": "cosine", "loss": "mse", "dataset": "kmnist",
           "augment": ("crop",), "batch_size": 32, "seed": 7, "seeds": (0, 1, 2),
           "train_size": 1000, "precision": "bfloat16"}


@pytest.mark.parametrize("framework", fast_only(PROGRAMS, "torch"))
def test_a_run_cut_by_max_steps_extends_into_the_longer_run(tmp_path, mnist_dir,
                                                           framework: str) -> None:
    """20 steps, then --resume with --max-steps 40: the same weights, step losses and metrics
    as 40 steps straight (constant schedule: the schedule is laid over the run's length). An
    epoch cut by --max-steps is checkpointed where it stopped; the resume trains the rest of
    that epoch, not the next one's batches (6.4e-2 apart in the weights, lenet5_classic)."""
    flags = ["--spec", "lenet5_classic", "--train-size", "2560", "--batch-size", "64",
             "--epochs", "2", "--schedule", "constant", "--log-steps", "--quiet",
             "--data-dir", mnist_dir]
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    for workdir, steps in ((straight, 40), (extended, 20), (extended, 40)):
        res = run_program(framework, *flags, "--workdir", str(workdir), "--max-steps",
                          str(steps), *(["--resume"] if steps == 40 and workdir == extended
                                        else []))
        assert res.returncode == 0, res.stderr[-2000:]
    for name in ("weights.safetensors", "steps.jsonl"):
        assert (extended / name).read_bytes() == (straight / name).read_bytes(), name
    timing = {"epoch_s", "images_per_sec", "wall_s"}
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
    from lenet_train.runlog import read_jsonl

    assert strip(read_jsonl(extended / "metrics.jsonl")) == \
        strip(read_jsonl(straight / "metrics.jsonl"))


def _settings(spec=LENET5, data=DATA, **changes) -> dict:
    return settings(Config(**changes), spec, data)


@pytest.mark.parametrize("key", ["spec", *KEPT])
def test_every_kept_setting_is_compared(key: str) -> None:
    """Each setting a run keeps for life, changed alone, is refused naming it; the data's
    content too; epochs, max_steps and lr are not compared."""
    before = {"framework": "torch", "settings": _settings()}
    check_resume(Path("ck"), before, _settings(epochs=9, max_steps=5, lr=0.5))
    now = _settings(spec=CHANGED["spec"]) if key == "spec" else _settings(**{key: CHANGED[key]})
    with pytest.raises(CheckpointError) as e:
        check_resume(Path("ck"), before, now)
    flag = "--" + key.replace("_", "-")
    assert str(e.value).startswith("ck: written ") and (flag in str(e.value) or key == "spec")
    other = {"content": {"train": "a" * 16, "test": "c" * 16}}
    with pytest.raises(CheckpointError, match="written with data of SHA-256"):
        check_resume(Path("ck"), before, _settings(data=other))
    with pytest.raises(CheckpointError, match=r"damaged checkpoint metadata \(framework \['x'\]\)"):
        check_resume(Path("ck"), {**before, "framework": ["x"]}, _settings())


@pytest.mark.parametrize("pos, why", [
    (Position(0, 0, -5), "step -5"),
    (Position(0, 2, 10**9, np.zeros(2, np.float32)), "step 1000000000 is past where epoch 0"),
    (Position(2, 3, 1000, np.zeros(3, np.float32)), "step 1000 is past where epoch 2"),
    (Position(1, 2, 22, np.array([0.5, np.nan], np.float32)), "not a finite number"),
    (Position(1, 2, 22, np.zeros(3, np.float32)), "3 losses for 2 steps done"),
    (Position(0, 21, 21, np.zeros(21, np.float32)), "21 of 20 steps done"),
])
def test_an_edited_position_is_damage(pos: Position, why: str) -> None:
    assert why in (check_position(pos, 20) or "")


def test_positions_a_run_can_stand_at() -> None:
    # the last two: runs cut short by --max-steps (7 steps in epoch 0; 4 in each of two)
    for pos in (Position(), Position(1, 3, 23, np.ones(3, np.float32)), Position(3, 0, 60),
                Position(1, 0, 7), Position(2, 0, 8)):
        assert check_position(pos, 20) is None


def test_a_workdir_serves_one_run_at_a_time(tmp_path, mnist_dir) -> None:
    """While the lock is held (as a running program holds it), a second run is refused naming
    the holder; --resume without --workdir is one line too."""
    workdir = tmp_path / "busy"
    workdir.mkdir()
    fd = os.open(workdir / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"4242\n")
    try:
        res = _run("torch", workdir, mnist_dir)
        _one_line_error(res, f"{workdir}: another run is using it (process 4242)")
    finally:
        os.close(fd)
    assert sorted(p.name for p in workdir.iterdir()) == [LOCK]
    _one_line_error(run_program("torch", "--resume"), "--resume needs --workdir")


@SLOW
def test_overwrite_deletes_only_a_runs_files(tmp_path, mnist_dir) -> None:
    """A folder of someone else's files is not a run: --overwrite refuses it and deletes
    nothing. Temp files of killed writes of ours are cleared on --resume; others' stay."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"lr": 1}')
    (foreign / "metrics.jsonl").write_text("{}\n")
    res = _run("torch", foreign, mnist_dir, "--overwrite")
    _one_line_error(res, "--overwrite:", "holds no lenet run (it holds config.json, "
                    "metrics.jsonl)")
    assert (foreign / "config.json").read_text() == '{"lr": 1}'
    # a config.json with a spec and data keys is not enough to count as ours
    (foreign / "config.json").write_text('{"spec": {}, "data": {}}')
    _one_line_error(_run("torch", foreign, mnist_dir, "--overwrite"), "holds no lenet run")
    assert (foreign / "metrics.jsonl").read_text() == "{}\n"
    workdir = tmp_path / "run"
    assert _run("torch", workdir, mnist_dir, "--max-steps", "2").returncode == 0
    stale = [workdir / ".checkpoint.safetensors.k1ll3d.tmp", workdir / ".config.json.x.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    (workdir / ".notes.tmp").write_text("the user's")
    assert _run("torch", workdir, mnist_dir, "--resume", "--epochs", "2").returncode == 0
    assert not any(p.exists() for p in stale) and (workdir / ".notes.tmp").exists()


def test_empty_splits_and_bad_seeds_are_one_line(tmp_path, capsys) -> None:
    data = tmp_path / "data"
    idx_split(data, "train", 64)
    idx_split(data, "test", 0)
    res = run_program("torch", "--data-dir", str(data), "--workdir", str(tmp_path / "run"),
                      "--batch-size", "16")
    _one_line_error(res, "the mnist split there holds no records")
    for seed in ("-1", str(2**65)):
        with pytest.raises(SystemExit):
            parser("prog", "x").parse_args(["--seed", seed])
        assert f"--seed: must be in [0, 4294967295], got {seed}" in capsys.readouterr().err


@SLOW
def test_edited_checkpoints_are_one_clear_error(tmp_path, mnist_dir) -> None:
    """A position edited to a step its epoch cannot have, a NaN among its losses, a missing or
    mistyped random-generator state: one line naming the checkpoint and what is wrong, and
    nothing trained or written."""
    from lenet_train.checkpoints import load_checkpoint, save_checkpoint

    workdir = tmp_path / "run"
    assert _run("torch", workdir, mnist_dir, "--max-steps", "3", "--checkpoint-every", "2",
                "--epochs", "2").returncode == 0
    path = workdir / "checkpoint.safetensors"
    tensors, meta = load_checkpoint(path)
    cases = {
        "step": (lambda t, m: m.update(step=-5), "damaged checkpoint (position epoch"),
        "far": (lambda t, m: m.update(epoch=0, step=10**9), "damaged checkpoint (step"),
        "epoch": (lambda t, m: m.update(epoch=99), "the run is complete (epoch 99 of --epochs 2)"),
        "nan": (lambda t, m: (t.update({"progress.losses": np.array([np.nan], np.float32)}),
                              m.update(epoch=0, done=1, step=1)),
                "a saved loss or time is not a finite number"),
        "rng": (lambda t, m: t.pop("rng.torch_cpu"), "rng.torch_cpu is missing"),
        "rng_dtype": (lambda t, m: t.update({"rng.torch_cpu": t["rng.torch_cpu"]
                                             .astype(np.float32)}), "not a uint8 vector"),
    }
    for edit, message in cases.values():
        t, m = {k: v.copy() for k, v in tensors.items()}, json.loads(json.dumps(meta))
        edit(t, m)
        save_checkpoint(path, t, m)
        res = _run("torch", workdir, mnist_dir, "--max-steps", "6", "--epochs", "2",
                   "--resume")
        _one_line_error(res, f"{path}: ", message)
    save_checkpoint(path, tensors, meta)
    res = _run("torch", workdir, mnist_dir, "--max-steps", "6", "--epochs", "2", "--resume")
    assert res.returncode == 0, res.stderr[-2000:]


def test_batch_norm_at_batch_size_one_is_one_line(tmp_path, mnist_dir) -> None:
    """batch_norm after a linear layer at --batch-size 1 normalises one value per feature."""
    path = tmp_path / "bn_head.json"
    path.write_text(json.dumps({"name": "bn_head", "input_shape": [1, 28, 28], "layers": [
        {"type": "flatten"}, {"type": "linear", "out_features": 8},
        {"type": "batch_norm"}, {"type": "relu"}, {"type": "linear", "out_features": 10}]}))
    res = run_program("torch", "--spec", str(path), "--batch-size", "1", "--data-dir", mnist_dir,
                      "--workdir", str(tmp_path / "run"))
    _one_line_error(res, "--batch-size 1: bn_head's bn1 would normalise 1 value per channel")


HANDOFF = ["--train-size", "12800", "--batch-size", "128", "--epochs", "2", "--schedule",
           "constant", "--lr", "1e-3", "--log-steps", "--quiet"]


@SLOW
@pytest.mark.parametrize("spec, first, second", [("lenet5", "torch", "jax"),
                                                 ("lenet5_classic", "jax", "torch")])
def test_a_checkpoint_crosses_frameworks(tmp_path, mnist_dir, spec: str, first: str,
                                         second: str) -> None:
    """100 steps in one framework, then --resume in the other for 20, track 120 steps in the
    first: the 20 steps' losses within the parity battery's trajectory bound (1e-4 relative)
    and the final weights within its parameter bound (1e-4). The optimizer state (Adam's
    moments) crosses in canonical names; neither spec has dropout, whose masks the
    frameworks draw differently."""
    from lenet_parity.battery import TRAJ_LOSS_TOL, TRAJ_PARAM_TOL
    from lenet_spec import load_weights
    from lenet_train.runlog import read_jsonl

    def run(framework: str, workdir: Path, *extra: str) -> None:
        res = run_program(framework, *HANDOFF, "--spec", spec, "--data-dir", mnist_dir,
                          "--workdir", str(workdir), *extra)
        assert res.returncode == 0, res.stderr[-2000:]

    run(first, tmp_path / "whole", "--max-steps", "120")
    run(first, tmp_path / "handed", "--max-steps", "100")
    run(second, tmp_path / "handed", "--max-steps", "120", "--resume")
    whole = np.array([r["loss"] for r in read_jsonl(tmp_path / "whole" / "steps.jsonl")])
    handed = np.array([r["loss"] for r in read_jsonl(tmp_path / "handed" / "steps.jsonl")])
    assert len(whole) == len(handed) == 120
    np.testing.assert_array_equal(handed[:100], whole[:100])
    assert np.all(np.abs(handed[100:] - whole[100:]) <= TRAJ_LOSS_TOL * np.abs(whole[100:]))
    a, _ = load_weights(tmp_path / "whole" / "weights.safetensors")
    b, _ = load_weights(tmp_path / "handed" / "weights.safetensors")
    params = PRESETS[spec].param_shapes
    assert max(float(np.abs(a[k] - b[k]).max()) for k in params) <= TRAJ_PARAM_TOL
    assert read_meta(tmp_path / "handed" / "checkpoint.safetensors")["framework"] == second


def test_a_spec_too_large_for_memory_is_refused_with_the_estimate(tmp_path, mnist_dir) -> None:
    """200,000 channels on MNIST pass validation but cannot be trained here: refused before the
    data is read, with the estimate; lenet5's estimate counts its values exactly."""
    spec = PRESETS["lenet5"]
    assert spec.activations == 1024 + 2 * 4704 + 1176 + 2 * 1600 + 400 + 400 + 2 * 120 + \
        2 * 84 + 10
    from lenet_train.setup import memory_needed

    assert memory_needed(Config(), spec)["training"] == 4 * (12 * 61_706 + 3 * 128 *
                                                             spec.activations)
    path = tmp_path / "wide.json"
    path.write_text(json.dumps({"name": "wide", "input_shape": [1, 28, 28], "layers": [
        {"type": "conv", "out_channels": 200_000, "kernel_size": 3},
        {"type": "max_pool", "kernel_size": 26}, {"type": "flatten"},
        {"type": "linear", "out_features": 10}]}))
    res = run_program("torch", "--spec", str(path), "--data-dir", mnist_dir, "--workdir",
                      str(tmp_path / "run"))
    _one_line_error(res, "spec wide needs about 1,203.4 GiB at --batch-size 128 (runtime 1.5 GiB, "
                    "data 0.4 GiB, training 194.2 GiB, evaluation 1,007.3 GiB); this machine has")


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path,
                                                                    monkeypatch) -> None:
    import errno

    import lenet_torch
    from lenet_train import checkpoints
    from lenet_train.checkpoints import Checkpoints
    from lenet_train.state import State

    spec = PRESETS["lenet5"]
    ckpt = Checkpoints(tmp_path, "torch", spec, Config(), 4)
    state = State(lenet_torch.get_weights(lenet_torch.build(spec)), {}, {})
    ckpt.save(state, Position(0, 1, 1, np.ones((1, 1), np.float32)), 1.0)
    before = ckpt.path.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_checkpoint", full)
    with pytest.raises(CheckpointError) as e:
        ckpt.save(state, Position(0, 2, 2, np.ones((2, 1), np.float32)), 1.0)
    assert str(e.value) == (f"{ckpt.path}: cannot write the checkpoint (No space left on "
                            "device); the previous one, if any, is kept")
    assert ckpt.path.read_bytes() == before
