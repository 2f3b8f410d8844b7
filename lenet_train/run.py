"""One training run as the loop sees it: its settings and data, the batches and images of each
epoch, the accounting of fetched results and epochs, signals, and the errors that stop it (a
non-finite loss, an interrupt) with the way to continue. :mod:`lenet_train.setup` makes a Run.

A single run and a population (``seeds``) are the same object: a single run is a run of one
member. Losses are (steps, members) and correct counts (members,) in both; what differs is
only what is written (a single run's metrics record, or a record per member and a summary;
one weights file, or one per member) and the batches handed to the trainer ((steps, batch)
indices for a single run's data-parallel step, (steps, members, batch) for a population's).
"""

from __future__ import annotations

import math
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lenet_spec import Spec, save_weights
from lenet_train.checkpoints import Checkpoints
from lenet_train.config import Config
from lenet_train.data import augment, epoch_order, prepare
from lenet_train.distributed import Layout
from lenet_train.errors import Diverged, Interrupted, NonFinite
from lenet_train.runlog import RunLog
from lenet_train.schedule import lr_at
from lenet_train.state import Position, State

WEIGHTS = "weights.safetensors"
"""The trained weights' file name in the workdir (a single run's)."""

MEMBER_WEIGHTS = "weights-seed-{seed}.safetensors"
"""A population member's trained weights' file name in the workdir."""


def member_weights(workdir: Path, seed: int) -> Path:
    """Where the member of seed ``seed`` writes its trained weights."""
    return workdir / MEMBER_WEIGHTS.format(seed=seed)


def mean_sd(values: np.ndarray) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return float(values.mean()), sd


@dataclass
class Run:
    """One training run's settings, data (NCHW float32, normalised), log and checkpoint."""

    spec: Spec
    config: Config
    framework: str
    workdir: Path
    log: RunLog
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    steps_per_epoch: int
    total_steps: int
    checkpoints: Checkpoints
    started: float = field(default_factory=time.perf_counter)
    layout: Layout = field(default_factory=Layout)
    """This process's place among the run's processes; only process 0 writes files."""
    any_process: Callable[[bool], bool] = bool
    """Whether a flag is set in any of the run's processes (a collective when several)."""
    argv: list[str] | None = None
    """The program's command line (None: called from Python), for the way to continue."""
    init_weights: dict[str, np.ndarray] | None = None
    """Canonical weights from init_weights, checked against the spec."""
    data: dict[str, Any] = field(default_factory=dict)
    """The dataset's name, sources, checksum state, normalisation and augmentation."""
    train_images: np.ndarray | None = None
    """The training images as uint8 (N, C, H, W), kept when they are augmented each epoch."""
    restore: State | None = None
    """On resume, the checkpoint's state (checked); else None."""
    start: Position = field(default_factory=Position)
    """Where the run starts: the checkpoint's position on resume."""
    wall_before: float = 0.0
    """Seconds the run had already spent before it was resumed."""
    interrupted: str | None = None
    """The name of the signal (SIGINT, SIGTERM) that asked the run to stop, once one has."""

    @property
    def population(self) -> bool:
        """Whether this is a population (``seeds``): a record and a weights file per member."""
        return self.config.seeds is not None

    @property
    def seeds(self) -> tuple[int, ...]:
        """The members' seeds (a single run's is its seed)."""
        return self.config.seeds if self.config.seeds is not None else (self.config.seed,)

    def resuming(self) -> str | None:
        """On resume, the line that says where the run goes on from (None for a fresh run)."""
        if self.restore is None:
            return None
        pos, written = self.start, self.restore.meta.get("framework")
        where = f"step {pos.step} (epoch {pos.epoch}, batch {pos.done})"
        if written == self.framework:
            return f"resuming at {where} from {self.checkpoints.path}"
        dropout = any(layer.type.startswith("dropout") for layer in self.spec.layers)
        return (f"resuming a {written} checkpoint at {where}"
                + ("; dropout masks from here on are this framework's" if dropout else ""))

    def wall_s(self) -> float:
        """Seconds the run has spent, in all its sessions."""
        return self.wall_before + time.perf_counter() - self.started

    def lr(self, step: int) -> float:
        """The learning rate of ``step`` (0-based; the schedule laid over the run's length)."""
        return lr_at(self.config.schedule, self.config.lr, step, self.total_steps)

    def lr_after(self, step: int) -> float:
        """The learning rate of the last step before ``step``."""
        return lr_at(self.config.schedule, self.config.lr, max(step - 1, 0), self.total_steps)

    def epoch_batches(self, pos: Position) -> np.ndarray:
        """The training indices of ``pos``'s epoch, cut where the run's steps end (counted
        from the step the epoch began at): (steps, batch) for a single run, (steps, members,
        batch) for a population, member m's those of a single run at its seed."""
        orders = [epoch_order(len(self.train_x), self.config.batch_size, seed, pos.epoch)
                  for seed in self.seeds]
        order = np.stack(orders, axis=1) if self.population else orders[0]
        return order[: max(self.total_steps - (pos.step - pos.done), 0)]

    def epoch_images(self, epoch: int) -> np.ndarray | None:
        """The training images epoch ``epoch`` trains on, when augmentation makes them differ
        from the run's ``train_x`` (else None)."""
        if self.train_images is None:
            return None
        images = augment(self.train_images, self.config.augment, self.config.seed, epoch)
        return prepare(images, self.spec, self.data["mean"], self.data["std"],
                       self.config.dataset)

    def account(self, pos: Position, losses: Any, correct: Any, epoch_s: float,
                bar: Any) -> None:
        """Take the steps just fetched from the device (losses (steps,) or (steps, members),
        correct counts) into ``pos``, update ``bar``; :class:`NonFinite` at a non-finite
        loss."""
        members = len(self.seeds)
        losses = np.asarray(losses, dtype=np.float32).reshape(-1, members)
        bad = np.argwhere(~np.isfinite(losses))
        if len(bad):
            bar.close()  # the stop's message on a line of its own, not after the bar
            step, m = (int(i) for i in bad[0])
            whose = f" of seed {self.seeds[m]}" if self.population else ""
            raise NonFinite(f"the loss{whose} is {losses[step, m]} at step "
                            f"{pos.step - len(losses) + step}")
        pos.losses = np.concatenate([pos.losses, losses])
        pos.correct = pos.correct + np.asarray(correct, dtype=np.int64).reshape(members)
        pos.epoch_s = epoch_s
        seen = pos.done * self.config.batch_size
        bar.set_postfix(loss=f"{np.mean(losses[-1]):.4f}",
                        acc=f"{np.mean(pos.correct) / seen:.4f}",
                        img_s=f"{seen * members / max(epoch_s, 1e-9):,.0f}")
        bar.update(pos.done - bar.n)

    def end_epoch(self, pos: Position, test: tuple[Any, Any]) -> list[dict]:
        """Log the epoch that ``pos`` has just finished (metrics.jsonl, steps.jsonl, the
        summary line) and return its records: a single run's record, or a record per member
        and the summary. :class:`NonFinite` at a non-finite test loss."""
        test_loss, test_acc = (np.asarray(t, dtype=np.float64).reshape(-1) for t in test)
        for m, value in enumerate(test_loss):
            if not math.isfinite(value):
                whose = f" of seed {self.seeds[m]}" if self.population else ""
                raise NonFinite(f"the test loss{whose} is {value} after step {pos.step}")
        first = pos.step - pos.done
        if self.config.log_steps:
            if self.population:
                self.log.member_steps(first, list(self.seeds), pos.losses)
            else:
                self.log.steps(first, pos.losses[:, 0].tolist())
        images = pos.done * self.config.batch_size
        losses = np.asarray(pos.losses, dtype=np.float64)
        lr = self.lr_after(pos.step)
        data = ({"dataset": self.data["dataset"], "source": self.data["source"],
                 "checksum": self.data["checksum"]} if self.data else None)
        if not self.population:
            record = {
                "epoch": pos.epoch, "step": pos.step,
                "train_loss": float(losses[:, 0].mean()),
                "train_accuracy": int(pos.correct[0]) / images,
                "test_loss": float(test_loss[0]), "test_accuracy": float(test_acc[0]),
                "epoch_s": pos.epoch_s, "images_per_sec": images / max(pos.epoch_s, 1e-9),
                "wall_s": self.wall_s(), "lr": lr,
            }
            if data:
                record["data"] = data
            self.log.epoch(record)
            return [record]
        train_loss = losses.mean(axis=0)
        train_acc = np.asarray(pos.correct, dtype=np.float64) / images
        members = [{"epoch": pos.epoch, "step": pos.step, "seed": seed,
                    "train_loss": float(train_loss[m]), "train_accuracy": float(train_acc[m]),
                    "test_loss": float(test_loss[m]), "test_accuracy": float(test_acc[m]),
                    "lr": lr} for m, seed in enumerate(self.seeds)]
        summary: dict = {"epoch": pos.epoch, "step": pos.step, "seeds": list(self.seeds),
                         "members": len(self.seeds)}
        for name, values in (("train_loss", train_loss), ("train_accuracy", train_acc),
                             ("test_loss", test_loss), ("test_accuracy", test_acc)):
            summary[name], summary[f"{name}_sd"] = mean_sd(values)
        summary.update({"epoch_s": pos.epoch_s,
                        "images_per_sec": images * len(self.seeds) / max(pos.epoch_s, 1e-9),
                        "wall_s": self.wall_s(), "lr": lr})
        if data:
            summary["data"] = data
        self.log.population_epoch(members, summary)
        return [*members, summary]

    def weights_files(self) -> list[Path]:
        """Where the trained weights go: WORKDIR/weights.safetensors, or a population's
        WORKDIR/weights-seed-S.safetensors per member."""
        if not self.population:
            return [self.workdir / WEIGHTS]
        return [member_weights(self.workdir, seed) for seed in self.seeds]

    def save_weights(self, state: State) -> None:
        """Write the trained weights (:meth:`weights_files`) and say where."""
        files = self.weights_files()
        for m, path in enumerate(files):
            weights = (state.weights if not self.population
                       else {k: v[m] for k, v in state.weights.items()})
            save_weights(path, weights, self.spec)
        self.log.say(f"weights: {files[0]}" + (f" … {files[-1].name} ({len(files)} files)"
                                               if len(files) > 1 else ""))

    def stop_requested(self, at_report: bool) -> bool:
        """Whether to checkpoint and stop after this step. Several processes decide together,
        at report points only (all of them reach the same ones), so they stop after the same
        step whichever of them was signalled."""
        if not self.layout.distributed:
            return self.interrupted is not None
        return at_report and self.any_process(self.interrupted is not None)

    def diverged(self, what: str) -> Diverged:
        """The error that stops the run at a non-finite ``what``, naming the last good
        checkpoint and how to continue from it."""
        last = self.checkpoints.last_step
        if last is None:
            kept = "no checkpoint had been written yet"
        else:
            kept = (f"the last good checkpoint, {self.checkpoints.path} (step {last}), is kept; "
                    f"continue from it with a lower --lr: {self.resume_command()}")
        return Diverged(f"{what}; run stopped, nothing after it was written; {kept}",
                        everyone=True)

    def interrupted_at(self, pos: Position) -> Interrupted:
        """The error that ends a run stopped by a signal after its checkpoint at ``pos``: where
        it stopped and how to continue (said by process 0 alone)."""
        if not self.layout.writer:
            return Interrupted("", everyone=True)
        signalled = self.interrupted or "a signal to another process"
        return Interrupted(f"{signalled}: stopped at step {pos.step} (epoch {pos.epoch}, batch "
                           f"{pos.done}); checkpoint {self.checkpoints.path}. Continue with:\n  "
                           f"{self.resume_command()}", everyone=True)

    def resume_command(self) -> str:
        """The command line (or, from Python, the call) that continues this run from its
        checkpoint."""
        if self.argv is None:
            return (f"lenet_{self.framework}.fit(spec, config.replace(workdir="
                    f"{str(self.workdir)!r}, resume=True))")
        argv = [a for a in self.argv if a not in ("--resume", "--overwrite")]
        if not any(a == "--workdir" or a.startswith("--workdir=") for a in argv):
            argv += ["--workdir", str(self.workdir)]
        command = shlex.join(["python", "-m", f"lenet_{self.framework}.train", *argv,
                              "--resume"])
        if self.layout.distributed:
            return (f"{command}\n  (start all {self.layout.process_count} processes again the "
                    "way they were started, each with --resume added; this is process 0's)")
        return command

    @contextmanager
    def watching_signals(self) -> Iterator[None]:
        """While training: SIGINT and SIGTERM ask the run to checkpoint and stop; a second one
        goes to the handlers that were there before (a program's stops it at once; Python's
        default raises KeyboardInterrupt). Only in the main thread, where Python runs
        signal handlers."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, frame: Any) -> None:
            self.interrupted = signal.Signals(signum).name
            for s, h in previous.items():
                signal.signal(s, h)

        for s in previous:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
