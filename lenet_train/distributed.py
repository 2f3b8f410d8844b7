"""What both trainers share when one run spans several processes: who writes, a bounded wait
for the others at start-up, and one clear error instead of a hang when a process is lost.

The frameworks' own engines do the work (``jax.distributed`` and XLA's collectives,
``torch.distributed`` and DistributedDataParallel); this module only decides what the user
sees when they fail.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from lenet_train.errors import LenetError, LostPeer, exit_now, give_up


@dataclass(frozen=True)
class Layout:
    """This process's place in the run: its index and the number of processes."""

    process_index: int = 0
    process_count: int = 1

    @property
    def writer(self) -> bool:
        """Whether this process writes the run's files (process 0 alone does)."""
        return self.process_index == 0

    @property
    def distributed(self) -> bool:
        return self.process_count > 1

    def __str__(self) -> str:
        return f"process {self.process_index} of {self.process_count}"


@contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Give up with ``error: {what}`` and exit status 4 if the block has not finished after
    ``seconds`` (the runtimes' own start-up timeouts abort the process with a native stack
    trace, so this fires first)."""
    timer = threading.Timer(seconds, give_up, (what,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def did_not_meet(where: str, timeout: float, who: str = "processes") -> str:
    """The error when the run's ``who`` (processes, ranks) have not all started in time."""
    first = "rank 0" if who == "ranks" else "process 0"
    return (f"{where}: the {who} did not all meet within --dist-timeout {timeout:g} s (is "
            f"{first} running, is the address reachable from here, and were all {who} "
            "started?)")


LOST_CONTACT = ("gloo", "nccl", "connection", "timed out", "timeout", "unavailable",
                "deadline", "socket", "peer")
"""Words in the runtimes' errors when a collective fails because a process has gone."""


@contextmanager
def peers_guard(layout: Layout, errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Turn a failed collective (one of ``errors``, the types the framework raises, whose
    message speaks of the transport) into :class:`LostPeer` (exit status 4), instead of a
    traceback or a hang. Any other unexpected exception in one of several processes is
    printed and ends that process at once (exit 1), so that the others stop on their next
    collective rather than wait for it at the runtime's shutdown. A single process, and our
    own errors, are left alone."""
    try:
        yield
    except LenetError:
        raise
    except Exception as e:
        if not layout.distributed:
            raise
        text = str(e).strip()
        if isinstance(e, errors) and any(w in text.lower() for w in LOST_CONTACT):
            raise LostPeer(f"{layout}: lost contact with the other processes (one of them "
                           "stopped or crashed; its own output says why); stopping. The "
                           f"runtime said: {text.splitlines()[0]}") from None
        traceback.print_exc()
        exit_now(1)
