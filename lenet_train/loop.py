"""The one training loop of both programs, and the :class:`Trainer` it is written against.

Keras 3's design: one framework-free ``fit`` loop, one framework-specific step. A trainer
(``lenet_jax.trainer.JaxBackend``, ``lenet_torch.trainer.TorchBackend``) holds the model and the
optimizer state where its framework keeps them, runs optimizer steps on the batches it is told
to, evaluates, and converts its state to and from named numpy arrays. :func:`fit` owns the rest:

- **Epochs and batches.** Epoch ``e``'s batch order is a function of (seed, e) alone
  (:func:`lenet_train.data.epoch_order`), so both frameworks, every device layout and every
  restart see the same batches. The loop hands the backend calls of at most
  ``steps_per_call`` steps that start at multiples of it within the epoch, so a resumed run
  repeats the calls of an uninterrupted one.
- **Report points.** What a call returns (per-step losses, correct counts) stays on the
  device; the loop fetches it only every :data:`REPORT_EVERY` steps, at a due checkpoint, at
  an epoch's end and when asked to stop, since fetching waits for the device. There it checks
  the losses are finite (:class:`Diverged` naming the step), updates the progress bar, and
  writes a held checkpoint.
- **Checkpoints.** Every ``checkpoint_every`` steps the backend's state is copied and held
  until the next fetched loss, computed from those weights, is known finite; then it is
  written. At every epoch's end and on a stop the state is written at once. Every write is
  in :func:`fit`.
- **Signals.** SIGINT/SIGTERM set a flag; several processes agree on it at report points (a
  collective), so all of them checkpoint and stop after the same step, then raise
  :class:`Interrupted`.
- **Epoch ends.** The backend evaluates the test split; the loop logs the epoch (metrics.jsonl,
  steps.jsonl, the summary line). After the last epoch process 0 writes the weights file. An
  epoch cut short by ``max_steps`` is checkpointed where it stopped, so that a resume with a
  larger ``max_steps`` trains the rest of that epoch, as the longer run would have.
- **Populations.** With ``seeds`` the backend is a population's and the run writes a record
  and a weights file per member: the same loop and the same :class:`Run` (a single run is a
  run of one member), with one batch per member each step.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import numpy as np

from lenet_train.errors import CheckpointError, NonFinite, StateError
from lenet_train.fault import planned
from lenet_train.run import Run
from lenet_train.state import Position, State

REPORT_EVERY = 50
"""Steps between report points, where the loop fetches the device's results."""


class Trainer(Protocol):
    """What a framework supplies to :func:`fit`: the model, its optimizer and its steps."""

    steps_per_call: int
    """The most optimizer steps one :meth:`train` call runs."""

    def start(self, run: Run, restore: State | None) -> None:
        """Build the model and optimizer from ``run.spec`` and ``run.config``, then load
        ``run.init_weights``, or everything in ``restore`` (:class:`StateError` if it does not
        fit); put the data where the steps read it."""

    def begin_epoch(self, order: np.ndarray, images: np.ndarray | None = None) -> None:
        """Take the epoch's (steps, batch) training indices of the global batches (a
        population's: (steps, members, batch)), and, when the images change each epoch
        (--augment), its training images (NCHW float32)."""

    def train(self, first: int, count: int, step: int) -> Any:
        """Run optimizer steps on batches ``first`` … ``first + count - 1`` of the epoch
        (``step`` is the run's index of the first, for the schedule); return the per-step
        losses and correct counts as device values, without waiting for them."""

    def fetch(self, pending: list[Any]) -> tuple[np.ndarray, int]:
        """The per-step losses (global batch means) and the correct count of the
        :meth:`train` results ``pending``, all processes' together (a population's: (steps,
        members) losses and a count per member)."""

    def evaluate(self) -> tuple[float, float]:
        """Mean loss and accuracy over the test split (a population's: one per member)."""

    def state(self) -> State:
        """The current state as named numpy arrays the caller owns (later steps do not change
        them: a held checkpoint keeps them while the run goes on)."""

    def model(self) -> Any:
        """The trained network in its framework, in evaluation mode (a population's: a list,
        one network per member)."""


def fit(run: Run, backend: Trainer) -> list[dict]:
    """Train ``run`` with ``backend`` to its last step; returns the epochs' metrics records.
    Raises :class:`Diverged` at a non-finite loss or weight and :class:`Interrupted` after
    the checkpoint a signal asked for."""
    ckpt, pos = run.checkpoints, run.start.copy()
    try:
        backend.start(run, run.restore)
    except StateError as e:
        raise CheckpointError(f"{ckpt.path}: {e}") from None
    history: list[dict] = []
    held: tuple[State, Position] | None = None  # a due checkpoint, until its weights train on
    k_max = backend.steps_per_call
    fault = planned()
    with run.watching_signals():
        try:
            for epoch in range(pos.epoch, run.config.epochs):
                order = run.epoch_batches(pos)
                if len(order) == 0:
                    break
                backend.begin_epoch(order, run.epoch_images(epoch))
                pending: list[Any] = []
                t0, before = time.perf_counter(), pos.epoch_s
                with run.log.bar(len(order), epoch, initial=pos.done) as bar:
                    while pos.done < len(order):
                        i = pos.done
                        k = min(k_max - i % k_max, len(order) - i)
                        pending.append(backend.train(i, k, pos.step))
                        pos.done, pos.step = i + k, pos.step + k
                        if fault:
                            fault.after(pos.step - k, pos.step)
                        due = ckpt.due(pos.step - k, pos.step) and pos.done < len(order)
                        report = (i // REPORT_EVERY != pos.done // REPORT_EVERY
                                  or pos.done == len(order) or due)
                        stop = run.stop_requested(report)
                        if report or held or stop:
                            losses, correct = backend.fetch(pending)
                            pending = []
                            run.account(pos, losses, correct,
                                        before + time.perf_counter() - t0, bar)
                            if held:  # the losses after it are finite: its weights train on
                                ckpt.save(*held, run.wall_s())
                                held = None
                        if stop:
                            bar.close()
                            ckpt.save(backend.state(), pos, run.wall_s())
                            raise run.interrupted_at(pos)
                        if due:
                            held = backend.state(), pos.copy()
                history += run.end_epoch(pos, backend.evaluate())
                cut = pos.done < run.steps_per_epoch  # by max_steps: the run's last epoch
                if not cut:
                    pos = pos.next_epoch()
                ckpt.save(backend.state(), pos, run.wall_s())  # a cut epoch goes on from here
                if cut:
                    break
        except NonFinite as e:
            raise run.diverged(str(e)) from None
    if run.layout.writer:
        run.save_weights(backend.state())
    return history
