"""Framework-free LeNet spec: layers, shapes, parameters, presets and weight files."""

from lenet_spec.presets import PRESETS
from lenet_spec.spec import (
    ELU,
    GELU,
    AvgPool,
    BatchNorm,
    Conv,
    Dropout,
    Dropout2d,
    Flatten,
    LayerInfo,
    LeakyReLU,
    Linear,
    MaxPool,
    ReLU,
    Sigmoid,
    SiLU,
    Spec,
    SpecError,
    Tanh,
    load_spec,
    parse_spec_json,
)
from lenet_spec.weights import WeightsError, check_weights, load_weights, save_weights

__all__ = [
    "ELU", "GELU", "PRESETS", "AvgPool", "BatchNorm", "Conv", "Dropout", "Dropout2d", "Flatten",
    "LayerInfo", "LeakyReLU", "Linear", "MaxPool", "ReLU", "SiLU", "Sigmoid", "Spec",
    "SpecError", "Tanh", "WeightsError", "check_weights", "load_spec", "load_weights",
    "parse_spec_json", "save_weights",
]
