"""The torch program's own flags (argparse only: read before torch is imported)."""

from __future__ import annotations

import argparse

from lenet_train.cli import positive_int


def add_flags(p: argparse.ArgumentParser) -> None:
    """The torch program's flags, beside the shared ones."""
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads (torch.set_num_threads; default: torch's choice)")


def check_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A population (--seeds) trains torch's own layers, eagerly."""
    if args.seeds is not None and args.compile:
        p.error("--compile: not with --seeds (a population's step is torch.func.vmap of the "
                "network, which this program does not compile)")
    if args.seeds is not None and args.kernels == "fused":
        p.error("--kernels fused: not with --seeds (a population trains torch's own layers)")
