"""A training run's settings: :class:`Config`, the one place the programs' flags are defined as
values, with their defaults and their checks. ``python -m lenet_<framework>.train`` turns its
flags into a Config; ``lenet_jax.fit`` and ``lenet_torch.fit`` take one."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lenet_train.errors import ConfigError
from lenet_train.options import (
    AUGMENTS,
    DATASET_NAMES,
    KERNELS,
    LOSSES,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
)

SEED_MAX = 2**32 - 1
"""The largest seed: what numpy, torch and JAX all take as a seed."""

SEEDS_MAX = 4096
"""The most members ``seeds`` takes (a population's state grows with it)."""


# -------------------------------------------------------------------- checks of single values
# Each raises ValueError with the message the parser shows after "argument --flag: ".


def int_at_least(value: Any, minimum: int) -> int:
    """``value`` if it is an integer ≥ ``minimum``."""
    what = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected {what}, got {value!r}")
    if value < minimum:
        raise ValueError(f"must be at least {minimum}, got {value}")
    return value


FLOAT32_MAX = 3.4028234663852886e38
"""The largest float32: a setting both frameworks compute with in float32 stays below it."""


def non_negative_float(value: Any) -> float:
    """``value`` as a float if it is a finite number ≥ 0 that float32 holds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"must be a finite number ≥ 0, got {value}")
    if value > FLOAT32_MAX:
        raise ValueError(f"must be at most {FLOAT32_MAX:.2g} (float32's largest), got {value}")
    return float(value)


def positive_float(value: Any) -> float:
    """``value`` as a float if it is a finite number > 0."""
    value = non_negative_float(value)
    if value == 0:
        raise ValueError("must be greater than 0")
    return value


def seed(value: Any) -> int:
    """``value`` if it is an integer in [0, SEED_MAX]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    if not 0 <= value <= SEED_MAX:
        raise ValueError(f"must be in [0, {SEED_MAX}], got {value}")
    return value


def _digits(text: str) -> bool:
    """Whether ``text`` is a decimal number in ASCII digits (not "²" or "٣")."""
    return text.isascii() and text.isdigit()


def _quoted(text: str, limit: int = 40) -> str:
    """``text`` as a message quotes it, cut to ``limit`` characters."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r} … ({len(text):,} characters)"


def seed_list(text: str) -> tuple[int, ...]:
    """The seeds of a population written as ``N`` (0 … N-1), ``A-B`` (A … B) or ``A,B,…`` (a
    list, which may hold ranges), each once, at most :data:`SEEDS_MAX`."""
    if _digits(text.strip()):
        count = int(text)
        if not 1 <= count <= SEEDS_MAX:
            raise ValueError(f"N must be in [1, {SEEDS_MAX}], got {count}")
        return tuple(range(count))
    seeds: list[int] = []
    for part in text.split(","):
        ends = part.strip().split("-")
        if len(ends) > 2 or not all(_digits(e.strip()) for e in ends):
            raise ValueError("expected N, A-B or a comma-separated list of seeds and ranges "
                             f"in ASCII digits, got {_quoted(text)}")
        first, last = int(ends[0]), int(ends[-1])
        if last > SEED_MAX:
            raise ValueError(f"seeds must be in [0, {SEED_MAX}], got {last}")
        if first > last:
            raise ValueError(f"the range {part.strip()} is empty")
        if len(seeds) + last - first + 1 > SEEDS_MAX:
            raise ValueError(f"more than {SEEDS_MAX} seeds in {_quoted(text)}")
        seeds.extend(range(first, last + 1))
    return _each_once(seeds, _quoted(text))


def _each_once(seeds: Iterable[int], shown: str) -> tuple[int, ...]:
    seen: set[int] = set()
    for s in seeds:
        if s in seen:
            raise ValueError(f"seed {s} is given twice in {shown}")
        seen.add(s)
    return tuple(seeds)


def seeds_value(value: Any) -> tuple[int, ...] | None:
    """``seeds`` as a tuple: None, a count N (seeds 0 … N-1), text as the flag takes it, or
    a sequence of seeds, each once, at most :data:`SEEDS_MAX`."""
    if value is None:
        return None
    if isinstance(value, str):
        return seed_list(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return seed_list(str(value))
    try:
        seeds = [seed(s) for s in value]
    except TypeError:
        raise ValueError(f"expected N, A-B, A,B,… or a sequence of seeds, got {value!r}") from None
    if not 1 <= len(seeds) <= SEEDS_MAX:
        raise ValueError(f"expected 1 to {SEEDS_MAX} seeds, got {len(seeds)}")
    return _each_once(seeds, shown_seeds(seeds))


def shown_seeds(seeds: tuple[int, ...] | list[int]) -> str:
    """``seeds`` as the flag takes them, runs of consecutive seeds as ranges."""
    parts, i = [], 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)


def augment_value(value: Any) -> tuple[str, ...]:
    """The augmentations as a tuple: text as the flag takes it (``crop,flip``) or a sequence."""
    kinds = ([k.strip() for k in value.split(",") if k.strip()] if isinstance(value, str)
             else list(value))
    if any(k not in AUGMENTS for k in kinds) or (isinstance(value, str) and not kinds):
        raise ValueError(f"expected crop, flip or crop,flip, got {value!r}")
    return tuple(dict.fromkeys(kinds))


def one_of(choices: tuple[str, ...]):
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"invalid choice: {value!r} (choose from "
                             f"{', '.join(repr(c) for c in choices)})")
        return value
    return check


def optional(check):
    return lambda value: None if value is None else check(value)


def path_value(value: Any) -> Path:
    if not isinstance(value, (str, Path)):
        raise ValueError(f"expected a path, got {value!r}")
    return Path(value)


def integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {value!r}")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected True or False, got {value!r}")
    return value


def _setting(default: Any, check, kept: bool = False, framework: str | None = None,
             doc: str = "") -> Any:
    return field(default=default, metadata={"check": check, "kept": kept,
                                            "framework": framework, "doc": doc})


# --------------------------------------------------------------------------------- the config


@dataclass(frozen=True)
class Config:
    """The settings of a training run, as the programs' flags give them (each field is its
    flag's name with underscores, with the flag's default). Checked on construction: a bad
    value or a contradiction raises :class:`lenet_train.ConfigError` (a ``ValueError``) with
    the line the program prints. Settings marked *kept* are a run's for life: a resumed run
    must have the ones it started with. ``framework`` settings are read by that framework's
    program only (the other ignores them, so one Config serves both)."""

    epochs: int = _setting(3, lambda v: int_at_least(v, 1), doc="passes over the training set")
    max_steps: int | None = _setting(None, optional(lambda v: int_at_least(v, 1)),
                                     doc="stop after this many optimizer steps in all")
    batch_size: int = _setting(128, lambda v: int_at_least(v, 1), kept=True,
                               doc="images per optimizer step, all devices together")
    kernels: str = _setting("auto", one_of(KERNELS), doc="stock, fused or auto")
    precision: str = _setting("float32", one_of(PRECISIONS), kept=True,
                              doc="float32, bfloat16 (mixed) or tf32 (GPUs)")
    optimizer: str = _setting("adam", one_of(OPTIMIZERS), kept=True)
    lr: float = _setting(5e-3, positive_float, doc="peak learning rate")
    momentum: float = _setting(0.9, non_negative_float, kept=True)
    weight_decay: float = _setting(0.0, non_negative_float, kept=True)
    schedule: str = _setting("onecycle", one_of(SCHEDULES), kept=True)
    loss: str = _setting("ce", one_of(LOSSES), kept=True)
    seed: int = _setting(0, seed, kept=True)
    seeds: tuple[int, ...] | None = _setting(None, seeds_value, kept=True)
    dataset: str = _setting("mnist", one_of(DATASET_NAMES), kept=True)
    augment: tuple[str, ...] = _setting((), augment_value, kept=True)
    data_dir: Path | None = _setting(None, optional(path_value))
    workdir: Path | None = _setting(None, optional(path_value),
                                    doc="None: runs/<time>-<framework> from the command line, a "
                                        "new temporary folder from Python")
    resume: bool = _setting(False, boolean)
    overwrite: bool = _setting(False, boolean)
    checkpoint_every: int = _setting(250, lambda v: int_at_least(v, 0))
    train_size: int | None = _setting(None, optional(lambda v: int_at_least(v, 1)), kept=True)
    init_weights: Path | None = _setting(None, optional(path_value))
    log_steps: bool = _setting(False, boolean)
    quiet: bool = _setting(False, boolean)
    dist_timeout: float = _setting(120.0, positive_float)
    steps_per_call: int = _setting(10, lambda v: int_at_least(v, 1), framework="jax")
    no_compile_cache: bool = _setting(False, boolean, framework="jax")
    coordinator: str | None = _setting(None, optional(text), framework="jax")
    num_processes: int | None = _setting(None, optional(integer), framework="jax")
    process_id: int | None = _setting(None, optional(integer), framework="jax")
    distributed: bool = _setting(False, boolean, framework="jax")
    compile: bool = _setting(False, boolean, framework="torch")
    threads: int | None = _setting(None, optional(lambda v: int_at_least(v, 1)),
                                   framework="torch")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            try:
                value = f.metadata["check"](getattr(self, f.name))
            except ValueError as e:
                raise ConfigError(f"{flag(f.name)}: {e}") from None
            object.__setattr__(self, f.name, value)
        if self.seeds is not None:
            if self.seed not in (0, self.seeds[0]):
                raise ConfigError("--seed and --seeds contradict each other; give every seed "
                                  "to --seeds")
            if self.augment:
                raise ConfigError("--seeds: not with --augment (every member would need its "
                                  "own augmented copy of the training set); train the seeds "
                                  "as separate runs")
            object.__setattr__(self, "seed", self.seeds[0])  # seeds the framework's generator
        given = [self.coordinator, self.num_processes, self.process_id]
        if any(v is not None for v in given) and any(v is None for v in given) \
                and not self.distributed:
            raise ConfigError("--coordinator, --num-processes and --process-id go together (or "
                              "set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                              "JAX_PROCESS_ID)")
        if self.num_processes is not None:
            if self.num_processes < 1:
                raise ConfigError(f"--num-processes must be at least 1, got "
                                  f"{self.num_processes}")
            if self.process_id is not None and not 0 <= self.process_id < self.num_processes:
                raise ConfigError(f"--process-id must be in 0 … {self.num_processes - 1}, "
                                  f"got {self.process_id}")
        c = self.coordinator
        if c is not None and (":" not in c or not c.rsplit(":", 1)[1].isdigit()):
            raise ConfigError(f"--coordinator must be HOST:PORT, got {c!r}")

    @property
    def members(self) -> int | None:
        """A population's size (``seeds``); None for a single run."""
        return None if self.seeds is None else len(self.seeds)

    def replace(self, **changes: Any) -> Config:
        """This config with ``changes`` (checked as on construction)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r}; Config's settings are the "
                              "training flags' names with underscores")
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON values (paths as text, tuples as lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


KEPT = tuple(f.name for f in dataclasses.fields(Config) if f.metadata["kept"])
"""The settings a run keeps for life (and the spec, and the data's content): a resumed run
refuses a change to any of them. What may change: where it ends (epochs, max_steps: the
schedule is laid over the new length), lr (the way on after a divergence), and how it runs
(checkpoint_every, kernels, threads, compile, steps_per_call, log_steps, quiet, data_dir for
the same data)."""


def flag(name: str) -> str:
    """The command-line flag of setting ``name``."""
    return "--" + name.replace("_", "-")
