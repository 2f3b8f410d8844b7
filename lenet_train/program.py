"""``python -m lenet_<framework>.train``: the program both ports run around :func:`fit`, and
the :class:`Framework` it is written against."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from typing import Protocol

from lenet_train.cli import check_seeds, parser
from lenet_train.distributed import Layout, peers_guard
from lenet_train.errors import interruptible, stop_on_signals
from lenet_train.loop import Trainer, fit
from lenet_train.setup import setup


class Flags(Protocol):
    """A port's own flags: a module with these two functions (argparse only, no framework)."""

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        """Add the framework's own flags to the shared ones."""

    def check_flags(self, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        """Refuse inconsistent flags (``parser.error``)."""


class Framework(Protocol):
    """What a framework supplies to the program around :func:`fit`: settings, processes and
    the first line."""

    framework: str
    """``"jax"`` or ``"torch"``: names the program (``python -m lenet_<framework>.train``) and
    the checkpoints it can resume."""
    transport_errors: tuple[type[BaseException], ...]
    """The exception types with which the framework reports a failed collective."""

    def configure(self, args: argparse.Namespace) -> None:
        """Apply process-wide settings of the parsed flags."""

    def connect(self, args: argparse.Namespace) -> Layout:
        """Join the run's other processes, if any; this process's place among them."""

    def disconnect(self) -> None:
        """Leave the run's other processes (nothing when alone)."""

    def any_process(self, flag: bool) -> bool:
        """Whether ``flag`` is set in any process (a collective: all of them call it)."""

    def describe(self) -> str:
        """The framework, its version and the devices it trains on, for the first line."""


class Backend(Framework, Trainer, Protocol):
    """A framework's whole side of the program: :class:`Framework` and :class:`Trainer`."""


def main(framework: str, title: str, flags: Flags,
         make_backend: Callable[[argparse.Namespace], Backend],
         argv: list[str] | None = None) -> int:
    """Parse the shared and the framework's flags, then (and only then) build the backend
    (``make_backend(args)``: a population's with --seeds), join the other processes, prepare
    the run (workdir, data, checkpoint) and train it; errors end the program with one line."""
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop_on_signals()  # a Ctrl-C while jax or torch imports: one line, not a traceback
    try:
        return _main(framework, title, flags, make_backend, argv)
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def _main(framework: str, title: str, flags: Flags,
          make_backend: Callable[[argparse.Namespace], Backend], argv: list[str] | None) -> int:
    p = parser(f"python -m lenet_{framework}.train", title)
    flags.add_flags(p)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    flags.check_flags(p, args)
    check_seeds(p, args, argv)
    backend = make_backend(args)
    backend.configure(args)
    try:
        with interruptible():
            layout = backend.connect(args)
            run = setup(args, backend.framework, argv, layout)
            run.any_process = backend.any_process
            run.log.say(f"{backend.describe()}; {run.spec.name}, {run.total_steps} steps; "
                        f"workdir {run.workdir}")
            with peers_guard(layout, backend.transport_errors):
                fit(run, backend)
    finally:
        backend.disconnect()
    return 0
