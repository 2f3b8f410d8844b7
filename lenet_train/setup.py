"""Everything before the first step: the workdir (refused when it holds another run, unless
resuming or told to overwrite), the settings checked against the spec and this machine, the
data, init_weights, the step counts, the checkpoint on resume (checked once, before anything
is written) and config.json. :func:`prepare` makes the :class:`~lenet_train.run.Run`."""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lenet_spec import BatchNorm, Spec, SpecError, WeightsError, fitting, load_weights, misfit
from lenet_train.checkpoints import CHECKPOINT, Checkpoints, read_meta, settings
from lenet_train.config import Config
from lenet_train.data import DataError, load, normalisation, prepare
from lenet_train.data.catalog import DATASETS
from lenet_train.distributed import Layout
from lenet_train.errors import CheckpointError, ConfigError, WorkdirError
from lenet_train.options import EVAL_BATCH
from lenet_train.run import MEMBER_WEIGHTS, WEIGHTS, Run
from lenet_train.runlog import RunLog, log_to_stderr
from lenet_train.state import Position
from lenet_util import atomic_write_bytes, not_a_file

RUN_FILES = ("config.json", "metrics.jsonl", "steps.jsonl", CHECKPOINT, WEIGHTS)
"""What a run writes in its workdir (and what --overwrite deletes), beside a population's
weights files (:data:`MEMBER_WEIGHTS`)."""


def _run_files(workdir: Path) -> list[Path]:
    """The files of a run's in ``workdir``: :data:`RUN_FILES` and members' weights."""
    named = [workdir / name for name in RUN_FILES if os.path.lexists(workdir / name)]
    return named + sorted(workdir.glob(MEMBER_WEIGHTS.format(seed="*")))


LOCK = ".lenet.lock"
"""The file a run holds locked in its workdir while it runs (it names the process)."""
_locks: dict[Path, int] = {}  # the lock files' descriptors, by workdir, open while it runs


def _lock(workdir: Path) -> None:
    """Hold ``workdir``'s lock, or :class:`WorkdirError` naming the process that holds it."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(workdir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise WorkdirError(f"--workdir {workdir}: cannot write there ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise WorkdirError(f"{workdir}: another run is using it (process {holder}); wait for it "
                           "to end or pick another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _locks[workdir.resolve()] = fd


def release(workdir: Path) -> None:
    """Let go of ``workdir``'s lock (a run that ended; a program's exit lets go of all)."""
    fd = _locks.pop(Path(workdir).resolve(), None)
    if fd is not None:
        os.close(fd)


CONFIG_KEYS = {"spec", "data", "epochs", "batch_size", "optimizer", "lr", "seed", "dataset"}
"""Keys every config.json a run of ours writes holds."""


def _holds_run(workdir: Path) -> bool:
    """Whether ``workdir`` holds a run of ours: a lenet checkpoint (its header says so), or a
    config.json as a run writes it (its settings and a valid spec)."""
    checkpoint = workdir / CHECKPOINT
    if checkpoint.is_file() and not checkpoint.is_symlink():
        try:
            read_meta(checkpoint)
            return True
        except CheckpointError:
            pass
    path = workdir / "config.json"
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 2**20:
            return False
        config = json.loads(path.read_text())
        return (isinstance(config, dict) and CONFIG_KEYS <= set(config)
                and Spec.from_dict(config["spec"]) is not None)
    except (OSError, ValueError, RecursionError, SpecError, TypeError):
        return False


def _prepare_workdir(config: Config, workdir: Path) -> None:
    if config.resume and config.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pick one")
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir}: not a folder")
    _lock(workdir)
    try:
        for name in (*RUN_FILES, MEMBER_WEIGHTS.format(seed="*")):  # what killed writes left
            for tmp in workdir.glob(f".{name}.*.tmp"):              # (no writer runs: we hold
                tmp.unlink(missing_ok=True)                          # the lock)
        if config.resume:
            what = not_a_file(workdir / CHECKPOINT)
            if what is not None and what.startswith("nothing"):
                raise WorkdirError(f"--resume: {workdir / CHECKPOINT} does not exist (the run "
                                   "stopped before its first checkpoint); start it again with "
                                   "--overwrite")
            if what is not None or (workdir / CHECKPOINT).is_symlink():
                raise WorkdirError(f"--resume: {workdir / CHECKPOINT} is "
                                   f"{what or 'a symbolic link'}, not a checkpoint a run wrote")
            return
        others = sorted(p.name for p in workdir.iterdir() if p.name != LOCK)
        if others:
            if not config.overwrite:
                raise WorkdirError(f"{workdir} is not empty; pass --resume to continue the run "
                                   "in it, --overwrite to start afresh there, or pick another "
                                   "--workdir")
            if not _holds_run(workdir):
                shown = ", ".join(others[:5]) + (", …" if len(others) > 5 else "")
                raise WorkdirError(f"--overwrite: {workdir} holds no lenet run (it holds "
                                   f"{shown}); it deletes only a run's own files, in a run's "
                                   "folder, so pick another --workdir")
            named = _run_files(workdir)
            odd = [p for p in named if p.is_symlink() or not p.is_file()]
            if odd:  # checked before anything is deleted
                raise WorkdirError(f"--overwrite: {odd[0]} is not a file a run writes (a folder "
                                   "or a link); nothing was deleted, so pick another --workdir")
            for path in named:
                path.unlink(missing_ok=True)
    except BaseException:
        release(workdir)
        raise


def content_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """The first 16 hex digits of the SHA-256 of a split's images and labels as read."""
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()[:16]


RUNTIME_BYTES = 3 * 2**29
"""What a framework's runtime holds before the run's own arrays: 1.5 GiB (measured peaks of a
tiny run: 0.65 GiB torch, 1.1 GiB JAX, CPU)."""
STATE_COPIES = 12
"""Float32 copies of the parameters a run holds at its peak: the parameters, gradients and two
optimizer slots, the framework's temporaries of a step, and the state a checkpoint writes
(measured at 254M parameters, CPU: 8.7 torch, 11.7 JAX)."""
ACTIVATION_COPIES = 3
"""Float32 copies of a batch's activations a step holds (forward values, gradients, one
framework temporary)."""


def memory_needed(config: Config, spec: Spec) -> dict[str, int]:
    """An upper bound of the bytes a run of ``spec`` with ``config`` holds at its peak, by
    part: the framework's runtime, the data (on the host, and again where the framework
    keeps its copy), training (per member: :data:`STATE_COPIES` of the parameters,
    :data:`ACTIVATION_COPIES` of a batch's activations) and evaluation (per member: a batch of
    EVAL_BATCH through the widest layer, twice)."""
    counts = DATASETS[config.dataset].counts
    images = min(config.train_size or counts["train"], counts["train"]) + counts["test"]
    members = config.members or 1
    widest = max(math.prod(i.out_shape) for i in spec.infos)
    return {
        "runtime": RUNTIME_BYTES,
        "data": 2 * 4 * images * math.prod(spec.input_shape),
        "training": members * 4 * (STATE_COPIES * spec.param_count
                                   + ACTIVATION_COPIES * config.batch_size * spec.activations),
        "evaluation": members * 4 * 2 * EVAL_BATCH * widest,
    }


def check_memory(config: Config, spec: Spec) -> None:
    """:class:`ConfigError`, with the estimate, for a run whose peak (:func:`memory_needed`)
    exceeds this machine's memory."""
    parts = memory_needed(config, spec)
    needed = sum(parts.values())
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if needed > have:
        shown = ", ".join(f"{k} {_gib(v)}" for k, v in parts.items())
        raise ConfigError(f"spec {spec.name} needs about {_gib(needed)} at --batch-size "
                          f"{config.batch_size}" + (f" for {config.members} seeds"
                                                    if config.members else "")
                          + f" ({shown}); this machine has {_gib(have)}")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_spec(config: Config, spec: Spec) -> None:
    """:class:`ConfigError` unless ``spec`` can train on ``config``'s dataset at its batch
    size on this machine."""
    why = misfit(spec.input_shape, config.dataset)
    if why:
        fits = fitting(spec.input_shape)
        raise ConfigError(f"spec {spec.name} {why}" + (f" (it fits --dataset "
                                                       f"{' or '.join(fits)})" if fits else ""))
    for info in spec.infos:
        if isinstance(info.layer, BatchNorm):
            per_channel = config.batch_size * math.prod(info.in_shape[1:])
            if per_channel < 2:
                raise ConfigError(
                    f"--batch-size {config.batch_size}: {spec.name}'s {info.label} would "
                    f"normalise {per_channel} value per channel in training; batch_norm needs "
                    "at least 2 (a larger --batch-size)")
    check_memory(config, spec)
    classes = DATASETS[config.dataset].classes
    if spec.num_classes != classes:
        raise ConfigError(f"spec {spec.name} ends in {spec.num_classes} outputs; "
                          f"{config.dataset} has {classes} classes (its last layer must give one "
                          "output per class)")


def _load_data(config: Config, spec: Spec) -> tuple[np.ndarray, ...]:
    """(train_x, train_y, test_x, test_y, the training images as read, the data's record)."""
    train = load(config.dataset, "train", config.data_dir)
    test = load(config.dataset, "test", config.data_dir)
    for split in (train, test):
        if not len(split.labels):
            raise DataError(f"{split.source}: the {config.dataset} split there holds no "
                            "records; training needs a training and a test split with at least "
                            "one image each")
    mean, std = normalisation(config.dataset, train)
    train_images, train_y = train.images, train.labels
    if config.train_size:
        if config.train_size > len(train_images):
            raise ConfigError(f"--train-size {config.train_size} is larger than the training "
                              f"set ({len(train_images)})")
        train_images, train_y = train_images[: config.train_size], train_y[: config.train_size]
    train_x = prepare(train_images, spec, mean, std, config.dataset)
    test_x = prepare(test.images, spec, mean, std, config.dataset)
    data = {"dataset": config.dataset, "source": {"train": train.source, "test": test.source},
            "checksum": {"train": train.checksum, "test": test.checksum},
            "content": {"train": content_digest(train_images, train_y),
                        "test": content_digest(test.images, test.labels)},
            "mean": mean, "std": std, "augment": list(config.augment)}
    return train_x, train_y, test_x, test.labels, train_images, data


def total_steps(config: Config, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole run: epochs × steps per epoch, capped by max_steps."""
    steps = config.epochs * steps_per_epoch
    return min(steps, config.max_steps) if config.max_steps else steps


def prepare_run(spec: Spec, config: Config, framework: str, workdir: Path,
                layout: Layout | None = None, any_process: Callable[[bool], bool] = bool,
                argv: list[str] | None = None) -> Run:
    """The run of ``spec`` with ``config`` in ``workdir``: workdir, checks, data, step counts,
    the checkpoint on resume, config.json. Of several processes only process 0 prepares the
    workdir and writes to it; all of them read the data, and on resume the checkpoint. Any
    problem is one :class:`~lenet_util.errors.LenetError`, raised before anything is written
    (the workdir's lock is let go of)."""
    started = time.perf_counter()
    layout = layout or Layout()
    log_to_stderr(config.quiet or not layout.writer)  # the other processes print nothing
    if config.seeds and layout.distributed:
        raise ConfigError(f"--seeds: a population trains in one process, not "
                          f"{layout.process_count}; start it as one")
    created = not os.path.lexists(workdir)
    if layout.writer:
        try:
            _prepare_workdir(config, workdir)
        except BaseException:
            _remove_if_made(workdir, created)
            raise
    elif config.resume and not (workdir / CHECKPOINT).is_file():
        raise WorkdirError(f"{layout}: --resume: {workdir / CHECKPOINT} is not readable here; "
                           "every process reads the checkpoint, so on several hosts --workdir "
                           "must be on a shared filesystem (or hold a copy of it)")
    try:
        return _prepare(spec, config, framework, workdir, layout, any_process, argv, started)
    except BaseException:
        release(workdir)
        if layout.writer:
            _remove_if_made(workdir, created)
        raise


def _remove_if_made(workdir: Path, created: bool) -> None:
    """A refused run leaves no folder behind: the workdir it made, holding its lock file
    alone, is removed."""
    if not created:
        return
    try:
        if [p.name for p in workdir.iterdir()] in ([LOCK], []):
            (workdir / LOCK).unlink(missing_ok=True)
            workdir.rmdir()
    except OSError:
        pass


def _prepare(spec: Spec, config: Config, framework: str, workdir: Path, layout: Layout,
             any_process: Callable[[bool], bool], argv: list[str] | None,
             started: float) -> Run:
    check_spec(config, spec)
    train_x, train_y, test_x, test_y, train_images, data = _load_data(config, spec)
    steps_per_epoch = len(train_x) // config.batch_size
    total = total_steps(config, steps_per_epoch)
    ckpt = Checkpoints(workdir, framework, spec, config, steps_per_epoch, layout.writer,
                       settings(config, spec, data))
    run = Run(spec, config, framework, workdir,
              RunLog(workdir, config.quiet or not layout.writer, write=layout.writer),
              train_x, train_y, test_x, test_y, steps_per_epoch, total, ckpt, started, layout,
              any_process, argv, data=data,
              train_images=train_images if config.augment else None,
              start=Position.start(len(config.seeds or (config.seed,))))
    if config.batch_size > len(train_x):
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the training set "
                          f"({len(train_x)})")
    if config.init_weights:
        try:
            run.init_weights, _ = load_weights(config.init_weights, expect=spec)
        except (WeightsError, SpecError) as e:
            raise WeightsError(f"--init-weights: {e}") from None
        bad = next((k for k, v in run.init_weights.items() if not np.all(np.isfinite(v))), None)
        if bad is not None:
            raise WeightsError(f"--init-weights: {config.init_weights}: tensor {bad!r} holds NaN "
                               "or infinite values; a run starts from finite weights")
    if config.resume:
        run.restore, run.start, run.wall_before = ckpt.load(
            total, lambda: all(w.is_file() for w in run.weights_files()))
    if layout.writer:
        record = {"framework": framework, **config.to_json()}
        record["spec"] = spec.to_dict()
        record["data"] = data
        record["processes"] = layout.process_count
        atomic_write_bytes(workdir / "config.json", json.dumps(record, indent=2).encode())
    return run
