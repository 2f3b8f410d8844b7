"""What the loop carries: where a run stands (:class:`Position`) and what a framework's trainer
holds (:class:`State`), both as plain numpy values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Position:
    """Where a run stands: the epoch, the steps of it done, the optimizer steps done in all,
    and the epoch's results so far: the per-step losses, (steps, members), a correct count per
    member, (members,), and the seconds spent. A single run is a run of one member."""

    epoch: int = 0
    done: int = 0
    step: int = 0
    losses: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), np.float32))
    correct: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    epoch_s: float = 0.0

    @classmethod
    def start(cls, members: int = 1) -> Position:
        """Where a fresh run of ``members`` members stands."""
        return cls(losses=np.zeros((0, members), np.float32),
                   correct=np.zeros(members, np.int64))

    def next_epoch(self) -> Position:
        """Where the run stands once this position's epoch is over."""
        return Position(self.epoch + 1, 0, self.step, self.losses[:0].copy(),
                        np.zeros_like(self.correct))

    def copy(self) -> Position:
        """A copy that later steps do not change."""
        return Position(self.epoch, self.done, self.step, np.array(self.losses, copy=True),
                        np.array(self.correct, copy=True), self.epoch_s)


@dataclass
class State:
    """A framework's training state as named numpy arrays: canonical weights (torch's
    ``state_dict`` names and layouts), the optimizer's tensors, RNG state, and JSON-able extras
    (torch's param groups; on load, the whole checkpoint's metadata). A population's tensors
    are stacked along a leading member axis."""

    weights: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray]
    rng: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> State:
        """A copy that owns its arrays (the trainer may reuse the ones it handed out)."""
        def own(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {k: np.array(v, copy=True) for k, v in d.items()}

        return State(own(self.weights), own(self.optimizer), own(self.rng), dict(self.meta))
