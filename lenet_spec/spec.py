"""The framework-free description of a LeNet-style network.

A :class:`Spec` is a name, an input shape (C, H, W) and a sequence of layers. From it alone
we infer every layer's output shape, the canonical parameter names and shapes (torch's
``state_dict`` keys and layouts), parameter counts and multiply-accumulates. Both ports build
from a spec and are tested against what it infers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from lenet_spec.datasets import SHAPES, fitting
from lenet_spec.layers import (
    LAYER_TYPES,
    OUTPUT_TYPES,
    PARAMETERISED,
    BatchNorm,
    Conv,
    Flatten,
    Layer,
    Linear,
    Shape,
    SpecError,
    _positive_int,
    fmt_shape,
    infer,
    kind,
    layer_from_dict,
    layer_to_dict,
)

MAX_PARAMS = 2**31


# --------------------------------------------------------------------------- inference

COUNTERS = ("num_batches_tracked",)
"""Buffers that count (int64 canonically); every other tensor of the state is float."""


@dataclass(frozen=True)
class LayerInfo:
    """What the spec infers about one layer."""

    index: int
    layer: Layer
    label: str
    in_shape: Shape
    out_shape: Shape
    params: dict[str, Shape]
    macs: int
    flattened_from: Shape | None = None
    """For a linear layer fed (through element-wise layers only) by a flatten: the (C, H, W)
    it was flattened from. Ports whose layout is not C, H, W permute this layer's inputs."""
    buffers: dict[str, Shape] = field(default_factory=dict)
    """State that is not learned (batch_norm's running statistics and batch count), in torch's
    ``state_dict`` names and order."""

    @property
    def param_count(self) -> int:
        return sum(math.prod(s) for s in self.params.values())

    @property
    def buffer_count(self) -> int:
        return sum(math.prod(s) for s in self.buffers.values())

    @property
    def fan_in(self) -> int:
        """Inputs feeding one output unit of a conv or linear layer (I/groups·kH·kW or in)."""
        return math.prod(self.params[f"{self.label}.weight"][1:])

    @property
    def kind(self) -> str:
        return kind(self.layer)


def _layer_state(layer: Layer, shape: Shape) -> tuple[dict[str, Shape], dict[str, Shape]]:
    """Canonical parameter and buffer names and shapes of ``layer`` on an input of ``shape``."""
    params: dict[str, Shape] = {}
    buffers: dict[str, Shape] = {}
    if isinstance(layer, Conv):
        params[f"{layer.name}.weight"] = (layer.out_channels, shape[0] // layer.groups,
                                          *layer.kernel_size)
        if layer.bias:
            params[f"{layer.name}.bias"] = (layer.out_channels,)
    elif isinstance(layer, Linear):
        params[f"{layer.name}.weight"] = (layer.out_features, shape[0])
        if layer.bias:
            params[f"{layer.name}.bias"] = (layer.out_features,)
    elif isinstance(layer, BatchNorm):
        if layer.affine:
            params = {f"{layer.name}.weight": (shape[0],), f"{layer.name}.bias": (shape[0],)}
        buffers = {f"{layer.name}.running_mean": (shape[0],),
                   f"{layer.name}.running_var": (shape[0],),
                   f"{layer.name}.num_batches_tracked": ()}
    return params, buffers


# --------------------------------------------------------------------------- the spec


MAX_LAYERS = 1000
"""The most layers a spec may have (a LeNet-style network has tens; the spec file limit, 1 MiB,
holds about this many)."""

FED = ("NCHW", "NHW", "NHWC")
"""How a spec's images come in (:attr:`Spec.fed`)."""

RESERVED_NAMES = frozenset({
    "add_module", "apply", "apply_layer", "bfloat16", "buffers", "call_super_init", "children",
    "compile", "compute_dtype", "cpu", "cuda", "deterministic", "double", "dropout", "dump_patches",
    "eval", "extra_repr", "flatten_hwc", "float", "forward", "get_buffer", "get_extra_state",
    "get_parameter", "get_submodule", "half", "ipu", "iter_children", "iter_modules", "kernels",
    "load_state_dict", "matmul_precision", "modules", "mtia", "named_buffers", "named_children",
    "named_modules", "named_parameters", "parameters", "perturb", "precision",
    "register_backward_hook", "register_buffer", "register_forward_hook",
    "register_forward_pre_hook", "register_full_backward_hook", "register_full_backward_pre_hook",
    "register_load_state_dict_post_hook", "register_load_state_dict_pre_hook", "register_module",
    "register_parameter", "register_state_dict_post_hook", "register_state_dict_pre_hook",
    "requires_grad_", "rngs", "set_attributes", "set_extra_state", "set_submodule", "share_memory",
    "sow", "spec", "state_dict", "T_destination", "to", "to_empty", "train", "training", "type",
    "xpu", "zero_grad",
})
"""Names a layer cannot take: attributes of the ports' models (torch.nn.Module's and
nnx.Module's methods and state, and the LeNet classes' own), which a layer of that name would
shadow (the ports keep each named layer as an attribute of that name, so that its parameters
carry torch's ``state_dict`` names). ``tests/test_models.py`` checks the list against both
models."""


@dataclass(frozen=True)
class Spec:
    """A LeNet-style network: ``name``, ``input_shape`` (C, H, W) and ``layers``.

    Unnamed conv and linear layers are named ``conv1, conv2, …`` and ``fc1, fc2, …`` in
    order. Construction validates the whole network and raises :class:`SpecError`.
    """

    name: str
    input_shape: Shape
    layers: tuple[Layer, ...] = field(default_factory=tuple)
    fed: str = "NCHW"
    """How the network's images come in: ``"NCHW"``, with their channel axis first;
    ``"NHW"``, one-channel images without it (the network adds the axis itself, as a module
    whose forward begins ``x.unsqueeze(1)``); ``"NHWC"``, channels last (a module whose forward
    begins ``x.permute(0, 3, 1, 2)``, as observations come from many environments). The ports
    take such a spec's images in that form and in their own (torch NCHW, JAX NHWC)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(f"spec name must be a non-empty string, got {self.name!r}")
        shape = self.input_shape
        if not isinstance(shape, (list, tuple)) or len(shape) != 3:
            raise SpecError(f"{self.name}: input_shape must be [C, H, W], got {shape!r}")
        for d in shape:
            _positive_int(d, f"{self.name}: input_shape {list(shape)!r}: each size")
        object.__setattr__(self, "input_shape", tuple(shape))
        if self.fed not in FED:
            raise SpecError(f"{self.name}: fed must be one of {', '.join(FED)}, got {self.fed!r}")
        if self.fed == "NHW" and shape[0] != 1:
            raise SpecError(f"{self.name}: fed NHW (images without a channel axis) needs one "
                            f"input channel, not {shape[0]}")
        if not isinstance(self.layers, (list, tuple)):
            raise SpecError(f"{self.name}: layers must be a list, got {type(self.layers).__name__}")
        if len(self.layers) > MAX_LAYERS:
            raise SpecError(f"{self.name}: {len(self.layers):,} layers, more than the "
                            f"{MAX_LAYERS:,} a spec may have (a LeNet-style network has tens)")
        object.__setattr__(self, "layers", tuple(self._named(self.layers)))
        _ = self.infos  # validates
        if self.param_count > MAX_PARAMS:
            raise SpecError(f"{self.name}: {self.param_count:,} parameters, more than the "
                            f"{MAX_PARAMS:,} (8 GiB of float32) a spec may have")

    def _named(self, layers: Any) -> list[Layer]:
        named: list[Layer] = []
        counters: dict[str, int] = {}
        seen: set[str] = set()
        for i, layer in enumerate(layers):
            if not isinstance(layer, tuple(LAYER_TYPES.values())):
                raise SpecError(f"{self.name}: layer {i} is not a layer: {layer!r}")
            if isinstance(layer, PARAMETERISED):
                counters[layer.prefix] = counters.get(layer.prefix, 0) + 1
                if layer.name is None:
                    auto = f"{layer.prefix}{counters[layer.prefix]}"
                    layer = dataclasses.replace(layer, name=auto)
                if not isinstance(layer.name, str) or not layer.name.isidentifier():
                    raise SpecError(
                        f"layer {i} ({layer.type}): name {layer.name!r} is not a valid identifier"
                    )
                if layer.name.startswith("_") or layer.name in RESERVED_NAMES:
                    raise SpecError(
                        f"layer {i} ({layer.type}): name {layer.name!r} is reserved (the ports' "
                        "models have an attribute of that name: forward, train, eval, spec, "
                        "kernels, ..., or a name starting with _); pick another")
                if layer.name in seen:
                    raise SpecError(f"layer {i} ({layer.type}): duplicate name {layer.name!r}")
                seen.add(layer.name)
            named.append(layer)
        return named

    @cached_property
    def infos(self) -> tuple[LayerInfo, ...]:
        """Per layer: label, input and output shapes, canonical parameters and buffers, MACs."""
        infos: list[LayerInfo] = []
        shape: Shape = self.input_shape
        flattened_from: Shape | None = None
        source = "the network input"  # what a batch_norm here would normalise
        for i, layer in enumerate(self.layers):
            label = getattr(layer, "name", None) or layer.type
            where = getattr(layer, "name", None) or f"layer {i} ({layer.type})"
            out, macs = infer(layer, shape, where)
            if isinstance(layer, OUTPUT_TYPES) and i != len(self.layers) - 1:
                raise SpecError(f"{where}: {layer.type} is an output layer and must be the "
                                f"network's last (it is followed by {len(self.layers) - 1 - i} "
                                "more)")
            if isinstance(layer, BatchNorm) and source in ("the network input", "a flatten"):
                raise SpecError(
                    f"{where}: batch_norm normalises a conv's channels or a linear layer's "
                    f"features; here it would normalise {source} (put it after the conv or "
                    "linear layer whose outputs it should normalise)")
            params, buffers = _layer_state(layer, shape)
            feeds_from = None
            if isinstance(layer, Linear):
                feeds_from, flattened_from = flattened_from, None
            elif isinstance(layer, Flatten):
                flattened_from = shape
            if isinstance(layer, (Conv, Linear)):
                source = layer.type
            elif isinstance(layer, Flatten):
                source = "a flatten"
            infos.append(LayerInfo(i, layer, label, shape, out, params, macs, feeds_from,
                                   buffers))
            shape = out
        if len(shape) != 1:
            raise SpecError(
                f"{self.name}: the network ends in a {fmt_shape(shape)} tensor; "
                "it must end flat (N, classes): add a flatten (and a linear layer unless the "
                "flattened map's size is the class count)"
            )
        if not any(params for info in infos for params in info.params):
            raise SpecError(f"{self.name}: the network has no parameters to train (no conv, "
                            "linear or affine batch_norm layer)")
        return tuple(infos)

    # -- what the ports and tests ask of a spec

    @property
    def output_shape(self) -> Shape:
        return self.infos[-1].out_shape

    @property
    def num_classes(self) -> int:
        return self.output_shape[0]

    @property
    def output(self) -> str:
        """What the network returns: ``"logits"``, or after an output layer ``"log_probs"``
        (log_softmax) or ``"probs"`` (softmax)."""
        last = self.layers[-1]
        return {"log_softmax": "log_probs", "softmax": "probs"}.get(last.type, "logits")

    @property
    def logits_end(self) -> int:
        """How many of the layers compute the logits: all but a final output layer."""
        return len(self.layers) - (self.output != "logits")

    @property
    def param_shapes(self) -> dict[str, Shape]:
        """Canonical parameter names and shapes, in layer order (torch's ``parameters()``)."""
        return {k: v for info in self.infos for k, v in info.params.items()}

    @property
    def buffer_shapes(self) -> dict[str, Shape]:
        """Canonical buffer names and shapes, in layer order (torch's ``buffers()``)."""
        return {k: v for info in self.infos for k, v in info.buffers.items()}

    @property
    def state_shapes(self) -> dict[str, Shape]:
        """Parameters and buffers together, in torch's ``state_dict`` names and order: what a
        weights file and ``get_weights`` hold."""
        return {k: v for info in self.infos for k, v in {**info.params, **info.buffers}.items()}

    @property
    def buffer_count(self) -> int:
        return sum(info.buffer_count for info in self.infos)

    @property
    def param_count(self) -> int:
        return sum(info.param_count for info in self.infos)

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one forward pass of one image."""
        return sum(info.macs for info in self.infos)

    @property
    def activations(self) -> int:
        """Values one image's forward pass holds: its input and every layer's output."""
        return math.prod(self.input_shape) + sum(math.prod(i.out_shape) for i in self.infos)

    def layer_param_counts(self) -> dict[str, int]:
        """Parameter count of each parameterised layer, by layer name."""
        return {info.label: info.param_count for info in self.infos if info.params}

    def summary(self) -> str:
        """One table: layer, kind, output shape, parameters, buffers (when the spec has any),
        MACs, and totals."""
        buffers = self.buffer_count > 0
        rows = [("layer", "kind", "output shape", "params", *(("buffers",) if buffers else ()),
                 "MACs")]
        rows.append(("input", "", fmt_shape(self.input_shape), "", *(("",) if buffers else ()),
                     ""))
        for info in self.infos:
            rows.append((
                info.label, info.kind, fmt_shape(info.out_shape),
                f"{info.param_count:,}" if info.params else "",
                *((f"{info.buffer_count:,}" if info.buffers else "",) if buffers else ()),
                f"{info.macs:,}" if info.macs else "",
            ))
        total = ("total", "", "", f"{self.param_count:,}",
                 *((f"{self.buffer_count:,}",) if buffers else ()), f"{self.macs:,}")
        ncol = len(total)
        widths = [max(len(r[i]) for r in [*rows, total]) for i in range(ncol)]
        align = ["<", "<", "<", *([">"] * (ncol - 3))]

        def line(r: tuple[str, ...]) -> str:
            cells = zip(r, align, widths, strict=True)
            return "  ".join(f"{c:{a}{w}}" for c, a, w in cells).rstrip()

        rule = "-" * len(line(tuple("x" * w for w in widths)))
        size_kib = self.param_count * 4 / 1024
        out = [f"{self.name}: input {fmt_shape(self.input_shape)} -> {self.num_classes} classes"]
        out += [rule, line(rows[0]), rule, *(line(r) for r in rows[1:]), rule, line(total), rule]
        held = f" and {self.buffer_count:,} buffer values" if buffers else ""
        out.append(f"{self.param_count:,} parameters ({size_kib:,.1f} KiB float32){held}, "
                   f"{self.macs:,} MACs per image")
        out.append(self.datasets_line())
        return "\n".join(out)

    def datasets_line(self) -> str:
        """Which of the training programs' datasets take this spec's input shape."""
        fits = fitting(self.input_shape)
        if not fits:
            return (f"datasets: none of {', '.join(SHAPES)} fits its "
                    f"{fmt_shape(self.input_shape)} input")
        padded = sorted({fmt_shape(SHAPES[n][1:]) for n in fits
                         if SHAPES[n][1:] != self.input_shape[1:]})
        note = (f" (their {', '.join(padded)} images padded to "
                f"{fmt_shape(self.input_shape[1:])})" if padded else "")
        return f"datasets: {', '.join(fits)}{note}"


    # -- JSON form

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; ``Spec.from_dict(s.to_dict()) == s``."""
        out: dict[str, Any] = {"name": self.name, "input_shape": list(self.input_shape)}
        if self.fed != "NCHW":
            out["fed"] = self.fed
        out["layers"] = [layer_to_dict(layer) for layer in self.layers]
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Any) -> Spec:
        """Parse the JSON form, with one :class:`SpecError` for anything malformed."""
        if not isinstance(data, dict):
            raise SpecError(f"a spec must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"name", "input_shape", "fed", "layers"}
        if unknown:
            raise SpecError(
                f"unknown spec key(s) {sorted(unknown)}; expected name, input_shape, layers "
                "(and fed)"
            )
        for key in ("name", "input_shape", "layers"):
            if key not in data:
                raise SpecError(f"spec is missing {key!r}")
        if not isinstance(data["layers"], list):
            raise SpecError(f"spec 'layers' must be a list, got {type(data['layers']).__name__}")
        layers = [layer_from_dict(i, d) for i, d in enumerate(data["layers"])]
        return cls(data["name"], data["input_shape"], tuple(layers), data.get("fed", "NCHW"))


def widen(spec: Spec, factor: float) -> Spec:
    """``spec`` with every conv's channels and every linear layer's features but the last
    multiplied by ``factor`` (at least 1 each): the same network, wider."""
    last = max((i for i, layer in enumerate(spec.layers) if isinstance(layer, Linear)), default=-1)
    layers = []
    for i, layer in enumerate(spec.layers):
        if isinstance(layer, Conv):
            g = layer.groups  # channels stay multiples of the groups
            layer = dataclasses.replace(layer, out_channels=g * max(1, round(
                layer.out_channels * factor / g)))
        elif isinstance(layer, Linear) and i != last:
            layer = dataclasses.replace(layer, out_features=max(1, round(layer.out_features
                                                                         * factor)))
        layers.append(layer)
    return Spec(f"{spec.name}_x{factor:g}", spec.input_shape, tuple(layers))
