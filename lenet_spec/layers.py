"""The layer kinds a spec is made of, each validated on construction, and what one layer does to
a shape: its output shape and its multiply-accumulates.

Parameterised and stateful layers (conv, linear, batch_norm) carry a ``name``; the spec numbers
unnamed ones per kind (``conv1``, ``fc1``, ``bn1``, …). Everything else is applied by position.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Union

from lenet_util.errors import LenetError

Shape = tuple[int, ...]
Pair = tuple[int, int]


class SpecError(LenetError, ValueError):
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


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{what} must be true or false, got {value!r}")
    return value


def _where(layer: Any) -> str:
    return f"{layer.name}: " if getattr(layer, "name", None) else ""


def fmt_pair(p: Pair) -> str:
    return f"{p[0]}×{p[1]}"


def fmt_shape(s: Shape) -> str:
    return "×".join(str(d) for d in s)


# --------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class Conv:
    """2-D convolution: ``out_channels`` filters of ``kernel_size``, ``stride``, zero
    ``padding``, ``dilation`` between kernel taps, ``groups`` (each filter sees
    in_channels / groups of the input), and a bias unless ``bias`` is false."""

    out_channels: int
    kernel_size: Pair
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    groups: int = 1
    bias: bool = True
    name: str | None = None
    type: ClassVar[str] = "conv"
    prefix: ClassVar[str] = "conv"

    def __post_init__(self) -> None:
        where = _where(self)
        _positive_int(self.out_channels, f"{where}out_channels")
        object.__setattr__(self, "kernel_size", _pair(self.kernel_size, f"{where}kernel_size"))
        object.__setattr__(self, "stride", _pair(self.stride, f"{where}stride"))
        object.__setattr__(self, "padding", _pair(self.padding, f"{where}padding", minimum=0))
        object.__setattr__(self, "dilation", _pair(self.dilation, f"{where}dilation"))
        _positive_int(self.groups, f"{where}groups")
        _flag(self.bias, f"{where}bias")
        if self.out_channels % self.groups:
            raise SpecError(f"{where}groups {self.groups} does not divide out_channels "
                            f"{self.out_channels}")

    @property
    def span(self) -> Pair:
        """The height and width the kernel covers, dilation included."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation,
                                                     strict=True))  # type: ignore[return-value]


@dataclass(frozen=True)
class _Pool:
    kernel_size: Pair
    stride: Pair | None = None
    padding: Pair = (0, 0)
    ceil_mode: bool = False

    def __post_init__(self) -> None:
        k = _pair(self.kernel_size, "kernel_size")
        object.__setattr__(self, "kernel_size", k)
        s = k if self.stride is None else _pair(self.stride, "stride")
        object.__setattr__(self, "stride", s)
        pad = _pair(self.padding, "padding", minimum=0)
        if pad[0] > k[0] // 2 or pad[1] > k[1] // 2:
            raise SpecError(f"padding {fmt_pair(pad)} must be at most half the window "
                            f"{fmt_pair(k)} (torch's rule)")
        object.__setattr__(self, "padding", pad)
        _flag(self.ceil_mode, "ceil_mode")


def pooled_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """The number of windows along one axis, as torch counts them: ``ceil_mode`` adds a last,
    partial window only where it starts inside the input or its left padding."""
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


@dataclass(frozen=True)
class MaxPool(_Pool):
    """Max pooling over ``kernel_size`` windows; ``stride`` defaults to ``kernel_size``;
    ``padding`` pads with −∞ on each side; ``ceil_mode``: a last, partial window at the end
    of an axis the windows do not fit (torch's rules)."""

    type: ClassVar[str] = "max_pool"


@dataclass(frozen=True)
class AvgPool(_Pool):
    """Average pooling over ``kernel_size`` windows; ``stride`` defaults to ``kernel_size``;
    ``padding`` pads with zeros on each side, counted in a window's divisor unless
    ``count_include_pad`` is false; ``ceil_mode``: a last, partial window at the end of an
    axis, whose divisor counts only what lies within the input and its padding (torch's
    rules)."""

    count_include_pad: bool = True
    type: ClassVar[str] = "avg_pool"

    def __post_init__(self) -> None:
        super().__post_init__()
        _flag(self.count_include_pad, "count_include_pad")


@dataclass(frozen=True)
class Scale:
    """Elementwise ``x · scale + shift`` with constants: numbers, or one value per channel of
    a C×H×W map (per feature of a flat vector). What a network does to its input (``x /
    255``, ``(x − mean) / std``) or between layers with numbers it does not learn."""

    scale: float | tuple[float, ...] = 1.0
    shift: float | tuple[float, ...] = 0.0
    type: ClassVar[str] = "scale"

    def __post_init__(self) -> None:
        for name in ("scale", "shift"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                if not value:
                    raise SpecError(f"{name} must be a number or a non-empty list of numbers")
                value = tuple(_number(v, name) for v in value)
            else:
                value = _number(value, name)
            object.__setattr__(self, name, value)
        sizes = {len(v) for v in (self.scale, self.shift) if isinstance(v, tuple)}
        if len(sizes) > 1:
            raise SpecError(f"scale and shift must hold one value per channel each, got "
                            f"{' and '.join(str(s) for s in sorted(sizes))} values")

    @property
    def channels(self) -> int | None:
        """The channel count its per-channel values fix (None: numbers only)."""
        sizes = [len(v) for v in (self.scale, self.shift) if isinstance(v, tuple)]
        return sizes[0] if sizes else None


@dataclass(frozen=True)
class _AdaptivePool:
    output_size: Pair

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_size", _pair(self.output_size, "output_size"))


@dataclass(frozen=True)
class AdaptiveMaxPool(_AdaptivePool):
    """Max pooling to an ``output_size`` map, whatever the input's size: output row i covers
    input rows ⌊i·H/out⌋ to ⌈(i+1)·H/out⌉ (exclusive), likewise columns (torch's windows)."""

    type: ClassVar[str] = "adaptive_max_pool"


@dataclass(frozen=True)
class AdaptiveAvgPool(_AdaptivePool):
    """Average pooling to an ``output_size`` map, over :class:`AdaptiveMaxPool`'s windows."""

    type: ClassVar[str] = "adaptive_avg_pool"


def adaptive_windows(size: int, out: int) -> list[tuple[int, int]]:
    """The [start, end) of each of ``out`` adaptive-pool windows over ``size`` positions:
    ⌊i·size/out⌋ to ⌈(i+1)·size/out⌉, as torch computes them."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


@dataclass(frozen=True)
class LogSoftmax:
    """An output layer: log-probabilities, x − log Σ exp(x) over the classes. Training computes
    the cross-entropy from the logits before it (the NLL of these log-probabilities)."""

    type: ClassVar[str] = "log_softmax"


@dataclass(frozen=True)
class Softmax:
    """An output layer: probabilities, exp(x) / Σ exp(x) over the classes. Training computes the
    cross-entropy from the logits before it, never a softmax of the probabilities."""

    type: ClassVar[str] = "softmax"


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
class GELU:
    """x·Φ(x), Φ the standard normal CDF (``approximate="none"``, torch's default: erf), or
    its tanh approximation (``"tanh"``, Flax's default)."""

    approximate: str = "none"
    type: ClassVar[str] = "gelu"

    def __post_init__(self) -> None:
        if self.approximate not in ("none", "tanh"):
            raise SpecError(f"approximate must be 'none' or 'tanh', got {self.approximate!r}")


@dataclass(frozen=True)
class LeakyReLU:
    """x for x ≥ 0, ``negative_slope``·x below."""

    negative_slope: float = 0.01
    type: ClassVar[str] = "leaky_relu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "negative_slope",
                           _number(self.negative_slope, "negative_slope"))


@dataclass(frozen=True)
class ELU:
    """x for x > 0, ``alpha``·(exp(x) − 1) below."""

    alpha: float = 1.0
    type: ClassVar[str] = "elu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", _number(self.alpha, "alpha"))


@dataclass(frozen=True)
class SiLU:
    """x·sigmoid(x) (swish)."""

    type: ClassVar[str] = "silu"


@dataclass(frozen=True)
class Flatten:
    """(C, H, W) -> (C·H·W,), in C, H, W order (torch's order)."""

    type: ClassVar[str] = "flatten"


@dataclass(frozen=True)
class Linear:
    """Fully connected layer: y = x Wᵀ (+ b unless ``bias`` is false)."""

    out_features: int
    bias: bool = True
    name: str | None = None
    type: ClassVar[str] = "linear"
    prefix: ClassVar[str] = "fc"

    def __post_init__(self) -> None:
        _positive_int(self.out_features, f"{_where(self)}out_features")
        _flag(self.bias, f"{_where(self)}bias")


@dataclass(frozen=True)
class BatchNorm:
    """Batch normalisation of a conv's channels (statistics over N, H, W) or a linear layer's
    features (over N), torch's conventions: running statistics updated as
    ``(1 − momentum)·running + momentum·batch``, the unbiased batch variance stored, ``eps``
    added to the variance; a learned scale and shift unless ``affine`` is false."""

    momentum: float = 0.1
    eps: float = 1e-5
    affine: bool = True
    name: str | None = None
    type: ClassVar[str] = "batch_norm"
    prefix: ClassVar[str] = "bn"

    def __post_init__(self) -> None:
        where = _where(self)
        momentum = _number(self.momentum, f"{where}momentum")
        if not 0 < momentum <= 1:
            raise SpecError(f"{where}momentum must be in (0, 1], got {self.momentum!r}")
        eps = _number(self.eps, f"{where}eps")
        if eps <= 0:
            raise SpecError(f"{where}eps must be greater than 0, got {self.eps!r}")
        _flag(self.affine, f"{where}affine")
        object.__setattr__(self, "momentum", momentum)
        object.__setattr__(self, "eps", eps)


@dataclass(frozen=True)
class _Dropout:
    p: float = 0.5

    def __post_init__(self) -> None:
        p = _number(self.p, "p")
        if not 0 <= p < 1:
            raise SpecError(f"p must be in [0, 1), got {self.p!r}")
        object.__setattr__(self, "p", p)


@dataclass(frozen=True)
class Dropout(_Dropout):
    """In training, each element zeroed with probability ``p``, survivors scaled by
    1 / (1 − p); the identity in evaluation."""

    type: ClassVar[str] = "dropout"


@dataclass(frozen=True)
class Dropout2d(_Dropout):
    """As dropout, but whole channels of a C×H×W map at once."""

    type: ClassVar[str] = "dropout2d"


Layer = Union[Conv, MaxPool, AvgPool, AdaptiveMaxPool, AdaptiveAvgPool, ReLU,  # noqa: UP007
              Tanh, Sigmoid, GELU, LeakyReLU, ELU, SiLU, Flatten, Linear, BatchNorm, Dropout,
              Dropout2d, LogSoftmax, Softmax, Scale]
LAYER_TYPES: dict[str, type] = {
    cls.type: cls for cls in (Conv, MaxPool, AvgPool, AdaptiveMaxPool, AdaptiveAvgPool, ReLU,
                              Tanh, Sigmoid, GELU, LeakyReLU, ELU, SiLU, Flatten, Linear,
                              BatchNorm, Dropout, Dropout2d, LogSoftmax, Softmax, Scale)
}
ACTIVATION_TYPES = (ReLU, Tanh, Sigmoid, GELU, LeakyReLU, ELU, SiLU)
PARAMETERISED = (Conv, Linear, BatchNorm)
"""The named layers: those with parameters or buffers."""
ELEMENTWISE = (*ACTIVATION_TYPES, Dropout, Dropout2d, Scale)
"""Layers that keep a tensor's shape and the order of its elements' meaning."""
OUTPUT_TYPES = (LogSoftmax, Softmax)
"""Layers a network may end in, after its logits: what it returns is then not the logits."""
ADAPTIVE_POOLS = (AdaptiveMaxPool, AdaptiveAvgPool)


def is_monotone(layer: Layer) -> bool:
    """Whether an activation is non-decreasing, so that it commutes with a max-pool."""
    if isinstance(layer, (ReLU, Tanh, Sigmoid)):
        return True
    if isinstance(layer, LeakyReLU):
        return layer.negative_slope >= 0
    if isinstance(layer, ELU):
        return layer.alpha >= 0
    return False


# --------------------------------------------------------------------------- inference


def infer(layer: Layer, shape: Shape, where: str) -> tuple[Shape, int]:
    """Output shape and MACs (per image) of ``layer`` on an input of ``shape``."""
    if isinstance(layer, (Conv, MaxPool, AvgPool, *ADAPTIVE_POOLS, Dropout2d)) and len(shape) != 3:
        raise SpecError(
            f"{where}: needs a spatial C×H×W input but gets a flat vector of {shape[0]} "
            f"(remove the flatten before it, or move it after this layer"
            + ("; on a flat vector use dropout" if isinstance(layer, Dropout2d) else "") + ")"
        )
    if isinstance(layer, (Conv, MaxPool, AvgPool)):
        c, h, w = shape
        span = layer.span if isinstance(layer, Conv) else layer.kernel_size
        (kh, kw), (sh, sw) = span, layer.stride
        ph, pw = layer.padding
        if h + 2 * ph < kh or w + 2 * pw < kw:
            padded = f" (padded {h + 2 * ph}×{w + 2 * pw})" if (ph, pw) != (0, 0) else ""
            dilated = (f" (dilated {fmt_pair(layer.kernel_size)})"
                       if isinstance(layer, Conv) and layer.dilation != (1, 1) else "")
            raise SpecError(f"{where}: input {fmt_shape(shape)}{padded} is smaller than kernel "
                            f"{kh}×{kw}{dilated}")
        if not isinstance(layer, Conv):
            return (c, pooled_size(h, kh, sh, ph, layer.ceil_mode),
                    pooled_size(w, kw, sw, pw, layer.ceil_mode)), 0
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        if c % layer.groups:
            raise SpecError(f"{where}: groups {layer.groups} does not divide the input's "
                            f"{c} channels")
        taps = (c // layer.groups) * math.prod(layer.kernel_size)
        return (layer.out_channels, ho, wo), layer.out_channels * ho * wo * taps
    if isinstance(layer, ADAPTIVE_POOLS):
        return (shape[0], *layer.output_size), 0
    if isinstance(layer, OUTPUT_TYPES) and len(shape) != 1:
        raise SpecError(f"{where}: an output layer over the classes needs a flat (N, classes) "
                        f"input but gets {fmt_shape(shape)} (add a flatten before it)")
    if isinstance(layer, Flatten):
        if len(shape) != 3:
            raise SpecError(f"{where}: input is already flat ({shape[0]} features)")
        return (math.prod(shape),), 0
    if isinstance(layer, Linear):
        if len(shape) != 1:
            raise SpecError(
                f"{where}: linear on a spatial {fmt_shape(shape)} tensor; add a flatten before it"
            )
        return (layer.out_features,), shape[0] * layer.out_features
    if isinstance(layer, BatchNorm):
        return shape, math.prod(shape)  # one multiply-add per element: x·a + b
    if isinstance(layer, Scale):
        if layer.channels is not None and layer.channels != shape[0]:
            what = "channels" if len(shape) == 3 else "features"
            raise SpecError(f"{where}: {layer.channels} values per channel, but the input has "
                            f"{shape[0]} {what} ({fmt_shape(shape)})")
        return shape, 0
    return shape, 0  # element-wise: activations, dropout


def kind(layer: Layer) -> str:
    """The layer's kind for the summary table: its type and any setting off its default."""
    extra = ""
    if isinstance(layer, Conv):
        extra = f" {fmt_pair(layer.kernel_size)}"
        for tag, value, default in (("s", layer.stride, (1, 1)), ("p", layer.padding, (0, 0)),
                                    ("d", layer.dilation, (1, 1))):
            if value != default:
                extra += f" {tag}{fmt_pair(value)}"
        if layer.groups != 1:
            extra += f" g{layer.groups}"
        if not layer.bias:
            extra += " no bias"
    elif isinstance(layer, (MaxPool, AvgPool)):
        extra = f" {fmt_pair(layer.kernel_size)}"
        if layer.stride != layer.kernel_size:
            extra += f" s{fmt_pair(layer.stride)}"
        if layer.padding != (0, 0):
            extra += f" p{fmt_pair(layer.padding)}"
        if layer.ceil_mode:
            extra += " ceil"
        if isinstance(layer, AvgPool) and not layer.count_include_pad:
            extra += " pad uncounted"
    elif isinstance(layer, Scale):
        def shown(v: float | tuple[float, ...]) -> str:
            return f"{v:.4g}" if not isinstance(v, tuple) else f"[{len(v)} values]"
        extra = f" ×{shown(layer.scale)} +{shown(layer.shift)}"
    elif isinstance(layer, ADAPTIVE_POOLS):
        extra = f" to {fmt_pair(layer.output_size)}"
    elif isinstance(layer, Linear) and not layer.bias:
        extra = " no bias"
    elif isinstance(layer, (Dropout, Dropout2d)):
        extra = f" p{layer.p:g}"
    elif isinstance(layer, GELU) and layer.approximate != "none":
        extra = f" {layer.approximate}"
    elif isinstance(layer, LeakyReLU):
        extra = f" {layer.negative_slope:g}"
    elif isinstance(layer, ELU) and layer.alpha != 1.0:
        extra = f" α{layer.alpha:g}"
    elif isinstance(layer, BatchNorm):
        extra = "" if layer.affine else " no affine"
    return layer.type + extra


PAIRS = ("kernel_size", "stride", "padding", "dilation", "output_size")
"""The fields that hold an (h, w) pair (written as one int when h = w)."""


def layer_to_dict(layer: Layer) -> dict[str, Any]:
    """A layer's JSON object: its type, its name if it has one, and every other field that is
    not at its default (pairs of equal values as one int)."""
    d: dict[str, Any] = {"type": layer.type}
    for f in dataclasses.fields(layer):
        v = getattr(layer, f.name)
        default = f.default
        if f.name == "stride" and isinstance(layer, (MaxPool, AvgPool)):
            default = layer.kernel_size
        if f.name != "name" and default is not dataclasses.MISSING and v == default:
            continue
        if f.name == "name" and v is None:
            continue
        if isinstance(v, tuple) and f.name in PAIRS:
            v = v[0] if v[0] == v[1] else list(v)
        elif isinstance(v, tuple):
            v = list(v)
        d[f.name] = v
    return d


def layer_from_dict(i: int, d: Any) -> Layer:
    """Layer ``i`` of a spec's JSON form, with one :class:`SpecError` naming it for anything
    malformed."""
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
