"""Data-parallel training through the real programs: simulated devices, several processes
(JAX's multi-controller runtime, torch DDP over gloo), and what happens when one is lost.

The layout must not change the run: each global batch and the batch order are the same for any
number of devices or processes, so after 30 SGD steps the parameters, per-step losses and every
metric agree with one process within 1e-5 (float32 all-reduces sum in another order; measured
≤ 6e-7). SGD, because Adam amplifies that order where its second moment is tiny (8e-5 in the
parameters after 30 steps on 8 simulated devices).

A smooth network (tanh and average pooling for ReLU and max pooling: lenet5_classic, and
lenet5_bn made smooth), since a network with kinks turns the layouts' summation orders into
different trainings (SHORT says how much). lenet5_bn too: its BatchNorm statistics are the
global batch's in every layout (JAX: the mean of a sharded batch is global; torch:
SyncBatchNorm, on CPU our GlobalBatchNorm). JAX's dropout masks are drawn for the global batch
from (seed, step), so the JAX runs keep lenet5_bn's dropout; torch ranks draw their own
slice's masks, so torch's run has dropout at p = 0. torch's convolutions round each image
differently with another batch size or thread count (oneDNN's blocking): torch's lenet5_bn
reference is one process on 2 threads, which splits each batch as two ranks do (measured:
4.8e-7 from the two ranks).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import HANG, SLOW, without_dropout

from lenet_spec import PRESETS, AvgPool, MaxPool, ReLU, Spec, Tanh, load_weights
from lenet_train.runlog import read_jsonl

PROGRAMS = {"jax": "lenet_jax.train", "torch": "lenet_torch.train"}
SHORT = ["--train-size", "2560", "--epochs", "2", "--max-steps", "30", "--log-steps",
         "--quiet", "--optimizer", "sgd", "--lr", "0.05", "--spec", "lenet5_classic"]
"""20 steps an epoch at batch 128, stopped after 30: one whole epoch and part of another, of a
smooth network (tanh, average pooling), whose runs stay within float32 rounding of each other
(measured, JAX on 8 simulated devices against 1: losses 2.4e-7 apart, weights 2.2e-8). A
network with kinks turns the layouts' different summation orders into a different training:
lenet5 (ReLU, max-pool) at this lr amplifies the first step's 2.4e-7 about tenfold every five
steps (losses 1.5e-3 apart by step 30, weights 7e-4), and lenet5_bn's weights ended 2.5e-4
apart at lr 0.02 though within rounding at 0.05: that tests the weather, not the layout."""
LONG = ["--train-size", "12800", "--epochs", "2", "--checkpoint-every", "20", "--quiet"]
"""200 steps, long enough to act on a running pair of processes."""
WAIT = HANG
"""Seconds a test waits for a process before calling it hung (not a speed bound)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same_training(a: Path, b: Path) -> None:
    (wa, _), (wb, _) = (load_weights(d / "weights.safetensors") for d in (a, b))
    assert max(float(np.max(np.abs(wa[k] - wb[k]))) for k in wa) <= 1e-5
    sa, sb = (np.array([r["loss"] for r in read_jsonl(d / "steps.jsonl")]) for d in (a, b))
    assert len(sa) == len(sb) == 30 and np.max(np.abs(sa - sb)) <= 1e-5
    ma, mb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [20, 30]
    for ra, rb in zip(ma, mb, strict=True):
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            assert abs(ra[key] - rb[key]) <= 1e-5, (key, ra[key], rb[key])


def _cmd(framework: str, mnist_dir: str, workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", PROGRAMS[framework], "--data-dir", mnist_dir,
            "--workdir", str(workdir), *extra]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _start_pair(framework: str, mnist_dir: str, workdirs: tuple[Path, Path],
                *extra: str, fault: str | None = None) -> list[subprocess.Popen]:
    """Processes 0 and 1 of a two-process run, started directly (JAX: the coordinator flags;
    torch: the environment torchrun would set), each with its own --workdir; ``fault``: the
    LENET_FAULT of process 1 (a signal it sends itself at a step)."""
    port = str(_free_port())
    procs = []
    for i, workdir in enumerate(workdirs):
        if framework == "jax":
            cmd = _cmd("jax", mnist_dir, workdir, *extra, "--coordinator", f"127.0.0.1:{port}",
                       "--num-processes", "2", "--process-id", str(i))
            env = _env()
        else:
            cmd = _cmd("torch", mnist_dir, workdir, *extra)
            env = _env(RANK=str(i), LOCAL_RANK=str(i), WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        if fault and i == 1:
            env["LENET_FAULT"] = fault
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=WAIT)
    return proc.returncode, err


class OneProcess(dict):
    """The 30 SGD steps of SHORT in one process on one device, per framework (and spec
    arguments), run when first asked for."""

    def __init__(self, root: Path, mnist_dir: str) -> None:
        super().__init__()
        self.root, self.mnist_dir = root, mnist_dir

    def __missing__(self, key: str | tuple[str, ...]) -> Path:
        framework, *extra = (key,) if isinstance(key, str) else key
        workdir = self.root / f"{framework}-{len(self)}"
        res = subprocess.run(_cmd(framework, self.mnist_dir, workdir, *SHORT, *extra),
                             capture_output=True, text=True, timeout=HANG,
                             env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=1"))
        assert res.returncode == 0, res.stderr[-3000:]
        self[key] = workdir
        return workdir


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, mnist_dir) -> OneProcess:
    return OneProcess(tmp_path_factory.mktemp("one"), mnist_dir)


def smooth(spec: Spec) -> Spec:
    """``spec`` with tanh for every ReLU and average for every max pooling (see SHORT)."""
    layers = tuple(Tanh() if isinstance(layer, ReLU) else
                   AvgPool(layer.kernel_size, layer.stride) if isinstance(layer, MaxPool)
                   else layer for layer in spec.layers)
    return Spec(f"{spec.name}_smooth", spec.input_shape, layers)


@pytest.fixture(scope="module")
def bn_specs(tmp_path_factory) -> dict[str, tuple[str, ...]]:
    """Each framework's ``--spec`` arguments for lenet5_bn made smooth (see SHORT; torch's
    without dropout, see the module's docstring)."""
    folder = tmp_path_factory.mktemp("spec")
    specs = {"jax": smooth(PRESETS["lenet5_bn"]),
             "torch": smooth(without_dropout(PRESETS["lenet5_bn"]))}
    for framework, spec in specs.items():
        (folder / f"{framework}.json").write_text(spec.to_json())
    return {framework: ("--spec", str(folder / f"{framework}.json")) for framework in specs}


REFERENCE_THREADS = {"jax": (), "torch": ("--threads", "2")}
"""Extra flags of the one-process reference for lenet5_bn (see the module's docstring)."""


@SLOW
def test_jax_on_8_simulated_devices_matches_1(tmp_path, mnist_dir, one_process) -> None:
    """Each global batch split over a 1-D mesh of 8 simulated CPU devices in one process."""
    res = subprocess.run(_cmd("jax", mnist_dir, tmp_path / "d8", *SHORT), capture_output=True,
                         text=True, timeout=HANG,
                         env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_training(tmp_path / "d8", one_process["jax"])


@SLOW
def test_jax_batch_norm_and_dropout_on_8_simulated_devices_match_1(tmp_path, mnist_dir,
                                                                  one_process, bn_specs) -> None:
    spec = bn_specs["jax"]
    res = subprocess.run(_cmd("jax", mnist_dir, tmp_path / "d8", *SHORT, *spec),
                         capture_output=True, text=True, timeout=HANG,
                         env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_training(tmp_path / "d8", one_process[("jax", *spec)])


@SLOW
def test_jax_batch_must_split_over_the_devices(tmp_path, mnist_dir) -> None:
    res = subprocess.run(_cmd("jax", mnist_dir, tmp_path / "w", "--batch-size", "100"),
                         capture_output=True, text=True, timeout=HANG,
                         env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "error: --batch-size 100 does not split evenly over 8 devices" in res.stderr


@SLOW
@pytest.mark.parametrize("framework", PROGRAMS)
def test_two_processes_match_one_and_only_process_0_writes(tmp_path, mnist_dir, one_process,
                                                           framework: str) -> None:
    """JAX: two processes on 127.0.0.1 joined by jax.distributed (CPU collectives over gloo).
    torch: two gloo ranks with DistributedDataParallel. Process 1 is given its own --workdir,
    which must never be created, and prints nothing (not even the data lines)."""
    workdirs = (tmp_path / "p0", tmp_path / "p1")
    loud = [a for a in SHORT if a != "--quiet"]
    results = [_finish(p) for p in _start_pair(framework, mnist_dir, workdirs, *loud)]
    for rc, err in results:
        assert rc == 0, err[-3000:]
    assert not workdirs[1].exists()
    assert "MNIST train from" in results[0][1]
    assert results[1][1].strip() == "", results[1][1]  # the other process prints nothing
    _assert_same_training(workdirs[0], one_process[framework])


@SLOW
@pytest.mark.parametrize("framework", PROGRAMS)
def test_two_processes_match_one_with_batch_norm(tmp_path, mnist_dir, one_process, bn_specs,
                                                 framework: str) -> None:
    spec = bn_specs[framework]
    workdirs = (tmp_path / "p0", tmp_path / "p1")
    results = [_finish(p) for p in _start_pair(framework, mnist_dir, workdirs, *SHORT, *spec)]
    for rc, err in results:
        assert rc == 0, err[-3000:]
    _assert_same_training(workdirs[0],
                          one_process[(framework, *spec, *REFERENCE_THREADS[framework])])


@SLOW
def test_torchrun_launches_the_same_training(tmp_path, mnist_dir, one_process) -> None:
    """The documented launch: ``torchrun --standalone --nproc-per-node 2 -m lenet_torch.train``."""
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "lenet_torch.train", "--data-dir",
                          mnist_dir, "--workdir", str(tmp_path / "tr"), *SHORT],
                         capture_output=True, text=True, timeout=HANG, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_training(tmp_path / "tr", one_process["torch"])


@SLOW
@pytest.mark.parametrize("framework", PROGRAMS)
def test_unreachable_coordinator_gives_up_with_one_error(tmp_path, mnist_dir,
                                                         framework: str) -> None:
    """Process 1 started alone: nobody listens at the coordinator's port."""
    port = str(_free_port())
    if framework == "jax":
        cmd = _cmd("jax", mnist_dir, tmp_path / "w", "--dist-timeout", "3", "--coordinator",
                   f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1")
        env = _env()
    else:
        cmd = _cmd("torch", mnist_dir, tmp_path / "w", "--dist-timeout", "3")
        env = _env(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=WAIT, env=env)
    assert res.returncode == 4, res.stderr[-3000:]
    assert "did not all meet within --dist-timeout 3 s" in res.stderr
    assert f"127.0.0.1:{port}" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "w").exists()


@SLOW
@pytest.mark.parametrize("framework", PROGRAMS)
def test_a_lost_process_stops_the_other_with_one_error(tmp_path, mnist_dir,
                                                       framework: str) -> None:
    """Process 1 is killed (SIGKILL, which it sends itself after step 30) mid-run; process 0
    must stop on its own, not hang."""
    procs = _start_pair(framework, mnist_dir, (tmp_path / "p0", tmp_path / "p1"), *LONG,
                        fault="SIGKILL@30")
    assert procs[1].wait(timeout=WAIT) == -signal.SIGKILL
    rc, err = _finish(procs[0])
    assert rc == 4, err[-3000:]
    assert "error: process 0 of 2: lost contact with the other processes" in err
    assert "Traceback" not in err


@SLOW
@pytest.mark.parametrize("framework", PROGRAMS)
def test_a_signal_to_one_process_stops_both_after_the_same_step(tmp_path, mnist_dir,
                                                               framework: str) -> None:
    """SIGTERM to process 1 alone (sent by itself after step 30): both checkpoint-and-stop
    after the same step (exit 130), process 0 says how to continue, and the pair resumes to the
    end."""
    workdir = tmp_path / "run"
    procs = _start_pair(framework, mnist_dir, (workdir, workdir), *LONG, fault="SIGTERM@30")
    (rc0, err0), (rc1, err1) = (_finish(p) for p in procs)
    assert rc0 == rc1 == 130, (err0[-2000:], err1[-2000:])
    assert "a signal to another process: stopped at step" in err0 and "--resume" in err0
    assert "Traceback" not in err0 + err1
    resumed = [_finish(p) for p in _start_pair(framework, mnist_dir, (workdir, workdir),
                                                *LONG, "--resume")]
    for rc, err in resumed:
        assert rc == 0, err[-3000:]
    assert [r["step"] for r in read_jsonl(workdir / "metrics.jsonl")] == [100, 200]


@pytest.mark.parametrize("argv, message", [
    (["--coordinator", "127.0.0.1:1234"], "--coordinator, --num-processes and --process-id go "
                                          "together"),
    (["--coordinator", "127.0.0.1", "--num-processes", "2", "--process-id", "0"],
     "--coordinator must be HOST:PORT, got '127.0.0.1'"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id must be in 0 … 1, got 2"),
    (["--coordinator", "h:1", "--num-processes", "0", "--process-id", "0"],
     "--num-processes must be at least 1, got 0"),
])
def test_bad_distributed_flags_are_one_error(argv, message, capsys) -> None:
    from lenet_jax.train import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
