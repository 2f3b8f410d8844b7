"""Fault injection for tests: ``LENET_FAULT="SIGNAL@STEP"`` (``SIGINT@5``, ``SIGKILL@120``)
makes a run send itself SIGNAL once it has trained STEP steps, so that a test stops or kills
it at an exact step whatever the machine's speed or load. Unset, nothing happens."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from lenet_train.errors import ConfigError

VARIABLE = "LENET_FAULT"
SIGNALS = ("SIGINT", "SIGTERM", "SIGKILL")


@dataclass(frozen=True)
class Fault:
    """A signal the run sends itself after its step ``step``."""

    signal: signal.Signals
    step: int

    def after(self, first: int, last: int) -> None:
        """Called after steps ``first`` … ``last - 1`` trained: the signal, if its step was
        among them."""
        if first < self.step <= last:
            signal.raise_signal(self.signal)


def planned() -> Fault | None:
    """The fault ``LENET_FAULT`` asks for, or None."""
    value = os.environ.get(VARIABLE)
    if not value:
        return None
    name, _, step = value.partition("@")
    if name not in SIGNALS or not step.isdigit() or int(step) < 1:
        raise ConfigError(f"{VARIABLE}: must be SIGNAL@STEP with SIGNAL one of "
                          f"{', '.join(SIGNALS)} and STEP at least 1, got {value!r}")
    return Fault(signal.Signals[name], int(step))
