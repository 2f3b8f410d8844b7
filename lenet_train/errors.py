"""How a training run fails: one small hierarchy of exceptions, each carrying the one line a
user sees and the exit status a program leaves with. The runtime raises them; only the
programs' entry points (:mod:`lenet_train.program`) print them and exit.

- :class:`~lenet_util.errors.LenetError`: the base of every error below, and of the spec's
  (:class:`lenet_spec.SpecError`, :class:`lenet_spec.WeightsError`), the data's
  (:class:`lenet_train.data.DataError`) and the porter's;
- :class:`ConfigError`: a setting, or settings that do not go together;
- :class:`WorkdirError`: a workdir that cannot take the run;
- :class:`CheckpointError`: a checkpoint that cannot be resumed (:class:`StateError`: its
  optimizer or generator state does not fit);
- :class:`Diverged`: a non-finite loss or weight (exit 3);
- :class:`LostPeer`: a process of the run could not reach, or lost, the others (exit 4);
- :class:`Interrupted`: SIGINT or SIGTERM stopped the run after a checkpoint (exit 130).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import NoReturn

from lenet_util.errors import EXIT_BAD_INPUT, LenetError

EXIT_DIVERGED = 3
"""A non-finite loss or weight."""
EXIT_LOST_PEER = 4
"""A process could not reach, or lost, the others."""
EXIT_INTERRUPTED = 130
"""SIGINT or SIGTERM (after a checkpoint, when the run could write one)."""


class ConfigError(LenetError, ValueError):
    """A setting that cannot be used, or settings that contradict each other; the message
    names the flag (the :class:`lenet_train.Config` field is its name with underscores)."""


class WorkdirError(LenetError):
    """A workdir that cannot take the run: not writable, in use, holding another run."""


class CheckpointError(LenetError, ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


class StateError(CheckpointError):
    """A saved state (a checkpoint's optimizer tensors, RNG state) that does not fit the run."""


class Diverged(LenetError):
    """A non-finite loss or weight stopped the run; the message names the step and the last
    good checkpoint."""

    exit_code = EXIT_DIVERGED


class LostPeer(LenetError):
    """A process of the run could not reach the others, or lost them."""

    exit_code = EXIT_LOST_PEER


class Interrupted(LenetError):
    """SIGINT or SIGTERM stopped the run after it wrote a checkpoint; the message says where it
    stopped and how to continue (empty in the processes that do not write the run's files)."""

    exit_code = EXIT_INTERRUPTED

    def line(self) -> str | None:
        return str(self) or None


class NonFinite(ArithmeticError):
    """A non-finite loss or weight, as the runtime meets it (the loop turns it into
    :class:`Diverged`, naming the last good checkpoint)."""


__all__ = ["EXIT_BAD_INPUT", "EXIT_DIVERGED", "EXIT_INTERRUPTED", "EXIT_LOST_PEER",
           "CheckpointError", "ConfigError", "Diverged", "Interrupted", "LenetError", "LostPeer",
           "NonFinite", "StateError", "WorkdirError"]


# ---------------------------------------------------------------- for the programs' entry points

_several = False


def activate(several: bool) -> None:
    """Record whether this process is one of several: from then on its program leaves with
    :func:`exit_now`, since a normal interpreter exit would wait for the others at the
    runtime's shutdown."""
    global _several
    _several = several


def active() -> bool:
    """Whether this process is one of several."""
    return _several


def exit_now(status: int) -> NoReturn:
    """Flush and leave with ``status`` at once (no wait for the other processes at exit). For
    entry points, and for a start-up that hangs in a framework's native code (a timer thread
    cannot raise into it)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def give_up(what: str) -> NoReturn:
    """Print ``error: {what}`` and leave at once with exit status 4 (from a timer thread, while
    the main thread waits in a framework's native start-up code)."""
    print(f"error: {what}", file=sys.stderr, flush=True)
    exit_now(EXIT_LOST_PEER)


INTERRUPTED = ("interrupted; nothing more was written (a checkpoint already in the workdir is "
               "kept; --resume continues from it)")


def stop_at_once(signum: int, frame: object = None) -> NoReturn:
    """A program's signal handler: one line, then exit status 130 at once. Raising
    KeyboardInterrupt instead can be swallowed (a callback JAX runs from the garbage collector
    ignores it) or end in a traceback from inside an import."""
    print(f"{signal.Signals(signum).name}: {INTERRUPTED}", file=sys.stderr, flush=True)
    exit_now(EXIT_INTERRUPTED)


def stop_on_signals() -> None:
    """From now until the run watches signals itself, SIGINT and SIGTERM :func:`stop_at_once`
    (programs only: a notebook keeps its own handlers)."""
    signal.signal(signal.SIGINT, stop_at_once)
    signal.signal(signal.SIGTERM, stop_at_once)

