"""The spec alone: presets, inference, the summary table, JSON, and every kind of bad spec."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import specs
from hypothesis import given

from lenet_spec import (
    GELU,
    PRESETS,
    AvgPool,
    BatchNorm,
    Conv,
    Flatten,
    LeakyReLU,
    Linear,
    MaxPool,
    ReLU,
    Spec,
    SpecError,
    load_spec,
)

PRESET_COUNTS = {
    "lenet5": 61_706,
    "lenet5_3x3": 81_194,
    "lenet5_classic": 61_706,
    "cifar10_cnn": 145_578,
    "lenet5_bn": 61_728,
}


@pytest.mark.parametrize("name", PRESET_COUNTS)
def test_preset_parameter_counts(name: str) -> None:
    assert PRESETS[name].param_count == PRESET_COUNTS[name]
    assert load_spec(name) is PRESETS[name]


def test_lenet5_per_layer() -> None:
    spec = PRESETS["lenet5"]
    assert spec.layer_param_counts() == {
        "conv1": 156, "conv2": 2_416, "fc1": 48_120, "fc2": 10_164, "fc3": 850
    }
    shapes = [info.out_shape for info in spec.infos]
    assert shapes == [
        (6, 28, 28), (6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 10, 10), (16, 5, 5),
        (400,), (120,), (120,), (84,), (84,), (10,),
    ]
    assert list(spec.param_shapes) == [
        f"{n}.{p}" for n in ("conv1", "conv2", "fc1", "fc2", "fc3") for p in ("weight", "bias")
    ]
    assert spec.param_shapes["conv1.weight"] == (6, 1, 5, 5)
    assert spec.param_shapes["fc1.weight"] == (120, 400)
    assert spec.infos[7].flattened_from == (16, 5, 5)
    assert spec.infos[9].flattened_from is None
    # MACs: conv1 6·28·28·25, conv2 16·10·10·6·25, then the dense products
    assert [i.macs for i in spec.infos if i.macs] == [117_600, 240_000, 48_000, 10_080, 840]


def test_flatten_sizes() -> None:
    assert PRESETS["lenet5_3x3"].infos[6].out_shape == (576,)
    assert PRESETS["cifar10_cnn"].infos[6].out_shape == (1024,)
    names = [i.label for i in PRESETS["cifar10_cnn"].infos if i.params]
    assert names == ["conv1", "conv2", "conv3", "linear1", "linear2"]


def test_classic_is_tanh_avg_pool() -> None:
    kinds = [layer.type for layer in PRESETS["lenet5_classic"].layers]
    assert "tanh" in kinds and "avg_pool" in kinds
    assert "relu" not in kinds and "max_pool" not in kinds


def test_lenet5_bn_parameters_and_buffers() -> None:
    """lenet5 + bn1 (2·6) + bn2 (2·16) parameters; buffers apart (running mean and variance per
    channel, one batch count each), named as torch's state_dict names them."""
    spec = PRESETS["lenet5_bn"]
    assert spec.param_count == 61_706 - 6 - 16 + 12 + 32  # bias-free convs, bn1, bn2
    assert spec.buffer_count == (6 + 6 + 1) + (16 + 16 + 1)
    assert spec.buffer_shapes == {
        "bn1.running_mean": (6,), "bn1.running_var": (6,), "bn1.num_batches_tracked": (),
        "bn2.running_mean": (16,), "bn2.running_var": (16,), "bn2.num_batches_tracked": ()}
    assert list(spec.state_shapes)[:6] == [
        "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
        "bn1.num_batches_tracked"]
    assert [i.layer.type for i in spec.infos].count("dropout") == 2
    text = spec.summary()
    assert "buffers" in text and "61,728 parameters (241.1 KiB float32) and 46 buffer values" \
        in text
    assert "buffers" not in PRESETS["lenet5"].summary()


def test_conv_options_shapes_counts_and_macs() -> None:
    spec = Spec("opts", (4, 12, 12), (
        Conv(8, 3, dilation=2, groups=2, bias=False), BatchNorm(affine=False), LeakyReLU(0.2),
        Flatten(), Linear(5, bias=False), GELU("tanh"), Linear(2)))
    conv = spec.infos[0]
    assert conv.out_shape == (8, 8, 8)  # 12 − 2·(3 − 1)
    assert conv.params == {"conv1.weight": (8, 2, 3, 3)}  # in_channels / groups, no bias
    assert conv.fan_in == 2 * 9
    assert conv.macs == 8 * 8 * 8 * 2 * 9
    assert spec.infos[1].params == {} and spec.infos[1].macs == 8 * 8 * 8
    assert spec.param_shapes["fc1.weight"] == (5, 512) and "fc1.bias" not in spec.param_shapes
    kinds = [i.kind for i in spec.infos]
    assert kinds[:3] == ["conv 3×3 d2×2 g2 no bias", "batch_norm no affine", "leaky_relu 0.2"]
    assert Spec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict()["layers"][0] == {"type": "conv", "out_channels": 8, "kernel_size": 3,
                                           "dilation": 2, "groups": 2, "bias": False,
                                           "name": "conv1"}


def test_summary_table() -> None:
    text = PRESETS["lenet5"].summary()
    for needle in ("conv1", "6×28×28", "fc3", "61,706", "416,520", "max_pool 2×2"):
        assert needle in text
    assert text.count("\n") >= 15
    assert text.endswith("datasets: mnist, fashion_mnist, kmnist (their 28×28 images padded to "
                         "32×32)")
    assert PRESETS["cifar10_cnn"].summary().endswith("datasets: cifar10")
    assert Spec("s", (2, 8, 8), (Flatten(), Linear(2))).datasets_line() == (
        "datasets: none of mnist, fashion_mnist, kmnist, cifar10 fits its 2×8×8 input")


def test_auto_names_per_kind() -> None:
    spec = Spec("s", (1, 8, 8), (Conv(2, 3), Conv(2, 3, name="mine"), Conv(2, 3), Flatten(),
                                  Linear(4), Linear(3)))
    assert [i.label for i in spec.infos if i.params] == ["conv1", "mine", "conv3", "fc1", "fc2"]


@pytest.mark.parametrize("name", PRESET_COUNTS)
def test_preset_json_round_trip(name: str) -> None:
    spec = PRESETS[name]
    data = json.loads(json.dumps(spec.to_dict()))
    assert Spec.from_dict(data) == spec
    assert Spec.from_dict(data).to_dict() == data


@given(specs())
def test_random_spec_round_trip(spec: Spec) -> None:
    data = json.loads(spec.to_json())
    again = Spec.from_dict(data)
    assert again == spec
    assert again.to_dict() == data
    assert again.param_count == spec.param_count


def test_issue_example_json(tmp_path) -> None:
    text = ('{"name": "my_net", "input_shape": [1, 32, 32], "layers": ['
            '{"type": "conv", "name": "conv1", "out_channels": 6, "kernel_size": 5}, '
            '{"type": "relu"}, {"type": "max_pool", "kernel_size": 2}, {"type": "flatten"}, '
            '{"type": "linear", "name": "fc1", "out_features": 10}]}')
    path = tmp_path / "my_net.json"
    path.write_text(text)
    spec = load_spec(path)
    assert spec.name == "my_net"
    assert spec.param_count == 156 + 6 * 14 * 14 * 10 + 10
    assert spec.to_dict() == json.loads(text)


def test_pair_kernels_and_strides() -> None:
    spec = Spec.from_dict({"name": "p", "input_shape": [2, 9, 12], "layers": [
        {"type": "conv", "out_channels": 4, "kernel_size": [3, 5], "stride": [2, 1],
         "padding": [1, 0]},
        {"type": "avg_pool", "kernel_size": 2, "stride": 1},
        {"type": "flatten"}, {"type": "linear", "out_features": 3}]})
    assert spec.infos[0].out_shape == (4, 5, 8)
    assert spec.infos[1].out_shape == (4, 4, 7)
    assert spec.param_shapes["conv1.weight"] == (4, 2, 3, 5)


# ----------------------------------------------------------------------------- bad specs

BASE = [{"type": "flatten"}, {"type": "linear", "out_features": 10}]


def _spec(layers, input_shape=(1, 32, 32), **extra):
    return {"name": "bad", "input_shape": list(input_shape), "layers": layers, **extra}


BAD = {
    "kernel larger than input": (
        _spec([{"type": "conv", "out_channels": 6, "kernel_size": 5},
               {"type": "max_pool", "kernel_size": 2},
               {"type": "conv", "out_channels": 16, "kernel_size": 5},
               {"type": "max_pool", "kernel_size": 2},
               {"type": "max_pool", "kernel_size": 2},
               {"type": "conv", "out_channels": 16, "kernel_size": 5}, *BASE]),
        "conv3: input 16×2×2 is smaller than kernel 5×5",
    ),
    "issue's example message": (
        _spec([{"type": "conv", "out_channels": 16, "kernel_size": 3},
               {"type": "conv", "name": "conv2", "out_channels": 16, "kernel_size": 5}, *BASE],
              (1, 6, 6)),
        "conv2: input 16×4×4 is smaller than kernel 5×5",
    ),
    "kernel larger than padded input": (
        _spec([{"type": "conv", "out_channels": 2, "kernel_size": 7, "padding": 1}, *BASE],
              (1, 4, 4)),
        "conv1: input 1×4×4 (padded 6×6) is smaller than kernel 7×7",
    ),
    "pool larger than input": (
        _spec([{"type": "max_pool", "kernel_size": 3}, *BASE], (1, 2, 2)),
        "layer 0 (max_pool): input 1×2×2 is smaller than kernel 3×3",
    ),
    "linear without flatten": (
        _spec([{"type": "conv", "out_channels": 2, "kernel_size": 3},
               {"type": "linear", "out_features": 10}]),
        "fc1: linear on a spatial 2×30×30 tensor; add a flatten before it",
    ),
    "conv after flatten": (
        _spec([{"type": "flatten"}, {"type": "conv", "out_channels": 2, "kernel_size": 3},
               {"type": "linear", "out_features": 10}]),
        "conv1: needs a spatial C×H×W input",
    ),
    "zero out_channels": (
        _spec([{"type": "conv", "out_channels": 0, "kernel_size": 3}, *BASE]),
        "layer 0 (conv): out_channels must be positive, got 0",
    ),
    "negative kernel": (
        _spec([{"type": "conv", "out_channels": 2, "kernel_size": -3}, *BASE]),
        "kernel_size must be at least 1",
    ),
    "negative padding": (
        _spec([{"type": "conv", "name": "c", "out_channels": 2, "kernel_size": 3,
                "padding": -1}, *BASE]),
        "c: padding must be at least 0",
    ),
    "zero linear": (
        _spec([{"type": "flatten"}, {"type": "linear", "name": "head", "out_features": 0}]),
        "head: out_features must be positive, got 0",
    ),
    "float size": (
        _spec([{"type": "conv", "out_channels": 2.5, "kernel_size": 3}, *BASE]),
        "out_channels must be a positive int, got 2.5",
    ),
    "zero input size": (_spec(BASE, (1, 0, 32)), "input_shape [1, 0, 32]: each size must be"),
    "two-dim input": (_spec(BASE, (32, 32)), "input_shape must be [C, H, W]"),
    "unknown layer type": (
        _spec([{"type": "lrn"}, *BASE]),
        "layer 0: unknown type 'lrn'; expected one of conv, max_pool",
    ),
    "softmax on a map": (
        _spec([{"type": "softmax"}, *BASE]),
        "layer 0 (softmax): an output layer over the classes needs a flat (N, classes) input "
        "but gets 1×32×32",
    ),
    "log_softmax not last": (
        _spec([*BASE, {"type": "log_softmax"}, {"type": "relu"}]),
        "layer 2 (log_softmax): log_softmax is an output layer and must be the network's last",
    ),
    "adaptive pool of a flat vector": (
        _spec([*BASE, {"type": "adaptive_avg_pool", "output_size": 1}]),
        "layer 2 (adaptive_avg_pool): needs a spatial C×H×W input but gets a flat vector of 10",
    ),
    "adaptive pool to nothing": (
        _spec([{"type": "adaptive_max_pool", "output_size": [2, 0]}, *BASE]),
        "layer 0 (adaptive_max_pool): output_size must be at least 1",
    ),
    "dropout p of 1": (_spec([{"type": "dropout", "p": 1.0}, *BASE]),
                       "layer 0 (dropout): p must be in [0, 1), got 1.0"),
    "negative dropout p": (_spec([{"type": "dropout2d", "p": -0.1}, *BASE]),
                           "layer 0 (dropout2d): p must be in [0, 1), got -0.1"),
    "dropout2d on a flat vector": (
        _spec([{"type": "flatten"}, {"type": "dropout2d"}, {"type": "linear", "out_features": 2}]),
        "layer 1 (dropout2d): needs a spatial C×H×W input but gets a flat vector of 1024",
    ),
    "momentum 0": (
        _spec([{"type": "conv", "out_channels": 2, "kernel_size": 3},
               {"type": "batch_norm", "momentum": 0}, *BASE]),
        "layer 1 (batch_norm): momentum must be in (0, 1], got 0",
    ),
    "momentum above 1": (
        _spec([{"type": "conv", "out_channels": 2, "kernel_size": 3},
               {"type": "batch_norm", "name": "norm", "momentum": 1.5}, *BASE]),
        "norm: momentum must be in (0, 1], got 1.5",
    ),
    "eps 0": (
        _spec([{"type": "conv", "out_channels": 2, "kernel_size": 3},
               {"type": "batch_norm", "eps": 0.0}, *BASE]),
        "eps must be greater than 0, got 0.0",
    ),
    "affine not a flag": (
        _spec([{"type": "conv", "out_channels": 2, "kernel_size": 3},
               {"type": "batch_norm", "affine": "yes"}, *BASE]),
        "affine must be true or false, got 'yes'",
    ),
    "batch_norm on the input": (
        _spec([{"type": "batch_norm"}, *BASE]),
        "bn1: batch_norm normalises a conv's channels or a linear layer's features; here it "
        "would normalise the network input",
    ),
    "batch_norm after flatten": (
        _spec([{"type": "conv", "out_channels": 2, "kernel_size": 3}, {"type": "flatten"},
               {"type": "batch_norm"}, {"type": "linear", "out_features": 10}]),
        "bn1: batch_norm normalises a conv's channels or a linear layer's features; here it "
        "would normalise a flatten",
    ),
    "groups not dividing the input": (
        _spec([{"type": "conv", "out_channels": 4, "kernel_size": 3},
               {"type": "conv", "out_channels": 6, "kernel_size": 3, "groups": 3}, *BASE]),
        "conv2: groups 3 does not divide the input's 4 channels",
    ),
    "groups not dividing the output": (
        _spec([{"type": "conv", "out_channels": 5, "kernel_size": 3, "groups": 2}, *BASE],
              (2, 8, 8)),
        "layer 0 (conv): groups 2 does not divide out_channels 5",
    ),
    "dilated kernel larger than the padded input": (
        _spec([{"type": "conv", "out_channels": 2, "kernel_size": 3, "dilation": 3,
                "padding": 1}, *BASE], (1, 4, 4)),
        "conv1: input 1×4×4 (padded 6×6) is smaller than kernel 7×7 (dilated 3×3)",
    ),
    "bias not a flag": (
        _spec([{"type": "flatten"}, {"type": "linear", "out_features": 3, "bias": 0}]),
        "bias must be true or false, got 0",
    ),
    "gelu approximation": (_spec([{"type": "gelu", "approximate": "erf"}, *BASE]),
                           "approximate must be 'none' or 'tanh', got 'erf'"),
    "leaky slope": (_spec([{"type": "leaky_relu", "negative_slope": "0.1"}, *BASE]),
                    "negative_slope must be a finite number, got '0.1'"),
    "missing type": (_spec([{"out_channels": 2}, *BASE]), "layer 0: missing 'type'"),
    "unknown key": (
        _spec([{"type": "conv", "out_channels": 2, "kernal_size": 3}, *BASE]),
        "layer 0 (conv): unknown key(s) ['kernal_size']",
    ),
    "key on activation": (
        _spec([{"type": "relu", "inplace": True}, *BASE]),
        "layer 0 (relu): unknown key(s) ['inplace']; relu takes no other keys",
    ),
    "missing key": (
        _spec([{"type": "conv", "kernel_size": 3}, *BASE]),
        "layer 0 (conv): missing out_channels",
    ),
    "unknown top-level key": (_spec(BASE, extra=1), "unknown spec key(s) ['extra']"),
    "duplicate names": (
        _spec([{"type": "conv", "name": "a", "out_channels": 2, "kernel_size": 3},
               {"type": "conv", "name": "a", "out_channels": 2, "kernel_size": 3}, *BASE]),
        "layer 1 (conv): duplicate name 'a'",
    ),
    "auto name clash": (
        _spec([{"type": "flatten"}, {"type": "linear", "name": "fc2", "out_features": 4},
               {"type": "linear", "out_features": 3}]),
        "layer 2 (linear): duplicate name 'fc2'",
    ),
    "bad name": (
        _spec([{"type": "flatten"}, {"type": "linear", "name": "fc 1", "out_features": 4}]),
        "name 'fc 1' is not a valid identifier",
    ),
    "ends spatial": (
        _spec([{"type": "conv", "out_channels": 2, "kernel_size": 3}]),
        "the network ends in a 2×30×30 tensor; it must end flat",
    ),
    "no parameters": (_spec([{"type": "flatten"}]), "has no parameters to train"),
    "double flatten": (_spec([{"type": "flatten"}, *BASE]), "input is already flat"),
    "layers not a list": (_spec({"type": "flatten"}), "'layers' must be a list"),
    "layer not an object": (_spec(["relu", *BASE]), "layer 0: must be a JSON object"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_spec(case: str) -> None:
    data, message = BAD[case]
    with pytest.raises(SpecError) as err:
        Spec.from_dict(data)
    assert message in str(err.value)


def test_bad_json_names_file_line_and_column(tmp_path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"name": "x",\n "input_shape": [1, 32, 32],\n "layers": [,]}')
    with pytest.raises(SpecError, match=r"broken.json: invalid JSON at line 3, column 13"):
        load_spec(path)


def test_bad_spec_file_names_file(tmp_path) -> None:
    path = tmp_path / "net.json"
    path.write_text(json.dumps(_spec([{"type": "conv", "out_channels": 0, "kernel_size": 3}])))
    with pytest.raises(SpecError, match=r"net.json: layer 0 \(conv\): out_channels"):
        load_spec(path)


def test_missing_path_and_unknown_preset(tmp_path) -> None:
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nope.json")
    with pytest.raises(SpecError, match=r"unknown spec 'lenet6': not a preset \(lenet5"):
        load_spec("lenet6")
    with pytest.raises(SpecError, match="is not a file"):
        load_spec(tmp_path)


def test_direct_construction_validates() -> None:
    with pytest.raises(SpecError, match="smaller than kernel"):
        Spec("s", (1, 4, 4), (Conv(2, 5), Flatten(), Linear(2)))
    with pytest.raises(SpecError, match="kernel_size must be"):
        MaxPool(0)
    assert AvgPool(3).stride == (3, 3)
    assert Spec("s", (1, 4, 4), (ReLU(), Flatten(), Linear(2))).param_count == 16 * 2 + 2


def test_cli_show(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-m", "lenet_spec", "show", "lenet5"],
                         capture_output=True, text=True, check=True).stdout
    assert "61,706" in out and "conv2" in out
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    res = subprocess.run([sys.executable, "-m", "lenet_spec", "show", str(bad)],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "bad.json: invalid JSON at line 1" in res.stderr
    assert "Traceback" not in res.stderr
