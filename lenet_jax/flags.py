"""The JAX program's own flags (argparse only: read before JAX is imported)."""

from __future__ import annotations

import argparse
import os

from lenet_train.cli import positive_int
from lenet_train.config import Config


def add_flags(p: argparse.ArgumentParser) -> None:
    """The JAX program's flags, beside the shared ones."""
    p.add_argument("--steps-per-call", type=positive_int, default=10, metavar="K",
                   help="optimizer steps per dispatch (lax.scan over K batches)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="compile everything afresh instead of loading what an earlier run "
                        "compiled from JAX's persistent cache")
    add_process_flags(p)


def add_process_flags(p: argparse.ArgumentParser) -> None:
    """The flags that start several processes (each defaults to the environment variable,
    which argparse checks like the flag; :class:`Config` checks that they go together)."""
    p.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                   metavar="HOST:PORT",
                   help="address of process 0, which coordinates (env JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=os.environ.get("JAX_NUM_PROCESSES"),
                   metavar="N", help="processes in the run (env JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=os.environ.get("JAX_PROCESS_ID"), metavar="I",
                   help="this process's index, 0 … N-1 (env JAX_PROCESS_ID)")
    p.add_argument("--distributed", action="store_true",
                   help="start jax.distributed with what JAX detects (TPU slice, SLURM, Open MPI)")


def check(config: Config) -> None:
    """JAX trains every setting :class:`Config` accepts."""
