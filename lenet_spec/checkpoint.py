"""Checkpoints: flat float tensors plus JSON metadata in one safetensors file, written
atomically. Nothing is unpickled or executed on load."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lenet_spec.atomic import atomic_write_bytes

FORMAT = "lenet-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def save_checkpoint(path: Path, tensors: Mapping[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write ``tensors`` and JSON-able ``meta`` to ``path`` atomically."""
    from safetensors.numpy import save

    arrays = {k: np.array(v, order="C") for k, v in tensors.items()}  # keeps 0-d arrays 0-d
    data = save(arrays, metadata={"format": FORMAT, "meta": json.dumps(meta)})
    atomic_write_bytes(path, data)


def load_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors and metadata of a checkpoint written by :func:`save_checkpoint`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if metadata.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a lenet checkpoint")
        meta = json.loads(metadata["meta"])
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e})") from None
    return tensors, meta
