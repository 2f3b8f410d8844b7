"""``python -m lenet_<framework>.train``: the command line around :func:`lenet_train.api.train`.
Flags become a :class:`~lenet_train.config.Config`; the run's errors become one line and an
exit status (2: bad input, 3: diverged, 4: lost a process, 130: interrupted). The only place
the training runtime exits."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from typing import Protocol

from lenet_train.api import Backend, train
from lenet_train.cli import check_seeds, parser, to_config
from lenet_train.config import Config
from lenet_train.errors import (
    EXIT_INTERRUPTED,
    INTERRUPTED,
    ConfigError,
    LenetError,
    active,
    exit_now,
    stop_on_signals,
)


class Flags(Protocol):
    """A port's own flags: a module with these two functions (argparse only, no framework)."""

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        """Add the framework's own flags to the shared ones."""

    def check(self, config: Config) -> None:
        """Refuse settings this framework cannot train with (:class:`ConfigError`)."""


def main(framework: str, title: str, flags: Flags, make_backend: Callable[[Config], Backend],
         argv: list[str] | None = None) -> int:
    """Parse the shared and the framework's flags, then (and only then) build the backend
    (``make_backend(config)``, which imports the framework: a population's with --seeds) and
    train; the exit status. Errors end the program with one line."""
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop_on_signals()  # a Ctrl-C while jax or torch imports: one line, not a traceback
    try:
        return _main(framework, title, flags, make_backend, argv)
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def _main(framework: str, title: str, flags: Flags, make_backend: Callable[[Config], Backend],
          argv: list[str] | None) -> int:
    p = parser(f"python -m lenet_{framework}.train", title)
    flags.add_flags(p)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    check_seeds(p, args, argv)
    config = to_config(p, args)
    try:
        flags.check(config)
    except ConfigError as e:
        p.error(str(e))
    try:
        train(args.spec, config, make_backend(config), list(argv))
    except LenetError as e:
        return leave(e)
    except KeyboardInterrupt:  # before the run could checkpoint, or a second Ctrl-C
        print(INTERRUPTED, file=sys.stderr, flush=True)
        if active():
            exit_now(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    return 0


def leave(e: LenetError) -> int:
    """Print ``e``'s line; its exit status (at once, when this process alone of several
    failed: the others then stop on their next collective)."""
    line = e.line()
    if line:
        print(line, file=sys.stderr, flush=True)
    if active() and not e.everyone:
        exit_now(e.exit_code)
    return e.exit_code
