"""Everything before the first step: the workdir (refused when it holds another run, unless
resuming or told to overwrite), the data, --init-weights, the step counts and config.json."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lenet_spec import (
    WeightsError,
    atomic_write_bytes,
    check_weights,
    fitting,
    load_weights,
    misfit,
)
from lenet_train.checkpoints import CHECKPOINT
from lenet_train.cli import default_workdir, total_steps
from lenet_train.data import DataError, load, normalisation, prepare
from lenet_train.data.catalog import DATASETS
from lenet_train.distributed import Layout
from lenet_train.errors import fail
from lenet_train.run import Run
from lenet_train.runlog import RunLog, log_to_stderr

WEIGHTS = "weights.safetensors"
"""The trained weights' file name in the workdir."""
RUN_FILES = ("config.json", "metrics.jsonl", "steps.jsonl", CHECKPOINT, WEIGHTS)
"""What a run writes in its workdir (and what --overwrite deletes)."""


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
    classes = DATASETS[args.dataset].classes
    if spec.num_classes != classes:
        fail(f"spec {spec.name} ends in {spec.num_classes} outputs; {args.dataset} has {classes} "
             "classes (its last layer must give one output per class)")
    try:
        train = load(args.dataset, "train", args.data_dir)
        test = load(args.dataset, "test", args.data_dir)
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
