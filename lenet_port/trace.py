"""Stage 1, trace: the module's graph (torch.fx, else torch.export), every node's value on a
batch, and each node described as the user wrote it (module path or op, and source line)."""

from __future__ import annotations

import contextlib
import io
import logging
import operator
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lenet_port.errors import PortError, batch_shape, first_line

_TORCH_DIR = str(Path(torch.__file__).parent)
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)')


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch.export's warnings, logged errors and printed graphs kept off the user's terminal
    (its loggers have handlers of their own, and its native code writes to the process's
    stderr): a failure reaches them as one PortError."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        logger.setLevel(level)


def trace_module(module: nn.Module, x: torch.Tensor) -> tuple[fx.GraphModule, str]:
    """The module's graph: torch.fx's symbolic trace, else torch.export's ATen graph."""
    try:
        tracer = fx.Tracer()
        tracer.record_stack_traces = True
        graph = tracer.trace(module)
        return fx.GraphModule(module, graph), "torch.fx"
    except Exception as e:  # fx raises many types (TraceError, TypeError, …)
        fx_error = first_line(e)
    try:
        with quiet():
            program = torch.export.export(module, (x,))
        return program.module(), "torch.export"
    except Exception as e:
        raise PortError(f"{type(module).__name__}: cannot trace it: torch.fx says "
                        f"{fx_error!r}; torch.export says {first_line(e)!r}") from None


def run_graph(gm: fx.GraphModule, x: torch.Tensor, name: str) -> dict[fx.Node, Any]:
    """Every node's value on input ``x``."""
    interpreter = fx.Interpreter(gm, garbage_collect_values=False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            interpreter.run(x)
    except Exception as e:
        raise PortError(f"{name}: running it on a batch of {batch_shape(tuple(x.shape), len(x))} "
                        f"images failed: "
                        f"{first_line(e)}") from None
    return interpreter.env


def source_line(node: fx.Node) -> str:
    """' at FILE:LINE: code' for the node's line in the module's own forward (the caller's,
    where a submodule computes it: the line that calls the submodule), then the innermost
    line outside torch when that is another one; empty if unknown."""
    frames = [m.groups() for m in _FRAME.finditer(node.meta.get("stack_trace") or "")
              if not m.group(1).startswith(_TORCH_DIR)]
    if not frames:
        return ""

    def at(frame: tuple[str, str, str]) -> str:
        file, line, code = frame
        return f"{Path(file).name}:{line}: {code.strip()}"

    outer, inner = frames[0], frames[-1]
    return f" at {at(outer)}" + (f" (inside: {at(inner)})" if inner != outer else "")


def op_name(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return f"Tensor.{target}"
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target._schema.name.split('::')[-1]}"
    name = getattr(target, "__name__", str(target))
    if name == "fn" and hasattr(target, "__wrapped__"):
        name = target.__wrapped__.__name__
    if getattr(F, name, None) is target:
        return f"F.{name}"
    if getattr(torch, name, None) is target:
        return f"torch.{name}"
    if getattr(operator, name, None) is target:
        return f"operator.{name}"
    return name


def op_key(node: fx.Node) -> str:
    """The op's name, the same for F.relu, torch.relu, x.relu() and aten.relu."""
    target = node.target
    if node.op == "call_method":
        return str(target)
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    if target is F.max_pool2d or target is F.max_pool2d_with_indices:
        return "max_pool2d"
    if target in (F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices,
                  F._adaptive_max_pool2d):
        return "adaptive_max_pool2d"
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "__name__", "")


def describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(node.target)).__name__}){source_line(node)}"
    return f"node {node.name} ({op_name(node)}){source_line(node)}"
