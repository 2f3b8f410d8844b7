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
from pathlib import Path
from typing import Any, ClassVar, Union

Shape = tuple[int, ...]
Pair = tuple[int, int]


MAX_PARAMS = 2**31


class SpecError(ValueError):
    """A spec that cannot describe a network; the message names the layer and the problem."""


def _pair(value: Any, what: str, *, minimum: int = 1) -> Pair:
    """An int or an [h, w] pair of ints, each at least ``minimum``, as an (h, w) tuple."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise SpecError(f"{what} must be an int or an [h, w] pair, got {list(value)!r}")
        pair = tuple(value)
    else:
        pair = (value, value)
    for v in pair:
        if isinstance(v, bool) or not isinstance(v, int):
            raise SpecError(f"{what} must be an int or an [h, w] pair of ints, got {value!r}")
        if v < minimum:
            raise SpecError(f"{what} must be at least {minimum}, got {value!r}")
    return pair  # type: ignore[return-value]


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{what} must be a positive int, got {value!r}")
    if value < 1:
        raise SpecError(f"{what} must be positive, got {value!r}")
    return value


def _fmt_pair(p: Pair) -> str:
    return f"{p[0]}×{p[1]}"


def _fmt_shape(s: Shape) -> str:
    return "×".join(str(d) for d in s)


# --------------------------------------------------------------------------- layer kinds


@dataclass(frozen=True)
class Conv:
    """2-D convolution with bias: ``out_channels`` filters of ``kernel_size``."""

    out_channels: int
    kernel_size: Pair
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    name: str | None = None
    type: ClassVar[str] = "conv"
    prefix: ClassVar[str] = "conv"

    def __post_init__(self) -> None:
        where = f"{self.name}: " if self.name else ""
        _positive_int(self.out_channels, f"{where}out_channels")
        object.__setattr__(self, "kernel_size", _pair(self.kernel_size, f"{where}kernel_size"))
        object.__setattr__(self, "stride", _pair(self.stride, f"{where}stride"))
        object.__setattr__(self, "padding", _pair(self.padding, f"{where}padding", minimum=0))


@dataclass(frozen=True)
class _Pool:
    kernel_size: Pair
    stride: Pair | None = None

    def __post_init__(self) -> None:
        k = _pair(self.kernel_size, "kernel_size")
        object.__setattr__(self, "kernel_size", k)
        s = k if self.stride is None else _pair(self.stride, "stride")
        object.__setattr__(self, "stride", s)


@dataclass(frozen=True)
class MaxPool(_Pool):
    """Max pooling over ``kernel_size`` windows; ``stride`` defaults to ``kernel_size``."""

    type: ClassVar[str] = "max_pool"


@dataclass(frozen=True)
class AvgPool(_Pool):
    """Average pooling over ``kernel_size`` windows; ``stride`` defaults to ``kernel_size``."""

    type: ClassVar[str] = "avg_pool"


@dataclass(frozen=True)
class ReLU:
    """max(x, 0)."""

    type: ClassVar[str] = "relu"


@dataclass(frozen=True)
class Tanh:
    """tanh(x)."""

    type: ClassVar[str] = "tanh"


@dataclass(frozen=True)
class Sigmoid:
    """1 / (1 + exp(-x))."""

    type: ClassVar[str] = "sigmoid"


@dataclass(frozen=True)
class Flatten:
    """(C, H, W) -> (C·H·W,), in C, H, W order (torch's order)."""

    type: ClassVar[str] = "flatten"


@dataclass(frozen=True)
class Linear:
    """Fully connected layer with bias: y = x Wᵀ + b."""

    out_features: int
    name: str | None = None
    type: ClassVar[str] = "linear"
    prefix: ClassVar[str] = "fc"

    def __post_init__(self) -> None:
        where = f"{self.name}: " if self.name else ""
        _positive_int(self.out_features, f"{where}out_features")


Layer = Union[Conv, MaxPool, AvgPool, ReLU, Tanh, Sigmoid, Flatten, Linear]  # noqa: UP007
LAYER_TYPES: dict[str, type] = {
    cls.type: cls for cls in (Conv, MaxPool, AvgPool, ReLU, Tanh, Sigmoid, Flatten, Linear)
}
ACTIVATIONS = ("relu", "tanh", "sigmoid")
PARAMETERISED = (Conv, Linear)


# --------------------------------------------------------------------------- inference


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

    @property
    def param_count(self) -> int:
        return sum(math.prod(s) for s in self.params.values())

    @property
    def fan_in(self) -> int:
        """Inputs feeding one output unit of a conv or linear layer (I·kH·kW or in)."""
        return math.prod(self.params[f"{self.label}.weight"][1:])

    @property
    def kind(self) -> str:
        layer = self.layer
        if isinstance(layer, Conv):
            extra = f" {_fmt_pair(layer.kernel_size)}"
            if layer.stride != (1, 1):
                extra += f" s{_fmt_pair(layer.stride)}"
            if layer.padding != (0, 0):
                extra += f" p{_fmt_pair(layer.padding)}"
            return "conv" + extra
        if isinstance(layer, (MaxPool, AvgPool)):
            extra = f" {_fmt_pair(layer.kernel_size)}"
            if layer.stride != layer.kernel_size:
                extra += f" s{_fmt_pair(layer.stride)}"
            return layer.type + extra
        return layer.type


def _infer(layer: Layer, shape: Shape, where: str) -> tuple[Shape, int]:
    """Output shape and MACs of ``layer`` on an input of ``shape``."""
    if isinstance(layer, (Conv, MaxPool, AvgPool)):
        if len(shape) != 3:
            raise SpecError(
                f"{where}: needs a spatial C×H×W input but gets a flat vector of {shape[0]} "
                f"(remove the flatten before it, or move it after this layer)"
            )
        c, h, w = shape
        (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
        ph, pw = layer.padding if isinstance(layer, Conv) else (0, 0)
        if h + 2 * ph < kh or w + 2 * pw < kw:
            padded = f" (padded {h + 2 * ph}×{w + 2 * pw})" if (ph, pw) != (0, 0) else ""
            raise SpecError(
                f"{where}: input {_fmt_shape(shape)}{padded} is smaller than kernel {kh}×{kw}"
            )
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        if isinstance(layer, Conv):
            out = (layer.out_channels, ho, wo)
            return out, layer.out_channels * ho * wo * c * kh * kw
        return (c, ho, wo), 0
    if isinstance(layer, Flatten):
        if len(shape) != 3:
            raise SpecError(f"{where}: input is already flat ({shape[0]} features)")
        return (math.prod(shape),), 0
    if isinstance(layer, Linear):
        if len(shape) != 1:
            raise SpecError(
                f"{where}: linear on a spatial {_fmt_shape(shape)} tensor; add a flatten before it"
            )
        return (layer.out_features,), shape[0] * layer.out_features
    return shape, 0  # element-wise activation


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class Spec:
    """A LeNet-style network: ``name``, ``input_shape`` (C, H, W) and ``layers``.

    Unnamed conv and linear layers are named ``conv1, conv2, …`` and ``fc1, fc2, …`` in
    order. Construction validates the whole network and raises :class:`SpecError`.
    """

    name: str
    input_shape: Shape
    layers: tuple[Layer, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(f"spec name must be a non-empty string, got {self.name!r}")
        shape = self.input_shape
        if not isinstance(shape, (list, tuple)) or len(shape) != 3:
            raise SpecError(f"{self.name}: input_shape must be [C, H, W], got {shape!r}")
        for d in shape:
            _positive_int(d, f"{self.name}: input_shape {list(shape)!r}: each size")
        object.__setattr__(self, "input_shape", tuple(shape))
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
                if layer.name in seen:
                    raise SpecError(f"layer {i} ({layer.type}): duplicate name {layer.name!r}")
                seen.add(layer.name)
            named.append(layer)
        return named

    @cached_property
    def infos(self) -> tuple[LayerInfo, ...]:
        """Per layer: label, input and output shapes, canonical parameters, MACs."""
        infos: list[LayerInfo] = []
        shape: Shape = self.input_shape
        flattened_from: Shape | None = None
        for i, layer in enumerate(self.layers):
            label = getattr(layer, "name", None) or layer.type
            where = getattr(layer, "name", None) or f"layer {i} ({layer.type})"
            out, macs = _infer(layer, shape, where)
            params: dict[str, Shape] = {}
            feeds_from = None
            if isinstance(layer, Conv):
                params = {
                    f"{layer.name}.weight": (layer.out_channels, shape[0], *layer.kernel_size),
                    f"{layer.name}.bias": (layer.out_channels,),
                }
            elif isinstance(layer, Linear):
                params = {
                    f"{layer.name}.weight": (layer.out_features, shape[0]),
                    f"{layer.name}.bias": (layer.out_features,),
                }
                feeds_from, flattened_from = flattened_from, None
            elif isinstance(layer, Flatten):
                flattened_from = shape
            infos.append(LayerInfo(i, layer, label, shape, out, params, macs, feeds_from))
            shape = out
        if len(shape) != 1:
            raise SpecError(
                f"{self.name}: the network ends in a {_fmt_shape(shape)} tensor; "
                "it must end flat (N, classes): add a flatten and a linear layer"
            )
        if not any(isinstance(layer, Linear) for layer in self.layers):
            raise SpecError(f"{self.name}: the network has no linear layer to produce logits")
        return tuple(infos)

    # -- what the ports and tests ask of a spec

    @property
    def output_shape(self) -> Shape:
        return self.infos[-1].out_shape

    @property
    def num_classes(self) -> int:
        return self.output_shape[0]

    @property
    def param_shapes(self) -> dict[str, Shape]:
        """Canonical parameter names and shapes, in layer order (torch's ``state_dict``)."""
        return {k: v for info in self.infos for k, v in info.params.items()}

    @property
    def param_count(self) -> int:
        return sum(info.param_count for info in self.infos)

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one forward pass of one image."""
        return sum(info.macs for info in self.infos)

    def layer_param_counts(self) -> dict[str, int]:
        """Parameter count of each parameterised layer, by layer name."""
        return {info.label: info.param_count for info in self.infos if info.params}

    def summary(self) -> str:
        """One table: layer, kind, output shape, parameters, MACs, and totals."""
        rows = [("layer", "kind", "output shape", "params", "MACs")]
        rows.append(("input", "", _fmt_shape(self.input_shape), "", ""))
        for info in self.infos:
            rows.append(
                (
                    info.label,
                    info.kind,
                    _fmt_shape(info.out_shape),
                    f"{info.param_count:,}" if info.params else "",
                    f"{info.macs:,}" if info.macs else "",
                )
            )
        total = ("total", "", "", f"{self.param_count:,}", f"{self.macs:,}")
        widths = [max(len(r[i]) for r in [*rows, total]) for i in range(5)]
        align = ["<", "<", "<", ">", ">"]

        def line(r: tuple[str, ...]) -> str:
            cells = zip(r, align, widths, strict=True)
            return "  ".join(f"{c:{a}{w}}" for c, a, w in cells).rstrip()

        rule = "-" * len(line(tuple("x" * w for w in widths)))
        size_kib = self.param_count * 4 / 1024
        out = [f"{self.name}: input {_fmt_shape(self.input_shape)} -> {self.num_classes} classes"]
        out += [rule, line(rows[0]), rule, *(line(r) for r in rows[1:]), rule, line(total), rule]
        out.append(f"{self.param_count:,} parameters ({size_kib:,.1f} KiB float32), "
                   f"{self.macs:,} MACs per image")
        return "\n".join(out)

    # -- JSON form

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; ``Spec.from_dict(s.to_dict()) == s``."""
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "layers": [_layer_to_dict(layer) for layer in self.layers],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Any) -> Spec:
        """Parse the JSON form, with one :class:`SpecError` for anything malformed."""
        if not isinstance(data, dict):
            raise SpecError(f"a spec must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"name", "input_shape", "layers"}
        if unknown:
            raise SpecError(
                f"unknown spec key(s) {sorted(unknown)}; expected name, input_shape, layers"
            )
        for key in ("name", "input_shape", "layers"):
            if key not in data:
                raise SpecError(f"spec is missing {key!r}")
        if not isinstance(data["layers"], list):
            raise SpecError(f"spec 'layers' must be a list, got {type(data['layers']).__name__}")
        layers = [_layer_from_dict(i, d) for i, d in enumerate(data["layers"])]
        return cls(data["name"], data["input_shape"], tuple(layers))


def _layer_to_dict(layer: Layer) -> dict[str, Any]:
    d: dict[str, Any] = {"type": layer.type}
    for f in dataclasses.fields(layer):
        v = getattr(layer, f.name)
        if isinstance(v, tuple):
            v = v[0] if v[0] == v[1] else list(v)
        d[f.name] = v
    if isinstance(layer, (MaxPool, AvgPool)) and layer.stride == layer.kernel_size:
        del d["stride"]
    if isinstance(layer, Conv):
        if layer.stride == (1, 1):
            del d["stride"]
        if layer.padding == (0, 0):
            del d["padding"]
    return d


def _layer_from_dict(i: int, d: Any) -> Layer:
    if not isinstance(d, dict):
        raise SpecError(f"layer {i}: must be a JSON object, got {d!r}")
    kind = d.get("type")
    if kind not in LAYER_TYPES:
        hint = "missing 'type'" if kind is None else f"unknown type {kind!r}"
        raise SpecError(f"layer {i}: {hint}; expected one of {', '.join(LAYER_TYPES)}")
    cls = LAYER_TYPES[kind]
    fields = {f.name for f in dataclasses.fields(cls)}
    where = f"{d['name']}" if isinstance(d.get("name"), str) else f"layer {i} ({kind})"
    unknown = set(d) - fields - {"type"}
    if unknown:
        expected = ", ".join(sorted(fields)) or "no other keys"
        raise SpecError(f"{where}: unknown key(s) {sorted(unknown)}; {kind} takes {expected}")
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = required - set(d)
    if missing:
        raise SpecError(f"{where}: missing {', '.join(sorted(missing))}")
    kwargs = {k: v for k, v in d.items() if k != "type"}
    try:
        return cls(**kwargs)
    except SpecError as e:
        msg = str(e)
        raise SpecError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def widen(spec: Spec, factor: float) -> Spec:
    """``spec`` with every conv's channels and every linear layer's features but the last
    multiplied by ``factor`` (at least 1 each): the same network, wider."""
    last = max((i for i, layer in enumerate(spec.layers) if isinstance(layer, Linear)), default=-1)
    layers = []
    for i, layer in enumerate(spec.layers):
        if isinstance(layer, Conv):
            layer = dataclasses.replace(layer, out_channels=max(1, round(layer.out_channels
                                                                         * factor)))
        elif isinstance(layer, Linear) and i != last:
            layer = dataclasses.replace(layer, out_features=max(1, round(layer.out_features
                                                                         * factor)))
        layers.append(layer)
    return Spec(f"{spec.name}_x{factor:g}", spec.input_shape, tuple(layers))


def parse_spec_json(text: str, source: str = "<string>") -> Spec:
    """Parse a spec from JSON text; errors name ``source`` (and line and column for bad JSON)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise SpecError(f"{source}: invalid JSON at {where}: {e.msg}") from None
    except RecursionError:
        raise SpecError(f"{source}: JSON nested too deeply") from None
    try:
        return Spec.from_dict(data)
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None


def load_spec(name_or_path: str | Path | Spec) -> Spec:
    """A preset by name, or a spec read from a JSON file."""
    from lenet_spec.presets import PRESETS

    if isinstance(name_or_path, Spec):
        return name_or_path
    key = str(name_or_path)
    if key in PRESETS:
        return PRESETS[key]
    path = Path(key)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"{path}: cannot read spec file: {e}") from None
        return parse_spec_json(text, str(path))
    if path.exists():
        raise SpecError(f"{path}: is not a file")
    if path.suffix or "/" in key or "\\" in key:
        raise SpecError(f"{path}: no such spec file")
    raise SpecError(
        f"unknown spec {key!r}: not a preset ({', '.join(PRESETS)}) nor a path to a JSON file"
    )
