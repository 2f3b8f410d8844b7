"""The torch program's own flags (argparse only: read before torch is imported)."""

from __future__ import annotations

import argparse

from lenet_train.cli import positive_int
from lenet_train.config import Config
from lenet_train.errors import ConfigError


def add_flags(p: argparse.ArgumentParser) -> None:
    """The torch program's flags, beside the shared ones."""
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads (torch.set_num_threads; default: torch's choice, one per "
                        "core; where other processes compete for the cores, fewer can be "
                        "several times faster: 10,021 images/s with 1 against 2,865 with 2 "
                        "on a 2-core machine at load 3.6)")


def check(config: Config) -> None:
    """A population (seeds) trains torch's own layers, eagerly, and bfloat16 needs torch's own
    layers: :class:`ConfigError` for compile or fused kernels with seeds, fused kernels with
    bfloat16."""
    if config.seeds is not None and config.compile:
        raise ConfigError("--compile: not with --seeds (a population's step is torch.func.vmap "
                          "of the network, which this program does not compile)")
    if config.precision == "bfloat16" and config.kernels == "fused":
        raise ConfigError("--precision bfloat16: not with --kernels fused (torch's fused kernels "
                          "compute in float32 only; torch.autocast does not reach inside them)")
    if config.seeds is not None and config.kernels == "fused":
        raise ConfigError("--kernels fused: not with --seeds (a population trains torch's own "
                          "layers)")
