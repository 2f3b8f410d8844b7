"""A run's checkpoint: the file (named arrays and JSON metadata in one safetensors file, written
atomically; nothing unpickled or executed on load), the settings a run keeps for life, and
:class:`Checkpoints`, which writes a run's checkpoint, and reads it back, checked once, on
resume (trimming the run's logs to it)."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lenet_spec import (
    Spec,
    WeightsError,
    canonical_dtype,
    check_shapes,
    check_weights,
    read_lenet_file,
    write_safetensors,
)
from lenet_train.config import KEPT, Config, shown_seeds
from lenet_train.errors import CheckpointError, NonFinite
from lenet_train.state import Position, State
from lenet_util import atomic_write_bytes, not_a_file

FORMAT = "lenet-checkpoint"
CHECKPOINT = "checkpoint.safetensors"
"""The checkpoint's file name in the workdir."""


def settings(config: Config, spec: Spec, data: Mapping[str, Any]) -> dict[str, Any]:
    """What a run keeps for life as JSON values: the spec, the :data:`KEPT` settings of
    ``config`` and the data's content (checksums)."""
    kept: dict[str, Any] = {"spec": spec.to_dict()}
    kept.update({k: getattr(config, k) for k in KEPT})
    kept["augment"] = list(config.augment)
    kept["seeds"] = None if config.seeds is None else list(config.seeds)
    kept["data"] = dict(data.get("content", {}))
    return kept


def _flag(key: str) -> str:
    return "data" if key == "data" else "--" + key.replace("_", "-")


def _shown(key: str, value: Any) -> str:
    if key == "spec" and isinstance(value, dict):
        return repr(value.get("name"))
    if key == "augment":
        return ",".join(value) if value else "none"
    if key == "seeds" and isinstance(value, list):
        return shown_seeds(value)
    if key == "data" and isinstance(value, dict):
        return f"of SHA-256 train {value.get('train')}, test {value.get('test')}"
    return "none" if value is None else str(value)


def check_resume(path: Path, meta: dict[str, Any], now: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint ``meta`` was written (by either
    framework: checkpoints are framework-neutral) with the settings ``now``
    (:func:`settings`), naming the flag, the old value and the new."""
    if meta.get("framework") not in ("jax", "torch"):
        raise CheckpointError(f"{path}: damaged checkpoint metadata (framework "
                              f"{meta.get('framework')!r})")
    before = meta.get("settings")
    if not isinstance(before, dict):
        raise CheckpointError(f"{path}: written by an earlier lenet that did not record the "
                              "settings a run keeps for life, so they cannot be checked against "
                              "this run's; start afresh (--overwrite), or resume it with the "
                              "version that wrote it")
    first = [k for k in ("spec", "seeds") if k in before]  # a population's seed is its first
    for key in [*first, *(k for k in before if k not in first)]:
        old, new = before[key], now.get(key)
        if key == "spec" and old != new:
            raise CheckpointError(
                f"{path}: written for spec {_shown(key, old)}, not --spec {_shown(key, new)} "
                "(their layers differ); a run resumes with the spec it started with")
        if old != new:
            raise CheckpointError(
                f"{path}: written with {_flag(key)} {_shown(key, old)}, now "
                f"{_shown(key, new)}; a run resumes with the settings it started with "
                "(--epochs, --max-steps and --lr may change)")


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's metadata, from its header alone (the tensors are not read)."""
    what = not_a_file(path)
    if what is not None:
        raise CheckpointError(f"{path}: no such checkpoint" if what.startswith("nothing")
                              else f"{path}: {what}, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a readable safetensors file (shorter than "
                                      "its header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(16 * 2**20, Path(path).stat().st_size - 8):
                raise CheckpointError(f"{path}: not a readable safetensors file (a {n:,}-byte "
                                      "header)")
            header = json.loads(f.read(n))
        metadata = header.get("__metadata__") if isinstance(header, dict) else None
        if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a lenet checkpoint (no meta in its metadata)")
        meta = json.loads(metadata["meta"])
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a readable safetensors file (its header: "
                              f"{type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: damaged checkpoint metadata (not a JSON object)")
    return meta


def save_checkpoint(path: Path, tensors: Mapping[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write ``tensors`` and JSON-able ``meta`` to ``path`` atomically."""
    write_safetensors(path, tensors, {"format": FORMAT, "meta": json.dumps(meta)})


def load_checkpoint(path: Path, check: Callable[[dict, dict], None] | None = None
                    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors and metadata of a checkpoint written by :func:`save_checkpoint`; ``check``
    sees the header's shapes first (and raises for a file it refuses)."""
    path = Path(path)
    tensors, metadata = read_lenet_file(path, FORMAT, "meta", "checkpoint", CheckpointError,
                                        check)
    try:
        meta = json.loads(metadata["meta"])
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint metadata ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: damaged checkpoint metadata (not a JSON object)")
    return tensors, meta


def check_position(pos: Position, steps_per_epoch: int, losses: bool = True) -> str | None:
    """Why ``pos`` cannot be where a run of ``steps_per_epoch`` steps an epoch stood, or None:
    the steps before its epoch at most the epochs before it could hold (fewer when --max-steps
    cut them short), its losses one finite value per step done (unless not ``losses``: the
    metadata alone)."""
    spe = steps_per_epoch
    if not (0 <= pos.done <= spe and pos.epoch >= 0 and pos.step >= pos.done):
        return f"position epoch {pos.epoch}, step {pos.step}, {pos.done} of {spe} steps done"
    if pos.step - pos.done > pos.epoch * spe:
        return (f"step {pos.step} is past where epoch {pos.epoch} with {pos.done} of its {spe} "
                "steps done can stand")
    if not losses:
        return None
    if len(pos.losses) != pos.done:
        return f"{len(pos.losses)} losses for {pos.done} steps done"
    if not (np.all(np.isfinite(pos.losses)) and math.isfinite(pos.epoch_s) and pos.epoch_s >= 0):
        return "a saved loss or time is not a finite number"
    return None


@dataclass
class Checkpoints:
    """The checkpoint of one run in ``workdir``: written by process 0 alone (``writer``),
    read by every process on resume. A population's tensors are stacked along a leading
    member axis; a single run's losses and correct count are saved without one."""

    workdir: Path
    framework: str
    spec: Spec
    config: Config
    steps_per_epoch: int
    writer: bool = True
    settings: dict[str, Any] = field(default_factory=dict)
    """What the run keeps for life (:func:`settings`), recorded in every checkpoint."""
    last_step: int | None = None
    """The step of the last checkpoint written or resumed from."""

    @property
    def path(self) -> Path:
        return self.workdir / CHECKPOINT

    @property
    def members(self) -> int | None:
        """A population's size, else None."""
        return self.config.members

    def due(self, before: int, after: int) -> bool:
        """Whether the steps ``before`` → ``after`` crossed a multiple of checkpoint_every."""
        every = self.config.checkpoint_every
        return bool(every) and before // every != after // every

    def save(self, state: State, pos: Position, wall_s: float) -> None:
        """Write WORKDIR/checkpoint.safetensors atomically now: canonical weights, optimizer
        state, position and partial epoch results, RNG state, spec and settings, and
        ``wall_s``, the seconds the run has trained. :class:`NonFinite` if a weight is not
        finite (nothing is written); :class:`CheckpointError` if the file cannot be written
        (the previous one is kept)."""
        bad = [k for k, v in state.weights.items() if not np.all(np.isfinite(v))]
        if bad:
            raise NonFinite(f"weight {bad[0]!r} is not finite after step {pos.step}")
        tensors = {f"model.{k}": v for k, v in state.weights.items()}
        tensors.update({f"optim.{k}": v for k, v in state.optimizer.items()})
        tensors.update({f"rng.{k}": v for k, v in state.rng.items()})
        losses = np.asarray(pos.losses, dtype=np.float32)
        correct = np.asarray(pos.correct)
        if self.members is None:
            losses, correct = losses.reshape(len(losses), 1)[:, 0], correct.reshape(1)[0]
        tensors["progress.losses"] = losses
        c = self.config
        meta = {"framework": self.framework, "optimizer": c.optimizer,
                "spec": self.spec.to_dict(), "epoch": pos.epoch, "done": pos.done,
                "step": pos.step, "correct": correct.tolist(), "epoch_s": pos.epoch_s,
                "batch_size": c.batch_size, "seed": c.seed,
                "steps_per_epoch": self.steps_per_epoch, "wall_s": wall_s,
                "settings": self.settings, **state.meta}
        if self.writer:
            try:
                save_checkpoint(self.path, tensors, meta)
            except OSError as e:
                raise CheckpointError(f"{self.path}: cannot write the checkpoint "
                                      f"({e.strerror or e}); the previous one, if any, is "
                                      "kept") from None
        self.last_step = pos.step

    def load(self, total: int, finished: Callable[[], bool]) -> tuple[State, Position, float]:
        """The state and position to resume from, and the seconds trained before, checked
        once, before anything of the run is written: the metadata (settings, position, the
        run not complete: at step ``total`` or past its epochs with ``finished()`` true, its
        weights written), then the tensors (this spec's shapes, a member count's). Any
        problem is one :class:`CheckpointError`. Process 0 then trims the logs to the
        checkpoint."""
        path = self.path
        meta = read_meta(path)
        check_resume(path, meta, self.settings)
        try:
            epoch, done, step = (int(meta[k]) for k in ("epoch", "done", "step"))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise CheckpointError(f"{path}: damaged checkpoint metadata ({e!r} missing or "
                                  "invalid)") from None
        spe = meta.get("steps_per_epoch")
        why = check_position(Position(epoch, done, step), spe if isinstance(spe, int) else 0,
                             losses=False)
        if why and spe == self.steps_per_epoch:
            raise CheckpointError(f"{path}: damaged checkpoint ({why})")
        epochs, max_steps = self.config.epochs, self.config.max_steps
        if (step >= total or epoch >= epochs) and finished():
            capped = max_steps is not None and step >= max_steps
            if capped and epoch < epochs:  # stopped inside its epochs by --max-steps
                where, advice = f"step {step} of --max-steps {max_steps}", "a larger --max-steps"
            else:
                where = (f"epoch {epoch} of --epochs {epochs}" if epoch >= epochs
                         else f"step {step} of {total}")
                advice = "more --epochs" + (" and a larger --max-steps" if capped else "")
            raise CheckpointError(f"{path}: the run is complete ({where}); its weights are "
                                  f"written. To train on, resume with {advice}")
        tensors, meta = load_checkpoint(path, self._check_header)
        weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            for m in range(self.members or 1):
                check_weights(self.spec, weights if self.members is None
                              else {k: v[m] for k, v in weights.items()})
        except WeightsError as e:
            raise CheckpointError(f"{path}: not a checkpoint of this --spec: {e}") from None
        bad = next((k for k, v in tensors.items() if k.startswith(("model.", "optim."))
                    and v.dtype.kind == "f" and not np.all(np.isfinite(v))), None)
        if bad is not None:
            raise CheckpointError(f"{path}: tensor {bad!r} holds NaN or infinite values; the "
                                  "checkpoint is damaged (a run never writes one that is not "
                                  "finite)")
        wrong = [k for k, v in weights.items() if v.dtype != canonical_dtype(k)]
        if wrong:
            raise CheckpointError(f"{path}: tensor {'model.' + wrong[0]!r} is "
                                  f"{weights[wrong[0]].dtype}, expected "
                                  f"{canonical_dtype(wrong[0])}")
        if meta.get("steps_per_epoch") != self.steps_per_epoch:
            raise CheckpointError(
                f"{path}: written with {meta.get('steps_per_epoch')} steps an epoch, now "
                f"{self.steps_per_epoch} (another --train-size or data); a run resumes with "
                "the settings it started with")
        try:
            losses = np.asarray(tensors["progress.losses"], dtype=np.float32)
            if self.members is None:
                if losses.ndim != 1:
                    raise ValueError(f"progress.losses of shape {losses.shape}, not (steps,)")
                losses = losses.reshape(-1, 1)
            position = Position(int(meta["epoch"]), int(meta["done"]), int(meta["step"]),
                                losses, self._correct(meta["correct"]), float(meta["epoch_s"]))
            wall_before = float(meta["wall_s"])
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise CheckpointError(f"{path}: damaged checkpoint metadata ({e!r} missing or "
                                  "invalid)") from None
        why = check_position(position, self.steps_per_epoch)
        if why:
            raise CheckpointError(f"{path}: damaged checkpoint ({why})")
        self.last_step = position.step
        if self.writer:
            self._trim_logs(position)
        state = State(weights, {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")},
                      {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}, meta)
        return state, position, wall_before

    def _correct(self, value: Any) -> np.ndarray:
        """The saved correct count(s): an integer, or one per member in a population."""
        if self.members is None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"correct is not an integer: {value!r}")
            return np.array([value], np.int64)
        counts = np.asarray(value)
        if counts.shape != (self.members,) or counts.dtype.kind not in "iu":
            raise ValueError(f"correct is not {self.members} integers")
        return counts.astype(np.int64)

    def _check_header(self, shapes: dict[str, tuple[int, ...]], metadata: dict) -> None:
        """Before any tensor is read: the weights are this spec's (stacked, in a population:
        one per member), and nothing else is larger than what a run saves (an optimizer slot,
        the epoch's losses, a generator state)."""
        weights = {k[6:]: tuple(v) for k, v in shapes.items() if k.startswith("model.")}
        p = self.members
        if p is not None:
            stacked = [k for k, v in weights.items() if v[:1] != (p,)]
            if stacked:
                raise CheckpointError(f"{self.path}: not a checkpoint of a population of {p} "
                                      f"(tensor {stacked[0]!r} has shape {weights[stacked[0]]})")
            weights = {k: v[1:] for k, v in weights.items()}
            losses = tuple(shapes.get("progress.losses", ()))
            if len(losses) != 2 or losses[1] != p:
                raise CheckpointError(f"{self.path}: damaged checkpoint (progress.losses of "
                                      f"shape {losses}, not (steps, {p}))")
        try:
            check_shapes(self.spec, weights)
        except WeightsError as e:
            raise CheckpointError(f"{self.path}: not a checkpoint of this --spec: {e}") from None
        largest = (p or 1) * max([math.prod(s) for s in self.spec.param_shapes.values()]
                                 + [self.steps_per_epoch, 2**20])
        for name, shape in shapes.items():
            if not name.startswith("model.") and math.prod(shape) > largest:
                raise CheckpointError(f"{self.path}: tensor {name!r} of shape {shape} is larger "
                                      "than anything a run of this spec saves")

    def _trim_logs(self, pos: Position) -> None:
        """Drop what the logs recorded after the checkpoint (a run killed after writing an
        epoch's metrics but before its checkpoint would otherwise repeat that epoch)."""
        epoch_start = pos.step - pos.done
        for name, keep in (("metrics.jsonl", lambda r: r["epoch"] < pos.epoch),
                           ("steps.jsonl", lambda r: r["step"] < epoch_start)):
            path = self.workdir / name
            if not path.exists():
                continue
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if keep(json.loads(line)):
                        kept.append(line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a kill
            atomic_write_bytes(path, "".join(kept).encode())
