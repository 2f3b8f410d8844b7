"""What both trainers do before and around their framework's steps: workdir, data, schedule."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from lenet_spec.atomic import atomic_write_bytes
from lenet_spec.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lenet_spec.cli import default_workdir, lr_at, total_steps
from lenet_spec.data import DataError, load_mnist, prepare
from lenet_spec.runlog import RunLog
from lenet_spec.spec import Spec
from lenet_spec.weights import WeightsError, check_weights, load_weights

CHECKPOINT = "checkpoint.safetensors"
WEIGHTS = "weights.safetensors"


@dataclass
class Run:
    """One training run's settings, data (NCHW float32, normalised) and log."""

    args: argparse.Namespace
    spec: Spec
    workdir: Path
    log: RunLog
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    steps_per_epoch: int
    total_steps: int
    started: float
    init_weights: dict[str, np.ndarray] | None = None
    """Canonical weights from --init-weights, checked against the spec."""

    def lr_table(self) -> np.ndarray:
        """The learning rate of every step of the run (the schedule, precomputed)."""
        a = self.args
        return np.array([lr_at(a.schedule, a.lr, s, self.total_steps)
                         for s in range(self.total_steps)], dtype=np.float64)

    def record(self, epoch: int, step: int, train: tuple[float, float], test: tuple[float, float],
               epoch_s: float, images: int) -> dict:
        """The metrics.jsonl record of one epoch."""
        return {
            "epoch": epoch, "step": step,
            "train_loss": train[0], "train_accuracy": train[1],
            "test_loss": test[0], "test_accuracy": test[1],
            "epoch_s": epoch_s, "images_per_sec": images / max(epoch_s, 1e-9),
            "wall_s": time.perf_counter() - self.started,
            "lr": lr_at(self.args.schedule, self.args.lr, max(step - 1, 0), self.total_steps),
        }


    def save_checkpoint(self, framework: str, weights: dict[str, np.ndarray],
                        optimizer: dict[str, np.ndarray], epoch: int, step: int,
                        **extra: Any) -> None:
        """Write WORKDIR/checkpoint.safetensors: canonical weights, optimizer state, position."""
        tensors = {f"model.{k}": v for k, v in weights.items()}
        tensors.update({f"optim.{k}": v for k, v in optimizer.items()})
        meta = {"framework": framework, "optimizer": self.args.optimizer, "epoch": epoch,
                "step": step, "spec": self.spec.to_dict(), **extra}
        save_checkpoint(self.workdir / CHECKPOINT, tensors, meta)

    def load_checkpoint(self, framework: str) -> tuple[dict, dict, dict[str, Any]]:
        """(canonical weights, optimizer tensors, metadata) of the checkpoint to resume; any
        problem (damaged, another framework, optimizer or spec) exits with one clear error."""
        path = self.workdir / CHECKPOINT
        try:
            tensors, meta = load_checkpoint(path)
        except CheckpointError as e:
            fail(str(e))
        if meta.get("framework") != framework:
            fail(f"{path}: a {meta.get('framework')} checkpoint; resume it with "
                 f"python -m lenet_{meta.get('framework')}.train")
        if meta.get("optimizer") != self.args.optimizer:
            fail(f"{path}: written with --optimizer {meta.get('optimizer')}, "
                 f"not {self.args.optimizer}")
        weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            check_weights(self.spec, weights)
        except WeightsError as e:
            fail(f"{path}: not a checkpoint of this --spec: {e}")
        optimizer = {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")}
        return weights, optimizer, meta


def fail(message: str) -> NoReturn:
    """Print one clear error and exit with status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def setup(args: argparse.Namespace, framework: str) -> Run:
    """Workdir, data and step counts; refuses to overwrite a run unless resuming."""
    started = time.perf_counter()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s")
    workdir = args.workdir or default_workdir(framework)
    if args.resume and not (workdir / CHECKPOINT).is_file():
        fail(f"--resume: {workdir / CHECKPOINT} does not exist")
    if not args.resume and (workdir / CHECKPOINT).exists():
        fail(f"{workdir} already holds a run; pass --resume to continue it or pick another "
             "--workdir")
    spec = args.spec
    try:
        train_images, train_y = load_mnist("train", args.data_dir)
        test_images, test_y = load_mnist("test", args.data_dir)
        train_x, test_x = prepare(train_images, spec), prepare(test_images, spec)
    except DataError as e:
        fail(str(e))
    if args.batch_size > len(train_x):
        fail(f"--batch-size {args.batch_size} is larger than the training set ({len(train_x)})")
    init_weights = None
    if args.init_weights:
        try:
            init_weights, _ = load_weights(args.init_weights)
            check_weights(spec, init_weights)
        except WeightsError as e:
            fail(f"--init-weights: {e}")
    log = RunLog(workdir, args.quiet)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["spec"] = spec.to_dict()
    atomic_write_bytes(workdir / "config.json", json.dumps(config, indent=2).encode())
    steps_per_epoch = len(train_x) // args.batch_size
    return Run(args, spec, workdir, log, train_x, train_y, test_x, test_y, steps_per_epoch,
               total_steps(args, steps_per_epoch), started, init_weights)
