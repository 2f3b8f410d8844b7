"""What the command line reads: a module class from a Python file, and a state dict file
(``torch.load(weights_only=True)``: no code runs)."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lenet_port.errors import PortError, first_line


def load_class(target: str) -> Callable[..., Any]:
    """NAME of FILE.py:NAME, imported from the file: an nn.Module class, or a function that
    returns a module (a factory such as ``make_model``)."""
    file, sep, cls_name = target.rpartition(":")
    if not sep or not file or not cls_name:
        raise PortError(f"{target}: expected FILE.py:CLASS (or FILE.py:FUNCTION)")
    path = Path(file)
    if not path.is_file():
        raise PortError(f"{path}: no such file")
    spec = importlib.util.spec_from_file_location(f"_lenet_port_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise PortError(f"{path}: not a Python file")
    source = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))  # its own imports of neighbouring files
    try:
        spec.loader.exec_module(source)
    except Exception as e:
        raise PortError(f"{path}: importing it failed: {first_line(e)}") from None
    finally:
        sys.path.pop(0)
    cls = getattr(source, cls_name, None)
    if cls is None:
        found = sorted(k for k, v in vars(source).items()
                       if isinstance(v, type) and issubclass(v, nn.Module)
                       and v.__module__ == source.__name__)
        functions = sorted(k for k, v in vars(source).items() if inspect.isfunction(v)
                           and v.__module__ == source.__name__ and not k.startswith("_"))
        raise PortError(f"{path}: has no {cls_name!r}; the nn.Module classes it defines: "
                        f"{', '.join(found) or 'none'}"
                        + (f"; its functions: {', '.join(functions)}" if functions else ""))
    if not ((isinstance(cls, type) and issubclass(cls, nn.Module)) or inspect.isfunction(cls)):
        raise PortError(f"{path}: {cls_name} is neither an nn.Module class nor a function that "
                        "returns a module")
    return cls


def build_module(target: str, make: Callable[..., Any], kwargs: dict[str, Any]) -> nn.Module:
    """``make(**kwargs)``, checked to be a module; what fails is one :class:`PortError`."""
    name = getattr(make, "__name__", target)
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    try:
        module = make(**kwargs)
    except Exception as e:
        hint = (" (give its arguments as JSON with --kwargs, e.g. --kwargs "
                "'{\"num_classes\": 10}')" if not kwargs else "")
        raise PortError(f"{target}: {name}({shown}) failed: {first_line(e)}{hint}") from None
    if not isinstance(module, nn.Module):
        raise PortError(f"{target}: {name}({shown}) returned a {type(module).__name__}, not an "
                        "nn.Module")
    return module


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict file (names to tensors), read with ``torch.load(weights_only=True)``: no
    code runs; anything else is one :class:`PortError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise PortError(f"{path}: no such state dict file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PortError(f"{path}: not a state dict torch.load reads with weights_only=True "
                        f"({first_line(e)})") from None
    if not (isinstance(state, dict)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        keys = f" with keys {sorted(state)[:5]}" if isinstance(state, dict) else ""
        raise PortError(f"{path}: holds a {type(state).__name__}{keys}, not a state dict "
                        "(names to tensors, as module.state_dict() gives)")
    return state


def load_state_dict(module: nn.Module, path: Path) -> None:
    """Load a state dict file into ``module``."""
    state = read_state_dict(path)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise PortError(f"{path}: does not fit {type(module).__name__}: {detail}") from None
