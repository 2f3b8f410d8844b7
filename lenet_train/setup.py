"""Everything before the first step: the workdir (refused when it holds another run, unless
resuming or told to overwrite), the data, --init-weights, the step counts and config.json."""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from lenet_spec import (
    BatchNorm,
    Spec,
    WeightsError,
    atomic_write_bytes,
    fitting,
    load_weights,
    misfit,
)
from lenet_train.checkpoints import (
    CHECKPOINT,
    CheckpointError,
    Position,
    check_position,
    check_resume,
    read_meta,
    settings,
)
from lenet_train.cli import default_workdir, total_steps
from lenet_train.data import DataError, load, normalisation, prepare
from lenet_train.data.catalog import DATASETS
from lenet_train.distributed import Layout
from lenet_train.errors import fail
from lenet_train.options import EVAL_BATCH
from lenet_train.population import MEMBER_WEIGHTS, PopulationRun, member_weights
from lenet_train.run import WEIGHTS, Run
from lenet_train.runlog import RunLog, log_to_stderr

RUN_FILES = ("config.json", "metrics.jsonl", "steps.jsonl", CHECKPOINT, WEIGHTS)
"""What a run writes in its workdir (and what --overwrite deletes), beside a population's
weights files (:data:`MEMBER_WEIGHTS`)."""


def _run_files(workdir: Path) -> list[Path]:
    """The files of a run's in ``workdir``: :data:`RUN_FILES` and members' weights."""
    named = [workdir / name for name in RUN_FILES if (workdir / name).exists()]
    return named + sorted(workdir.glob(MEMBER_WEIGHTS.format(seed="*")))


LOCK = ".lenet.lock"
"""The file a run holds locked in its workdir while it runs (it names the process)."""
_locks: list[int] = []  # the lock files' descriptors, open for the process's life


def _lock(workdir: Path) -> None:
    """Hold ``workdir``'s lock, or exit with one line naming the process that holds it."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(workdir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        fail(f"--workdir {workdir}: cannot write there ({e.strerror or e})")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        fail(f"{workdir}: another run is using it (process {holder}); wait for it to end or "
             "pick another --workdir")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _locks.append(fd)


def _holds_run(workdir: Path) -> bool:
    """Whether ``workdir`` holds a run of ours (a checkpoint, or our config.json)."""
    if (workdir / CHECKPOINT).is_file():
        return True
    try:
        config = json.loads((workdir / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(config, dict) and {"spec", "data"} <= set(config)


def _prepare_workdir(args: argparse.Namespace, workdir: Path) -> None:
    if args.resume and args.overwrite:
        fail("--resume and --overwrite contradict each other; pick one")
    if workdir.exists() and not workdir.is_dir():
        fail(f"--workdir {workdir}: not a folder")
    _lock(workdir)
    for name in (*RUN_FILES, MEMBER_WEIGHTS.format(seed="*")):  # what killed writes left (no
        for tmp in workdir.glob(f".{name}.*.tmp"):              # writer runs: we hold the lock)
            tmp.unlink(missing_ok=True)
    if args.resume:
        if not (workdir / CHECKPOINT).is_file():
            fail(f"--resume: {workdir / CHECKPOINT} does not exist (the run stopped before its "
                 "first checkpoint); start it again with --overwrite")
        return
    others = sorted(p.name for p in workdir.iterdir() if p.name != LOCK)
    if others:
        if not args.overwrite:
            fail(f"{workdir} is not empty; pass --resume to continue the run in it, --overwrite "
                 "to start afresh there, or pick another --workdir")
        named = _run_files(workdir)
        if named and not _holds_run(workdir):
            fail(f"--overwrite: {workdir} holds no lenet run, but files named as a run's "
                 f"({', '.join(p.name for p in named)}); it deletes only a run's own files, so "
                 "pick another --workdir")
        for path in named:
            path.unlink(missing_ok=True)


def content_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """The first 16 hex digits of the SHA-256 of a split's images and labels as read."""
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()[:16]


def _check_memory(args: argparse.Namespace, spec: Spec) -> None:
    """Refuse, with the estimate, a run whose spec cannot fit in this machine's memory: the
    data padded to the spec's input, training's activations and state at --batch-size, and an
    evaluation batch, all in float32 (what the spec alone says; the frameworks add more)."""
    counts = DATASETS[args.dataset].counts
    images = min(args.train_size or counts["train"], counts["train"]) + counts["test"]
    data = 4 * images * math.prod(spec.input_shape)
    widest = max(math.prod(i.out_shape) for i in spec.infos)
    evaluation = 4 * 2 * EVAL_BATCH * widest
    members = len(args.seeds) if args.seeds else 1
    training = members * spec.training_bytes(args.batch_size)
    evaluation *= members
    needed = data + training + evaluation
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if needed > have:
        fail(f"spec {spec.name} needs about {_gib(needed)} at --batch-size {args.batch_size} "
             f"(data {_gib(data)}, training {_gib(training)}, "
             f"evaluation {_gib(evaluation)}, float32); this machine has {_gib(have)}")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _check_resume(args: argparse.Namespace, workdir: Path,
                  now: dict, total: int, steps_per_epoch: int) -> None:
    """Before anything is written: the checkpoint is of this run's settings (written by either
    framework), its position is one a run can stand at, and it has steps left to train."""
    path = workdir / CHECKPOINT
    try:
        meta = read_meta(path)
    except CheckpointError as e:
        fail(str(e))
    check_resume(path, meta, now)
    try:
        epoch, done, step = (int(meta[k]) for k in ("epoch", "done", "step"))
    except (KeyError, TypeError, ValueError) as e:
        fail(f"{path}: damaged checkpoint metadata ({e!r} missing or invalid)")
    spe = meta.get("steps_per_epoch")
    why = check_position(Position(epoch, done, step), spe if isinstance(spe, int) else 0,
                         losses=False)
    if why and spe == steps_per_epoch:
        fail(f"{path}: damaged checkpoint ({why})")
    # a run killed after its last checkpoint but before its weights files finishes on resume
    weights = ([member_weights(workdir, seed) for seed in args.seeds] if args.seeds
               else [workdir / WEIGHTS])
    if (step >= total or epoch >= args.epochs) and all(w.is_file() for w in weights):
        where = (f"step {step} of {total}" if step >= total
                 else f"epoch {epoch} of --epochs {args.epochs}")
        shown = weights[0] if len(weights) == 1 else f"{weights[0]} …"
        fail(f"{path}: the run is complete ({where}); its weights are {shown}. To "
             "train on, resume with more --epochs or a larger --max-steps")


def setup(args: argparse.Namespace, framework: str, argv: list[str],
          layout: Layout | None = None) -> Run:
    """Workdir, data and step counts; refuses a non-empty workdir unless resuming or told to
    overwrite. Of several processes only process 0 prepares the workdir and writes to it; all
    of them read the data, and on --resume the checkpoint."""
    started = time.perf_counter()
    layout = layout or Layout()
    log_to_stderr(args.quiet or not layout.writer)  # the other processes print nothing
    if args.resume and args.workdir is None:
        fail("--resume needs --workdir: the folder of the run to continue")
    if args.seeds and layout.distributed:
        fail(f"--seeds: a population trains in one process, not {layout.process_count}; "
             "start it as one")
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
    for info in spec.infos:
        if isinstance(info.layer, BatchNorm):
            per_channel = args.batch_size * math.prod(info.in_shape[1:])
            if per_channel < 2:
                fail(f"--batch-size {args.batch_size}: {spec.name}'s {info.label} would "
                     f"normalise {per_channel} value per channel in training; batch_norm "
                     "needs at least 2 (a larger --batch-size)")
    _check_memory(args, spec)
    classes = DATASETS[args.dataset].classes
    if spec.num_classes != classes:
        fail(f"spec {spec.name} ends in {spec.num_classes} outputs; {args.dataset} has {classes} "
             "classes (its last layer must give one output per class)")
    try:
        train = load(args.dataset, "train", args.data_dir)
        test = load(args.dataset, "test", args.data_dir)
        for split in (train, test):
            if not len(split.labels):
                fail(f"{split.source}: the {args.dataset} split there holds no records; "
                     "training needs a training and a test split with at least one image each")
        mean, std = normalisation(args.dataset, train)
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
            "content": {"train": content_digest(train_images, train_y),
                        "test": content_digest(test.images, test.labels)},
            "mean": mean, "std": std, "augment": list(args.augment)}
    steps_per_epoch = len(train_x) // args.batch_size
    total = total_steps(args, steps_per_epoch)
    if args.resume:
        _check_resume(args, workdir, settings(args, data), total, steps_per_epoch)
    if args.batch_size > len(train_x):
        fail(f"--batch-size {args.batch_size} is larger than the training set ({len(train_x)})")
    init_weights = None
    if args.init_weights:
        try:
            init_weights, _ = load_weights(args.init_weights, expect=spec)
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
    return (PopulationRun if args.seeds else Run)(
        args, spec, framework, workdir, log, train_x, train_y, test_x, test_y, steps_per_epoch,
        total, started, list(argv), init_weights, data,
        train_images if args.augment else None, layout=layout)
