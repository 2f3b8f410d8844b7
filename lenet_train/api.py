"""Training from Python: :func:`train` runs one training run in the calling process and returns
a :class:`Result`. ``lenet_jax.fit`` and ``lenet_torch.fit`` call it with their framework's
:class:`Backend`; ``python -m lenet_<framework>.train`` is the same call behind its flags.

A failure is an exception (:mod:`lenet_train.errors`), never an exit: a notebook keeps its
kernel, and the message is the line the program would print.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lenet_spec import Spec, load_spec
from lenet_train.cli import default_workdir
from lenet_train.config import Config
from lenet_train.distributed import Layout, peers_guard
from lenet_train.errors import ConfigError, LenetError, active
from lenet_train.loop import Trainer, fit
from lenet_train.runlog import read_jsonl
from lenet_train.setup import prepare_run, release


class Framework(Protocol):
    """What a framework supplies around :func:`lenet_train.loop.fit`: settings, processes and
    the first line."""

    framework: str
    """``"jax"`` or ``"torch"``: names the program (``python -m lenet_<framework>.train``) and
    the checkpoints it writes."""
    transport_errors: tuple[type[BaseException], ...]
    """The exception types with which the framework reports a failed collective."""

    def configure(self, config: Config) -> None:
        """Apply the process-wide settings of ``config`` (threads, caches, the seed)."""

    def connect(self, config: Config) -> Layout:
        """Join the run's other processes, if any; this process's place among them."""

    def disconnect(self) -> None:
        """Leave the run's other processes (nothing when alone)."""

    def any_process(self, flag: bool) -> bool:
        """Whether ``flag`` is set in any process (a collective: all of them call it)."""

    def describe(self) -> str:
        """The framework, its version and the devices it trains on, for the first line."""


class Backend(Framework, Trainer, Protocol):
    """A framework's whole side of a run: :class:`Framework` and :class:`Trainer`."""


@dataclass(frozen=True)
class Result:
    """A finished training run."""

    model: Any
    """The trained network in its framework, in evaluation mode (a population: a list, one
    network per seed)."""
    weights: dict[str, np.ndarray] | list[dict[str, np.ndarray]]
    """The trained weights, canonical (torch's ``state_dict`` names and layouts; a
    population: a list, one per seed)."""
    history: list[dict[str, Any]]
    """The metrics records of every epoch, as in metrics.jsonl (a population: per epoch a
    record per member, then the summary)."""
    workdir: Path
    """The folder holding config.json, metrics.jsonl, the checkpoint and the weights file."""
    spec: Spec
    config: Config


def train(spec: str | Path | Spec, config: Config, backend: Backend,
          argv: list[str] | None = None) -> Result:
    """Train ``spec`` (a preset's name, a JSON file or a :class:`Spec`) with ``config`` on
    ``backend`` in this process; the :class:`Result`. ``config.workdir`` None: a new folder,
    ``runs/<time>-<framework>`` for a program (``argv``: its command line, for the way to
    continue), a temporary one from Python. Raises a
    :class:`~lenet_util.errors.LenetError` for anything the user can fix."""
    spec = load_spec(spec)
    if not isinstance(config, Config):
        raise TypeError(f"config must be a lenet_train.Config, not {type(config).__name__}")
    if config.resume and config.workdir is None:
        raise ConfigError("--resume needs --workdir: the folder of the run to continue")
    workdir = config.workdir
    if workdir is None:
        workdir = (default_workdir(backend.framework) if argv is not None
                   else Path(tempfile.mkdtemp(prefix=f"lenet-{backend.framework}-")))
    backend.configure(config)
    layout = backend.connect(config)
    leave_at_once = False  # this process alone failed among several: no shutdown barrier
    try:
        run = prepare_run(spec, config, backend.framework, workdir, layout,
                          backend.any_process, argv)
        try:
            run.log.say(f"{backend.describe()}; {spec.name}, {run.total_steps} steps; "
                        f"workdir {workdir}")
            if run.resuming():
                run.log.say(run.resuming())
            with peers_guard(layout, backend.transport_errors):
                records = fit(run, backend)
                weights = backend.state().weights
                model = backend.model()
        finally:
            release(workdir)
    except LenetError as e:
        leave_at_once = active() and not e.everyone
        raise
    finally:
        if not leave_at_once:
            backend.disconnect()
    metrics = workdir / "metrics.jsonl"
    history = read_jsonl(metrics) if layout.writer and metrics.is_file() else records
    if config.seeds is not None:
        weights = [{k: v[m] for k, v in weights.items()} for m in range(len(config.seeds))]
    return Result(model, weights, history, workdir, spec, config)
