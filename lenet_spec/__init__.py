"""Framework-free LeNet spec: layers, shapes, parameters, presets and weight files.

Everything public is imported from here: ``from lenet_spec import Spec, Conv, load_spec``.
"""

from lenet_spec.atomic import atomic_write_bytes
from lenet_spec.datasets import SHAPES, fitting, misfit
from lenet_spec.files import load_spec, parse_spec_json
from lenet_spec.layers import (
    ACTIVATION_TYPES,
    ELEMENTWISE,
    ELU,
    GELU,
    LAYER_TYPES,
    PARAMETERISED,
    AvgPool,
    BatchNorm,
    Conv,
    Dropout,
    Dropout2d,
    Flatten,
    Layer,
    LeakyReLU,
    Linear,
    MaxPool,
    Pair,
    ReLU,
    Shape,
    Sigmoid,
    SiLU,
    SpecError,
    Tanh,
    fmt_pair,
    fmt_shape,
    is_monotone,
)
from lenet_spec.presets import PRESETS
from lenet_spec.spec import COUNTERS, MAX_PARAMS, LayerInfo, Spec, widen
from lenet_spec.weights import (
    INITS,
    WeightsError,
    canonical_dtype,
    check_weights,
    chw_to_hwc,
    hwc_to_chw,
    load_weights,
    read_lenet_file,
    save_weights,
    write_safetensors,
)

__all__ = [
    "ACTIVATION_TYPES", "COUNTERS", "ELEMENTWISE", "ELU", "GELU", "INITS", "LAYER_TYPES",
    "MAX_PARAMS", "PARAMETERISED", "PRESETS", "SHAPES", "AvgPool", "BatchNorm", "Conv", "Dropout",
    "Dropout2d", "Flatten", "Layer", "LayerInfo", "LeakyReLU", "Linear", "MaxPool", "Pair", "ReLU",
    "Shape", "SiLU", "Sigmoid", "Spec", "SpecError", "Tanh", "WeightsError", "atomic_write_bytes",
    "canonical_dtype", "check_weights", "chw_to_hwc", "fitting", "fmt_pair", "fmt_shape",
    "hwc_to_chw", "is_monotone", "load_spec", "load_weights", "misfit", "parse_spec_json",
    "read_lenet_file", "save_weights", "widen", "write_safetensors",
]
