"""What both trainers do before and around their framework's steps: workdir, data, schedule,
checkpoints and where a run stands, signals, and stopping on a non-finite loss."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from lenet_spec import (
    Spec,
    WeightsError,
    atomic_write_bytes,
    check_weights,
    fitting,
    load_weights,
    misfit,
)
from lenet_train import datasets
from lenet_train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lenet_train.cli import default_workdir, lr_at, total_steps
from lenet_train.data import DataError, augment, epoch_order, prepare
from lenet_train.distributed import Layout, active, exit_now
from lenet_train.runlog import RunLog, log_to_stderr

CHECKPOINT = "checkpoint.safetensors"
WEIGHTS = "weights.safetensors"
RUN_FILES = ("config.json", "metrics.jsonl", "steps.jsonl", CHECKPOINT, WEIGHTS)
"""What a run writes in its workdir (and what --overwrite deletes)."""

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


@dataclass
class Position:
    """Where a run stands: the epoch, the steps of it done, the optimizer steps done in all,
    and the epoch's results so far (per-step losses, correct predictions, seconds)."""

    epoch: int = 0
    done: int = 0
    step: int = 0
    losses: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    correct: int = 0
    epoch_s: float = 0.0


@dataclass
class State:
    """A framework's training state as named numpy arrays: canonical weights (torch's
    ``state_dict`` names and layouts), the optimizer's tensors, RNG state, and JSON-able extras
    (torch's param groups; on load, the whole checkpoint's metadata)."""

    weights: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray]
    rng: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


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
    last_checkpoint_step: int | None = None
    interrupted: str | None = None
    """The name of the signal (SIGINT, SIGTERM) that asked the run to stop, once one has."""
    held: tuple[State, Position] | None = None
    """A due checkpoint kept in memory until the loss of its weights' next step is known
    finite, so that the checkpoint on disk is always one that trains on."""
    layout: Layout = field(default_factory=Layout)
    """This process's place among the run's processes; only process 0 writes files."""
    any_process: Callable[[bool], bool] = bool
    """Whether a flag is set in any of the run's processes (a collective when several)."""

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

    def checkpoint_due(self, before: int, after: int) -> bool:
        """Whether the steps ``before`` → ``after`` crossed a multiple of --checkpoint-every."""
        every = self.args.checkpoint_every
        return bool(every) and before // every != after // every

    def account(self, pos: Position, losses: np.ndarray, correct: int, epoch_s: float,
                bar: Any) -> None:
        """Take the steps just fetched from the device into ``pos`` (stopping the run at a
        non-finite loss), write the held checkpoint once they confirm it, update ``bar``."""
        losses = np.asarray(losses, dtype=np.float32)
        self.check_finite(losses, pos.step - len(losses))
        pos.losses = np.concatenate([pos.losses, losses])
        pos.correct += correct
        pos.epoch_s = epoch_s
        if self.held is not None:
            self.save_checkpoint(*self.held)
        seen = pos.done * self.args.batch_size
        bar.set_postfix(loss=f"{losses[-1]:.4f}", acc=f"{pos.correct / seen:.4f}",
                        img_s=f"{seen / max(epoch_s, 1e-9):,.0f}")
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
            "wall_s": self.wall_before + time.perf_counter() - self.started,
            "lr": lr_at(self.args.schedule, self.args.lr, max(pos.step - 1, 0), self.total_steps),
        }
        if self.data:
            record["data"] = {"dataset": self.data["dataset"], "source": self.data["source"],
                              "checksum": self.data["checksum"]}
        self.log.epoch(record)
        return record

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
        if self.last_checkpoint_step is None:
            kept = "no checkpoint had been written yet"
        else:
            kept = (f"the last good checkpoint, {self.workdir / CHECKPOINT} "
                    f"(step {self.last_checkpoint_step}), is kept; continue from it with a lower "
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
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def stop_interrupted(self, pos: Position) -> NoReturn:
        """Say where the interrupted run stopped and how to continue it; exit 130."""
        if self.layout.writer:
            signalled = self.interrupted or "a signal to another process"
            print(f"{signalled}: stopped at step {pos.step} (epoch {pos.epoch}, batch "
                  f"{pos.done}); checkpoint {self.workdir / CHECKPOINT}. Continue with:\n  "
                  f"{self.resume_command()}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)

    def hold_checkpoint(self, state: State, pos: Position) -> None:
        """Keep a copy of ``state``; :meth:`account` writes it once the next step's loss,
        computed from these weights, is known to be finite."""
        copy = lambda d: {k: np.array(v, copy=True) for k, v in d.items()}  # noqa: E731
        self.held = (State(copy(state.weights), copy(state.optimizer), copy(state.rng),
                           dict(state.meta)), replace(pos))

    def save_checkpoint(self, state: State, pos: Position) -> None:
        """Write WORKDIR/checkpoint.safetensors atomically now: canonical weights, optimizer
        state, position and partial epoch results, RNG state, spec and settings."""
        self.held = None
        bad = [k for k, v in state.weights.items() if not np.all(np.isfinite(v))]
        if bad:
            self.diverged(f"weight {bad[0]!r} is not finite after step {pos.step}")
        tensors = {f"model.{k}": v for k, v in state.weights.items()}
        tensors.update({f"optim.{k}": v for k, v in state.optimizer.items()})
        tensors.update({f"rng.{k}": v for k, v in state.rng.items()})
        tensors["progress.losses"] = np.asarray(pos.losses, dtype=np.float32)
        a = self.args
        meta = {"framework": self.framework, "optimizer": a.optimizer, "spec": self.spec.to_dict(),
                "epoch": pos.epoch, "done": pos.done, "step": pos.step, "correct": pos.correct,
                "epoch_s": pos.epoch_s, "batch_size": a.batch_size, "seed": a.seed,
                "steps_per_epoch": self.steps_per_epoch,
                "wall_s": self.wall_before + time.perf_counter() - self.started, **state.meta}
        if self.layout.writer:
            save_checkpoint(self.workdir / CHECKPOINT, tensors, meta)
        self.last_checkpoint_step = pos.step

    def load_checkpoint(self) -> tuple[State, Position]:
        """The state and position to resume from; any problem (damaged, another framework,
        optimizer, spec, batch size or seed) exits with one clear error."""
        path = self.workdir / CHECKPOINT
        try:
            tensors, meta = load_checkpoint(path)
        except CheckpointError as e:
            fail(str(e))
        framework = meta.get("framework")
        if framework != self.framework:
            fail(f"{path}: a {framework} checkpoint; resume it with "
                 f"python -m lenet_{framework}.train")
        if meta.get("optimizer") != self.args.optimizer:
            fail(f"{path}: written with --optimizer {meta.get('optimizer')}, "
                 f"not {self.args.optimizer}")
        weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            check_weights(self.spec, weights)
        except WeightsError as e:
            fail(f"{path}: not a checkpoint of this --spec: {e}")
        for flag, key, ours in (("--batch-size", "batch_size", self.args.batch_size),
                                ("--seed", "seed", self.args.seed),
                                ("--train-size", "steps_per_epoch", self.steps_per_epoch)):
            if meta.get(key) != ours:
                fail(f"{path}: written with another {flag} ({key} {meta.get(key)}, now {ours}); "
                     "a run resumes with the flags it started with")
        try:
            position = Position(int(meta["epoch"]), int(meta["done"]), int(meta["step"]),
                                tensors["progress.losses"], int(meta["correct"]),
                                float(meta["epoch_s"]))
            self.wall_before = float(meta["wall_s"])
        except (KeyError, TypeError, ValueError) as e:
            fail(f"{path}: damaged checkpoint metadata ({e!r} missing or invalid)")
        if not (0 <= position.done <= self.steps_per_epoch and len(position.losses) == position.done
                and math.isfinite(position.epoch_s)):
            fail(f"{path}: damaged checkpoint (position {position.done} of {self.steps_per_epoch}"
                 f" steps with {len(position.losses)} losses)")
        self.last_checkpoint_step = position.step
        if self.layout.writer:
            self._trim_logs(position)
        state = State(weights, {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")},
                      {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}, meta)
        return state, position

    def _trim_logs(self, pos: Position) -> None:
        """Drop what the logs recorded after the checkpoint (a run killed after writing an
        epoch's metrics but before its checkpoint would otherwise repeat that epoch)."""
        epoch_start = pos.step - pos.done
        for name, keep in (("metrics.jsonl", lambda r: r["epoch"] < pos.epoch),
                           ("steps.jsonl", lambda r: r["step"] < epoch_start)):
            path = self.workdir / name
            if not path.exists():
                continue
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if keep(json.loads(line)):
                        kept.append(line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a kill
            atomic_write_bytes(path, "".join(kept).encode())


@contextmanager
def interruptible() -> Iterator[None]:
    """A Ctrl-C before the run can checkpoint (loading data, compiling) or a second Ctrl-C
    ends the program with one line and exit status 130 instead of a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted; nothing more was written (a checkpoint already in the workdir is "
              "kept; --resume continues from it)", file=sys.stderr, flush=True)
        if active():
            exit_now(EXIT_INTERRUPTED)
        sys.exit(EXIT_INTERRUPTED)


def fail(message: str, status: int = EXIT_BAD_INPUT, everyone: bool = False) -> NoReturn:
    """Print one clear error and exit with ``status`` (2: bad input, 3: diverged).

    When the run has several processes and the failure is this process's alone (not
    ``everyone``'s at the same step), it leaves at once; the others then stop on their next
    collective with a lost-contact error instead of waiting at the runtime's shutdown.
    """
    print(f"error: {message}", file=sys.stderr, flush=True)
    if active() and not everyone:
        exit_now(status)
    sys.exit(status)


def _prepare_workdir(args: argparse.Namespace, workdir: Path) -> None:
    if args.resume and args.overwrite:
        fail("--resume and --overwrite contradict each other; pick one")
    if args.resume:
        if not (workdir / CHECKPOINT).is_file():
            fail(f"--resume: {workdir / CHECKPOINT} does not exist (the run stopped before its "
                 "first checkpoint); start it again with --overwrite")
        return
    if workdir.exists() and not workdir.is_dir():
        fail(f"--workdir {workdir}: not a folder")
    if workdir.is_dir() and any(workdir.iterdir()):
        if not args.overwrite:
            fail(f"{workdir} is not empty; pass --resume to continue the run in it, --overwrite "
                 "to start afresh there, or pick another --workdir")
        for name in RUN_FILES:
            (workdir / name).unlink(missing_ok=True)
        for tmp in workdir.glob(".*.tmp"):
            tmp.unlink()


def setup(args: argparse.Namespace, framework: str, argv: list[str],
          layout: Layout | None = None) -> Run:
    """Workdir, data and step counts; refuses a non-empty workdir unless resuming or told to
    overwrite. Of several processes only process 0 prepares the workdir and writes to it; all
    of them read the data, and on --resume the checkpoint."""
    started = time.perf_counter()
    layout = layout or Layout()
    log_to_stderr(args.quiet)
    workdir = args.workdir or default_workdir(framework)
    if layout.writer:
        _prepare_workdir(args, workdir)
    elif args.resume and not (workdir / CHECKPOINT).is_file():
        fail(f"{layout}: --resume: {workdir / CHECKPOINT} is not readable here; every process "
             "reads the checkpoint, so on several hosts --workdir must be on a shared "
             "filesystem (or hold a copy of it)")
    spec = args.spec
    why = misfit(spec.input_shape, args.dataset)
    if why:
        fits = fitting(spec.input_shape)
        fail(f"spec {spec.name} {why}" + (f" (it fits --dataset {' or '.join(fits)})" if fits
                                          else ""))
    try:
        train = datasets.load(args.dataset, "train", args.data_dir)
        test = datasets.load(args.dataset, "test", args.data_dir)
        mean, std = datasets.normalisation(args.dataset, train)
        train_images, train_y = train.images, train.labels
        if args.train_size:
            if args.train_size > len(train_images):
                fail(f"--train-size {args.train_size} is larger than the training set "
                     f"({len(train_images)})")
            train_images, train_y = train_images[: args.train_size], train_y[: args.train_size]
        train_x = prepare(train_images, spec, mean, std, args.dataset)
        test_x = prepare(test.images, spec, mean, std, args.dataset)
    except DataError as e:
        fail(str(e))
    test_y = test.labels
    data = {"dataset": args.dataset, "source": {"train": train.source, "test": test.source},
            "checksum": {"train": train.checksum, "test": test.checksum},
            "mean": mean, "std": std, "augment": list(args.augment)}
    if args.batch_size > len(train_x):
        fail(f"--batch-size {args.batch_size} is larger than the training set ({len(train_x)})")
    init_weights = None
    if args.init_weights:
        try:
            init_weights, _ = load_weights(args.init_weights)
            check_weights(spec, init_weights)
        except WeightsError as e:
            fail(f"--init-weights: {e}")
    log = RunLog(workdir, args.quiet or not layout.writer, write=layout.writer)
    if layout.writer:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        config["spec"] = spec.to_dict()
        config["augment"] = list(args.augment)
        config["data"] = data
        config["processes"] = layout.process_count
        atomic_write_bytes(workdir / "config.json", json.dumps(config, indent=2).encode())
    steps_per_epoch = len(train_x) // args.batch_size
    return Run(args, spec, framework, workdir, log, train_x, train_y, test_x, test_y,
               steps_per_epoch, total_steps(args, steps_per_epoch), started, list(argv),
               init_weights, data, train_images if args.augment else None, layout=layout)
