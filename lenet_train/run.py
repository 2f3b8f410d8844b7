"""One training run as the loop sees it: its settings and data, the batches and images of each
epoch, the accounting of fetched results and epochs, signals, and stopping (a non-finite loss,
an interrupt) with the command that continues it. :mod:`lenet_train.setup` makes a Run;
:mod:`lenet_train.checkpoints` keeps its checkpoint."""

from __future__ import annotations

import argparse
import math
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from lenet_spec import Spec, save_weights
from lenet_train.checkpoints import Checkpoints, Position, State, settings
from lenet_train.cli import lr_at
from lenet_train.data import augment, epoch_order, prepare
from lenet_train.distributed import Layout
from lenet_train.errors import EXIT_DIVERGED, EXIT_INTERRUPTED, fail, stop_on_signals
from lenet_train.runlog import RunLog

WEIGHTS = "weights.safetensors"
"""The trained weights' file name in the workdir."""


@dataclass
class Run:
    """One training run's settings, data (NCHW float32, normalised) and log."""

    args: argparse.Namespace
    spec: Spec
    framework: str
    workdir: Path
    log: RunLog
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    steps_per_epoch: int
    total_steps: int
    started: float
    argv: list[str]
    init_weights: dict[str, np.ndarray] | None = None
    """Canonical weights from --init-weights, checked against the spec."""
    data: dict[str, Any] = field(default_factory=dict)
    """The dataset's name, sources, checksum state, normalisation and augmentation."""
    train_images: np.ndarray | None = None
    """The training images as uint8 (N, C, H, W), kept when they are augmented each epoch."""
    wall_before: float = 0.0
    """Seconds the run had already spent before it was resumed."""
    interrupted: str | None = None
    """The name of the signal (SIGINT, SIGTERM) that asked the run to stop, once one has."""
    layout: Layout = field(default_factory=Layout)
    """This process's place among the run's processes; only process 0 writes files."""
    any_process: Callable[[bool], bool] = bool
    """Whether a flag is set in any of the run's processes (a collective when several)."""
    checkpoints: Checkpoints = field(init=False)
    """The run's checkpoint: held, written, read back."""

    def __post_init__(self) -> None:
        self.checkpoints = Checkpoints(self.workdir, self.framework, self.args, self.spec,
                                       self.steps_per_epoch, self.layout.writer, self.wall_s,
                                       self.diverged, settings=settings(self.args, self.data),
                                       members=self.members)

    @property
    def members(self) -> int | None:
        """A population's size; None for a single run."""
        return None

    def wall_s(self) -> float:
        """Seconds the run has spent, in all its sessions."""
        return self.wall_before + time.perf_counter() - self.started

    def resume(self) -> tuple[State | None, Position]:
        """The state and position to start from: the checkpoint's on --resume, else none."""
        if not self.args.resume:
            return None, Position.start(self.members)
        state, pos, self.wall_before = self.checkpoints.load()
        written = state.meta.get("framework")
        if written != self.framework:
            dropout = any(layer.type.startswith("dropout") for layer in self.spec.layers)
            self.log.say(f"resuming a {written} checkpoint at step {pos.step}"
                         + ("; dropout masks from here on are this framework's" if dropout
                            else ""))
        return state, pos

    def lr_table(self) -> np.ndarray:
        """The learning rate of every step of the run (the schedule, precomputed)."""
        a = self.args
        return np.array([lr_at(a.schedule, a.lr, s, self.total_steps)
                         for s in range(self.total_steps)], dtype=np.float64)

    def epoch_batches(self, pos: Position) -> np.ndarray:
        """The (steps, batch) training indices of ``pos``'s epoch, cut where the run's steps
        end (counted from the step the epoch began at)."""
        order = epoch_order(len(self.train_x), self.args.batch_size, self.args.seed, pos.epoch)
        return order[: max(self.total_steps - (pos.step - pos.done), 0)]

    def epoch_images(self, epoch: int) -> np.ndarray | None:
        """The training images epoch ``epoch`` trains on, when --augment makes them differ
        from the run's ``train_x`` (else None)."""
        if self.train_images is None:
            return None
        images = augment(self.train_images, self.args.augment, self.args.seed, epoch)
        return prepare(images, self.spec, self.data["mean"], self.data["std"],
                       self.args.dataset)

    def account(self, pos: Position, losses: np.ndarray, correct: int, epoch_s: float,
                bar: Any) -> None:
        """Take the steps just fetched from the device into ``pos`` (stopping the run at a
        non-finite loss), write the held checkpoint once they confirm it, update ``bar``."""
        losses = np.asarray(losses, dtype=np.float32)
        if not np.all(np.isfinite(losses)):
            bar.close()  # the stop's message on a line of its own, not after the bar
        self.check_finite(losses, pos.step - len(losses))
        pos.losses = np.concatenate([pos.losses, losses])
        pos.correct += correct
        pos.epoch_s = epoch_s
        self.checkpoints.confirm()
        seen = pos.done * self.args.batch_size
        bar.set_postfix(loss=f"{np.mean(losses[-1]):.4f}",
                        acc=f"{np.mean(pos.correct) / seen:.4f}",
                        img_s=f"{seen * (self.members or 1) / max(epoch_s, 1e-9):,.0f}")
        bar.update(pos.done - bar.n)

    def end_epoch(self, pos: Position, test: tuple[float, float]) -> dict:
        """Log the epoch that ``pos`` has just finished (metrics.jsonl, steps.jsonl, the
        summary line) and return its record; a non-finite test loss stops the run."""
        if not math.isfinite(test[0]):
            self.diverged(f"the test loss is {test[0]} after step {pos.step}")
        if self.args.log_steps:
            self.log.steps(pos.step - pos.done, pos.losses.tolist())
        images = pos.done * self.args.batch_size
        record = {
            "epoch": pos.epoch, "step": pos.step,
            "train_loss": float(np.asarray(pos.losses, dtype=np.float64).mean()),
            "train_accuracy": pos.correct / images,
            "test_loss": test[0], "test_accuracy": test[1],
            "epoch_s": pos.epoch_s, "images_per_sec": images / max(pos.epoch_s, 1e-9),
            "wall_s": self.wall_s(),
            "lr": lr_at(self.args.schedule, self.args.lr, max(pos.step - 1, 0), self.total_steps),
        }
        if self.data:
            record["data"] = {"dataset": self.data["dataset"], "source": self.data["source"],
                              "checksum": self.data["checksum"]}
        self.log.epoch(record)
        return record

    def save_weights(self, state: State) -> None:
        """Write the trained weights (WORKDIR/weights.safetensors) and say where."""
        save_weights(self.workdir / WEIGHTS, state.weights, self.spec)
        self.log.say(f"weights: {self.workdir / WEIGHTS}")

    def stop_requested(self, at_report: bool) -> bool:
        """Whether to checkpoint and stop after this step. Several processes decide together,
        at report points only (all of them reach the same ones), so they stop after the same
        step whichever of them was signalled."""
        if not self.layout.distributed:
            return self.interrupted is not None
        return at_report and self.any_process(self.interrupted is not None)

    def check_finite(self, losses: np.ndarray, first_step: int) -> None:
        """Stop the run (exit 3) at the first non-finite loss among the steps from
        ``first_step``, naming that step and the last good checkpoint."""
        bad = np.flatnonzero(~np.isfinite(losses))
        if len(bad):
            self.diverged(f"the loss is {losses[bad[0]]} at step {first_step + int(bad[0])}")

    def diverged(self, what: str) -> NoReturn:
        if self.checkpoints.last_step is None:
            kept = "no checkpoint had been written yet"
        else:
            kept = (f"the last good checkpoint, {self.checkpoints.path} "
                    f"(step {self.checkpoints.last_step}), is kept; continue from it with a lower "
                    f"--lr: {self.resume_command()}")
        fail(f"{what}; run stopped, nothing after it was written; {kept}", EXIT_DIVERGED,
             everyone=True)

    def resume_command(self) -> str:
        """The command line that continues this run from its checkpoint."""
        argv = [a for a in self.argv if a not in ("--resume", "--overwrite")]
        if not any(a == "--workdir" or a.startswith("--workdir=") for a in argv):
            argv += ["--workdir", str(self.workdir)]
        command = shlex.join(["python", "-m", f"lenet_{self.framework}.train", *argv,
                              "--resume"])
        if self.layout.distributed:
            return (f"{command}\n  (start all {self.layout.process_count} processes again the "
                    "way they were started, each with --resume added; this is process 0's)")
        return command

    def watch_signals(self) -> None:
        """From now on SIGINT and SIGTERM ask the run to checkpoint and stop (a second one
        stops it at once)."""

        def handler(signum: int, frame: Any) -> None:
            self.interrupted = signal.Signals(signum).name
            stop_on_signals()  # a second one stops at once

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def stop_interrupted(self, pos: Position) -> NoReturn:
        """Say where the interrupted run stopped and how to continue it; exit 130."""
        if self.layout.writer:
            signalled = self.interrupted or "a signal to another process"
            print(f"{signalled}: stopped at step {pos.step} (epoch {pos.epoch}, batch "
                  f"{pos.done}); checkpoint {self.checkpoints.path}. Continue with:\n  "
                  f"{self.resume_command()}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
