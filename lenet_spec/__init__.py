"""Framework-free LeNet spec: layers, shapes, parameters, presets and weight files.

Everything public is imported from here: ``from lenet_spec import Spec, Conv, load_spec``.
"""

from lenet_spec.datasets import SHAPES, fitting, misfit
from lenet_spec.files import load_spec, parse_spec_json
from lenet_spec.layers import (
    ACTIVATION_TYPES,
    ADAPTIVE_POOLS,
    ELEMENTWISE,
    ELU,
    GELU,
    LAYER_TYPES,
    OUTPUT_TYPES,
    PARAMETERISED,
    AdaptiveAvgPool,
    AdaptiveMaxPool,
    AvgPool,
    BatchNorm,
    Conv,
    Dropout,
    Dropout2d,
    Flatten,
    Layer,
    LeakyReLU,
    Linear,
    LogSoftmax,
    MaxPool,
    Pair,
    ReLU,
    Scale,
    Shape,
    Sigmoid,
    SiLU,
    Softmax,
    SpecError,
    Tanh,
    adaptive_windows,
    fmt_pair,
    fmt_shape,
    is_monotone,
    pooled_size,
)
from lenet_spec.presets import PRESETS
from lenet_spec.spec import (
    COUNTERS,
    MAX_LAYERS,
    MAX_PARAMS,
    RESERVED_NAMES,
    LayerInfo,
    Spec,
    widen,
)
from lenet_spec.weights import (
    INITS,
    WeightsError,
    canonical_dtype,
    check_shapes,
    check_weights,
    chw_to_hwc,
    hwc_to_chw,
    load_weights,
    read_lenet_file,
    save_weights,
    write_safetensors,
)

__all__ = [
    "ACTIVATION_TYPES", "ADAPTIVE_POOLS", "AdaptiveAvgPool", "AdaptiveMaxPool", "AvgPool",
    "BatchNorm", "COUNTERS", "Conv", "Dropout", "Dropout2d", "ELEMENTWISE", "ELU", "Flatten",
    "GELU", "INITS", "LAYER_TYPES", "Layer", "LayerInfo", "LeakyReLU", "Linear", "LogSoftmax",
    "MAX_LAYERS", "MAX_PARAMS", "MaxPool", "OUTPUT_TYPES", "PARAMETERISED", "PRESETS", "Pair",
    "RESERVED_NAMES", "ReLU", "Scale",
    "SHAPES", "Shape", "SiLU", "Sigmoid", "Softmax", "Spec", "SpecError", "Tanh",
    "WeightsError", "adaptive_windows", "canonical_dtype",
    "check_shapes", "check_weights", "chw_to_hwc", "fitting", "fmt_pair", "fmt_shape", "hwc_to_chw",
    "is_monotone", "load_spec", "load_weights", "misfit", "parse_spec_json", "pooled_size",
    "read_lenet_file", "save_weights", "widen", "write_safetensors",
]
