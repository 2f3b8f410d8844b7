"""A population run (``--seeds``): one process trains a member per seed, each on the batches
``--seed S`` alone would train on. The loop, checkpoint and signals are a single run's; what
differs is here: the batches (one per member each step), the accounting of (steps, members)
losses, the epoch's records (one per member and a summary, the line showing mean ± s.d.) and
a weights file per member."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lenet_spec import save_weights
from lenet_train.checkpoints import Position, State
from lenet_train.cli import lr_at
from lenet_train.data import epoch_order
from lenet_train.run import Run

MEMBER_WEIGHTS = "weights-seed-{seed}.safetensors"
"""A member's trained weights' file name in the workdir."""


def member_weights(workdir: Path, seed: int) -> Path:
    """Where the member of seed ``seed`` writes its trained weights."""
    return workdir / MEMBER_WEIGHTS.format(seed=seed)


def mean_sd(values: np.ndarray) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return float(values.mean()), sd


class PopulationRun(Run):
    """A run of one member per seed of ``args.seeds``; member m is the network of seed
    ``seeds[m]``. Positions hold (steps, members) losses and a correct count per member."""

    @property
    def seeds(self) -> list[int]:
        return list(self.args.seeds)

    @property
    def members(self) -> int | None:
        return len(self.args.seeds)

    def epoch_batches(self, pos: Position) -> np.ndarray:
        """The (steps, members, batch) training indices of ``pos``'s epoch: member m's are
        those of a single run at its seed."""
        orders = [epoch_order(len(self.train_x), self.args.batch_size, seed, pos.epoch)
                  for seed in self.seeds]
        order = np.stack(orders, axis=1)
        return order[: max(self.total_steps - (pos.step - pos.done), 0)]

    def check_finite(self, losses: np.ndarray, first_step: int) -> None:
        """Stop the run (exit 3) at the first non-finite loss of any member, naming the step
        and the member's seed."""
        bad = np.argwhere(~np.isfinite(losses))
        if len(bad):
            step, m = (int(i) for i in bad[0])
            self.diverged(f"the loss of seed {self.seeds[m]} is {losses[step, m]} at step "
                          f"{first_step + step}")

    def end_epoch(self, pos: Position, test: tuple[np.ndarray, np.ndarray]) -> dict:
        """Log the epoch that ``pos`` has just finished: a metrics.jsonl record per member (a
        single run's, with its ``seed``), then a summary record (mean and ``*_sd`` over the
        members, ``seeds``, timing of the whole population), and the mean ± s.d. line; returns
        the summary. A non-finite test loss of any member stops the run."""
        test_loss, test_acc = (np.asarray(t, dtype=np.float64) for t in test)
        for m, value in enumerate(test_loss):
            if not math.isfinite(value):
                self.diverged(f"the test loss of seed {self.seeds[m]} is {value} after step "
                              f"{pos.step}")
        if self.args.log_steps:
            self.log.member_steps(pos.step - pos.done, self.seeds, pos.losses)
        images = pos.done * self.args.batch_size
        lr = lr_at(self.args.schedule, self.args.lr, max(pos.step - 1, 0), self.total_steps)
        train_loss = np.asarray(pos.losses, dtype=np.float64).mean(axis=0)
        train_acc = np.asarray(pos.correct, dtype=np.float64) / images
        members = [{"epoch": pos.epoch, "step": pos.step, "seed": seed,
                    "train_loss": float(train_loss[m]), "train_accuracy": float(train_acc[m]),
                    "test_loss": float(test_loss[m]), "test_accuracy": float(test_acc[m]),
                    "lr": lr} for m, seed in enumerate(self.seeds)]
        summary: dict = {"epoch": pos.epoch, "step": pos.step, "seeds": self.seeds,
                         "members": len(self.seeds)}
        for name, values in (("train_loss", train_loss), ("train_accuracy", train_acc),
                             ("test_loss", test_loss), ("test_accuracy", test_acc)):
            summary[name], summary[f"{name}_sd"] = mean_sd(values)
        summary.update({"epoch_s": pos.epoch_s,
                        "images_per_sec": images * len(self.seeds) / max(pos.epoch_s, 1e-9),
                        "wall_s": self.wall_s(), "lr": lr})
        if self.data:
            summary["data"] = {"dataset": self.data["dataset"], "source": self.data["source"],
                               "checksum": self.data["checksum"]}
        self.log.population_epoch(members, summary)
        return summary

    def save_weights(self, state: State) -> None:
        """Write each member's trained weights to WORKDIR/weights-seed-S.safetensors."""
        for m, seed in enumerate(self.seeds):
            save_weights(member_weights(self.workdir, seed),
                         {k: v[m] for k, v in state.weights.items()}, self.spec)
        self.log.say(f"weights: {member_weights(self.workdir, self.seeds[0])}"
                     + (f" … {member_weights(self.workdir, self.seeds[-1]).name} "
                        f"({len(self.seeds)} files)" if len(self.seeds) > 1 else ""))
