"""Stage 4, assemble and check: the chain as a spec and its canonical weights, checked to give
the module's logits; :func:`to_spec` and :func:`port` run all four stages."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lenet_port.chain import Step, dropout_flags, read_chain
from lenet_port.errors import SUPPORTED, PortError, batch_shape, first_line
from lenet_port.trace import quiet, run_graph, trace_module
from lenet_spec import (
    MAX_LAYERS,
    BatchNorm,
    Conv,
    Flatten,
    Layer,
    Linear,
    Spec,
    SpecError,
    canonical_dtype,
)
from lenet_torch.model import LeNet, set_weights

MAX_INPUT = 2**24
"""The most values an input image may have for the porter to run the module on it."""
CHECK_BATCH = 4
TRACE_BATCH = 3  # differs from CHECK_BATCH: a batch size written into forward fails the check
LOGIT_TOL = 1e-5
"""The check's bound: max |Δ| of the logits, relative to max(1, max |logit|)."""


@dataclass
class Ported:
    """What :func:`port` found: the spec, its canonical weights, the tracer that read the module
    and the check's logit gap."""

    spec: Spec
    weights: dict[str, np.ndarray]
    tracer: str
    gap: float


def to_spec(module: nn.Module, input_shape: Sequence[int], name: str | None = None,
            output: int | None = None) -> tuple[Spec, dict[str, np.ndarray]]:
    """The spec of ``module`` on images of ``input_shape`` (C, H, W), and its canonical
    weights (parameters and buffers from its ``state_dict``), checked: the torch port built
    from them gives the module's logits on a random batch (max |Δ| ≤ 1e-5 · max(1, |logits|)).

    Layer names are the module's attribute paths made valid (``features.0`` →
    ``features_0``); ``name`` names the spec (default: the module's class). A forward that
    returns a tuple (``return logits, features``) ports with ``output`` the index of the
    logits in it. Anything a spec cannot express raises :class:`PortError` naming the module
    or graph node.

    The module is run on random batches in evaluation mode, so lazy modules
    (``nn.LazyLinear``, …) get initialised; its mode is restored, and torch's random
    generators are left as they were (what ``torch.rand`` gives next is unchanged).
    """
    result = port(module, input_shape, name, output)
    return result.spec, result.weights


def port(module: nn.Module, input_shape: Sequence[int], name: str | None = None,
         output: int | None = None) -> Ported:
    """:func:`to_spec`, with the tracer used and the check's logit gap."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):  # the caller's generators as they were
        return _port(module, input_shape, name, output)


def _port(module: nn.Module, input_shape: Sequence[int], name: str | None,
          output: int | None) -> Ported:
    if not isinstance(module, nn.Module):
        raise PortError(f"to_spec takes an nn.Module, got {type(module).__name__}")
    name = name or type(module).__name__
    shape = tuple(input_shape)
    if len(shape) not in (2, 3) or not all(isinstance(d, int) and d > 0 for d in shape):
        raise PortError(f"{name}: input_shape must be (C, H, W) of positive ints (or (H, W) "
                        f"for images without a channel axis, (H, W, C) for channels last), got "
                        f"{input_shape!r}")
    if math.prod(shape) > MAX_INPUT:
        raise PortError(f"{name}: input_shape {shape} is {math.prod(shape):,} values an image, "
                        f"more than the {MAX_INPUT:,} the porter runs a module on (LeNet-style "
                        "inputs are a few thousand)")
    modules = sum(1 for _ in module.modules())
    if modules > MAX_LAYERS:
        raise PortError(f"{name}: {modules:,} modules, more than the {MAX_LAYERS:,} layers a "
                        "spec may have")
    first = next(iter(module.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn((TRACE_BATCH, *shape), generator=g).to(device, dtype)
    was_training = module.training
    try:
        module.eval()
        try:
            with torch.no_grad(), quiet():
                module(x)
        except Exception as e:
            shape_n = batch_shape(tuple(x.shape), TRACE_BATCH)
            raise PortError(f"{name}: running it on a batch of {shape_n} images failed: "
                            f"{first_line(e)}") from None
        gm, tracer = trace_module(module, x)
        if len(gm.graph.nodes) > 2 * MAX_LAYERS:
            raise PortError(f"{name}: its graph has {len(gm.graph.nodes):,} operations, more "
                            f"than the {MAX_LAYERS:,} layers a spec may have")
        steps, channels_last = read_chain(module, gm, run_graph(gm, x, name), name, output)
        dropouts = [s for s in steps if s.eval_flag is not None]
        if dropouts:
            module.train()
            flags = dropout_flags(module, x, tracer)
            module.eval()
            if len(flags) != len(dropouts):
                raise PortError(f"{name}: its graph in training mode has {len(flags)} "
                                f"functional dropouts, in evaluation {len(dropouts)}; a spec's "
                                "network is the same graph in both")
            for step, flag in zip(dropouts, flags, strict=True):
                if step.eval_flag:
                    raise PortError(f"{step.where}: drops in evaluation too (training=True "
                                    "always); pass training=self.training, or use nn.Dropout")
                if not flag:
                    step.layer = None  # training=False in both modes: the identity
            steps = [s for s in steps if s.layer is not None]
        if steps and len(steps[-1].out_shape) == 3 and steps[-1].out_shape[1:] == (1, 1):
            # ends in a 1×1 map (a DCGAN discriminator's (N, 1, 1, 1)): its logits, flat
            steps.append(Step(Flatten(), f"{name}'s output", steps[-1].out_shape[:1]))
        if channels_last:  # the module takes (N, H, W, C)
            spec_shape, fed = (shape[2], shape[0], shape[1]), "NHWC"
        else:
            spec_shape, fed = (shape, "NCHW") if len(shape) == 3 else ((1, *shape), "NHW")
        spec, weights = assemble(name, spec_shape, steps, fed)
        gap = check_logits(module, spec, weights, shape, device, dtype, output)
    finally:
        module.train(was_training)
    return Ported(spec, weights, tracer, gap)


def valid_name(path: str, prefix: str, taken: set[str]) -> str:
    """``path`` as a layer name: a valid identifier, not yet ``taken``."""
    name = re.sub(r"\W", "_", path)
    if not name or not (name[0].isalpha() or name[0] == "_"):
        name = f"{prefix}_{name}"
    base, n = name, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def assemble(name: str, shape: tuple[int, ...], steps: list[Step],
             fed: str = "NCHW") -> tuple[Spec, dict[str, np.ndarray]]:
    """The spec the steps make (its images fed as ``fed``), and its canonical weights; each
    step's seen shape checked against the spec's."""
    taken: set[str] = set()
    owners: dict[str, str] = {}
    layers: list[Layer] = []
    weights: dict[str, np.ndarray] = {}
    for step in steps:
        layer = step.layer
        if isinstance(layer, (Conv, Linear, BatchNorm)):
            if step.path in owners:
                raise PortError(f"{step.where}: {step.path} is applied a second time (its "
                                f"first use: {owners[step.path]}); a spec's layers each hold "
                                "their own weights")
            owners[step.path] = step.where
            layer_name = valid_name(step.path, layer.prefix, taken)
            layer = type(layer)(**{**layer_fields(layer), "name": layer_name})
            for suffix, tensor in step.state.items():
                key = f"{layer_name}.{suffix}"
                weights[key] = tensor.detach().cpu().numpy().astype(canonical_dtype(key))
        layers.append(layer)
    try:
        spec = Spec(name, shape, tuple(layers), fed)
    except SpecError as e:
        raise PortError(f"{name}: the layers it computes do not make a spec: {e}") from None
    for info, step in zip(spec.infos, steps, strict=True):
        if info.out_shape != step.out_shape:
            raise PortError(f"{step.where}: gives {step.out_shape} per image where the "
                            f"spec's {info.kind} gives {info.out_shape} (ceil_mode, or an "
                            "input shape the module was not written for?)")
    return spec, weights


def layer_fields(layer: Layer) -> dict[str, Any]:
    """The layer's fields by name (to rebuild it renamed)."""
    return {f.name: getattr(layer, f.name) for f in dataclasses.fields(layer)}


def check_logits(module: nn.Module, spec: Spec, weights: dict[str, np.ndarray], shape: tuple,
                 device: torch.device, dtype: torch.dtype, output: int | None = None) -> float:
    """Max |Δ| between the module's logits and those of the torch port built from the spec
    with the weights, on a random batch in evaluation mode; raises beyond :data:`LOGIT_TOL`."""
    net = LeNet(spec, kernels="stock")
    set_weights(net, weights)
    net.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn((CHECK_BATCH, *shape), generator=g)
    with torch.no_grad():
        try:
            want = module(x.to(device, dtype))
        except Exception as e:
            raise PortError(f"{spec.name}: the module fails on a batch of {CHECK_BATCH}: "
                            f"{first_line(e)} (a batch size written into forward?)") from None
        if output is not None:
            want = want[output]
        got = net(x)
        if (isinstance(want, torch.Tensor) and want.dim() != 2 and len(want) == len(got)
                and want.numel() == got.numel()):
            want = want.reshape(got.shape)  # (N, C, 1, 1) or a squeezed (N,): the logits
    if not isinstance(want, torch.Tensor) or tuple(want.shape) != tuple(got.shape):
        got_shape = tuple(want.shape) if isinstance(want, torch.Tensor) else type(want).__name__
        if isinstance(want, torch.Tensor):
            got_shape = batch_shape(got_shape, CHECK_BATCH)
        raise PortError(f"{spec.name}: the module returns {got_shape}; the spec's network "
                        f"{batch_shape(tuple(got.shape), CHECK_BATCH)}")
    want = want.detach().cpu().float()
    gap = float((want - got).abs().max())
    bound = LOGIT_TOL * max(1.0, float(want.abs().max()))
    if not gap <= bound:
        raise PortError(f"{spec.name}: the spec's network gives logits {gap:.3g} away from the "
                        f"module's (bound {bound:.3g}): the module computes something the "
                        f"graph did not show; {SUPPORTED}")
    return gap
