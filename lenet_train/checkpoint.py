"""Checkpoints: named arrays plus JSON metadata in one safetensors file, written atomically.
Nothing is unpickled or executed on load."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lenet_spec import read_lenet_file, write_safetensors

FORMAT = "lenet-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def save_checkpoint(path: Path, tensors: Mapping[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write ``tensors`` and JSON-able ``meta`` to ``path`` atomically."""
    write_safetensors(path, tensors, {"format": FORMAT, "meta": json.dumps(meta)})


def load_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors and metadata of a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    tensors, metadata = read_lenet_file(path, FORMAT, "meta", "checkpoint", CheckpointError)
    try:
        meta = json.loads(metadata["meta"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: damaged checkpoint metadata ({e})") from None
    return tensors, meta
