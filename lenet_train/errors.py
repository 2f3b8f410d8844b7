"""How a training program stops: one line naming the problem, a documented exit status, and,
when the run spans several processes, leaving at once rather than waiting for the others."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

EXIT_BAD_INPUT = 2
"""A flag, file, dataset or checkpoint the run cannot use."""
EXIT_DIVERGED = 3
"""A non-finite loss or weight."""
EXIT_LOST_PEER = 4
"""A process could not reach, or lost, the others."""
EXIT_INTERRUPTED = 130
"""SIGINT or SIGTERM (after a checkpoint, when the run could write one)."""

_several = False


class StateError(ValueError):
    """A saved state (a checkpoint's optimizer tensors, RNG state) that does not fit."""


def activate(several: bool) -> None:
    """Record whether this process is one of several: from then on it leaves with
    :func:`exit_now`, since a normal interpreter exit would wait for the others at the
    runtime's shutdown."""
    global _several
    _several = several


def active() -> bool:
    """Whether this process is one of several."""
    return _several


def exit_now(status: int) -> NoReturn:
    """Flush and leave with ``status`` at once (no wait for the other processes at exit)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def fail(message: str, status: int = EXIT_BAD_INPUT, everyone: bool = False) -> NoReturn:
    """Print one clear error and exit with ``status`` (2: bad input, 3: diverged).

    When the run has several processes and the failure is this process's alone (not
    ``everyone``'s at the same step), it leaves at once; the others then stop on their next
    collective with a lost-contact error instead of waiting at the runtime's shutdown.
    """
    print(f"error: {message}", file=sys.stderr, flush=True)
    if active() and not everyone:
        exit_now(status)
    sys.exit(status)


def give_up(what: str) -> NoReturn:
    """Print ``error: {what}`` and leave at once with exit status 4."""
    print(f"error: {what}", file=sys.stderr, flush=True)
    exit_now(EXIT_LOST_PEER)


INTERRUPTED = ("interrupted; nothing more was written (a checkpoint already in the workdir is "
               "kept; --resume continues from it)")


def stop_at_once(signum: int, frame: object = None) -> NoReturn:
    """A signal handler: one line, then exit status 130 at once. Raising KeyboardInterrupt
    instead can be swallowed (a callback JAX runs from the garbage collector ignores it) or
    end in a traceback from inside an import."""
    print(f"{signal.Signals(signum).name}: {INTERRUPTED}", file=sys.stderr, flush=True)
    exit_now(EXIT_INTERRUPTED)


def stop_on_signals() -> None:
    """From now until the run watches signals itself, SIGINT and SIGTERM :func:`stop_at_once`."""
    signal.signal(signal.SIGINT, stop_at_once)
    signal.signal(signal.SIGTERM, stop_at_once)


@contextmanager
def interruptible() -> Iterator[None]:
    """A Ctrl-C before the run can checkpoint (loading data, compiling) or a second Ctrl-C
    ends the program with one line and exit status 130 instead of a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr, flush=True)
        if active():
            exit_now(EXIT_INTERRUPTED)
        sys.exit(EXIT_INTERRUPTED)
