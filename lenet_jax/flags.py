"""The JAX program's own flags (argparse only: read before JAX is imported)."""

from __future__ import annotations

import argparse
import os

from lenet_train.cli import positive_int


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
    which argparse checks like the flag)."""
    p.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                   metavar="HOST:PORT",
                   help="address of process 0, which coordinates (env JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=os.environ.get("JAX_NUM_PROCESSES"),
                   metavar="N", help="processes in the run (env JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=os.environ.get("JAX_PROCESS_ID"), metavar="I",
                   help="this process's index, 0 … N-1 (env JAX_PROCESS_ID)")
    p.add_argument("--distributed", action="store_true",
                   help="start jax.distributed with what JAX detects (TPU slice, SLURM, Open MPI)")


def check_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject a partial or inconsistent set of the flags of :func:`add_process_flags` (with
    --distributed, JAX detects what is not given)."""
    given = [args.coordinator, args.num_processes, args.process_id]
    partial = any(v is not None for v in given) and any(v is None for v in given)
    if partial and not args.distributed:
        p.error("--coordinator, --num-processes and --process-id go together (or set "
                "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
    if args.num_processes is not None:
        if args.num_processes < 1:
            p.error(f"--num-processes must be at least 1, got {args.num_processes}")
        if args.process_id is not None and not 0 <= args.process_id < args.num_processes:
            p.error(f"--process-id must be in 0 … {args.num_processes - 1}, "
                    f"got {args.process_id}")
    if args.coordinator is not None and (":" not in args.coordinator
                                         or not args.coordinator.rsplit(":", 1)[1].isdigit()):
        p.error(f"--coordinator must be HOST:PORT, got {args.coordinator!r}")
