"""``lenet_port.to_spec`` and ``python -m lenet_port``: torch modules written in the
tutorial's styles become specs whose Flax models give the modules' logits; what a spec cannot
hold is one clear error."""

from __future__ import annotations

import json
import re
import textwrap
from collections import OrderedDict

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import fast_only
from torch import nn

import lenet_jax
from lenet_port import PortError, port, to_spec
from lenet_port.__main__ import main
from lenet_spec import BatchNorm, Conv, Dropout, Dropout2d, Flatten, Linear, load_weights

LOGIT_TOL = 1e-5  # max |Δ| of logits, as tests/test_parity.py


class TutorialNet(nn.Module):
    """The PyTorch "Neural Networks" tutorial's Net, as written there (fx cannot trace the
    loop over x.size(): torch.export reads it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, self.num_flat_features(x))
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)

    def num_flat_features(self, x: torch.Tensor) -> int:
        size = x.size()[1:]
        num_features = 1
        for s in size:
            num_features *= s
        return num_features


class SizeViewNet(nn.Module):
    """3×3 kernels, methods and torch.* functions, flattening by x.view(x.size()[0], -1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2)
        self.fc = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = F.avg_pool2d(x.tanh(), 2)
        x = F.leaky_relu(self.conv2(x), 0.2)
        x = x.view(x.size()[0], -1)
        return self.fc(x)


class ReshapeNet(nn.Module):
    """Flattening by x.reshape(x.shape[0], -1), silu and sigmoid as methods and functions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding="same")
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.silu(self.conv(x)), kernel_size=2, stride=2)
        return torch.sigmoid(self.head(x.reshape(x.shape[0], -1)))


def ordered_sequential() -> nn.Sequential:
    """A Sequential built from an OrderedDict, with a nested unnamed Sequential head."""
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 6, 5)), ("act1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(6, 16, 5)), ("act2", nn.ReLU()), ("pool2", nn.MaxPool2d(2, 2)),
        ("flatten", nn.Flatten()),
        ("head", nn.Sequential(nn.Linear(400, 120), nn.SiLU(), nn.Linear(120, 10))),
    ]))


class NormNet(nn.Module):
    """Batch norm after the convs and the first linear layer, dropout2d and dropout as modules
    and functions, torch.flatten; trained a little so the running statistics are not 0 and 1."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 5, bias=False), nn.BatchNorm2d(8, momentum=0.2), nn.ReLU(inplace=True),
            nn.MaxPool2d(2), nn.Dropout2d(0.1),
            nn.Conv2d(8, 16, 5, bias=False), nn.BatchNorm2d(16), nn.GELU(approximate="tanh"),
            nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(16 * 5 * 5, 64)
        self.bn = nn.BatchNorm1d(64, eps=1e-3)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        x = self.drop(F.elu(self.bn(self.fc1(x))))
        return self.fc2(F.dropout(x, 0.1, self.training))


def trained(module: nn.Module, shape: tuple[int, int, int]) -> nn.Module:
    """``module`` after 3 SGD steps on random data (moves the weights and batch statistics)."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    module.train()
    for _ in range(3):
        loss = module(torch.randn(8, *shape)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return module


def flax_logits(spec, weights, x: torch.Tensor) -> np.ndarray:
    net = lenet_jax.build(spec)
    lenet_jax.set_weights(net, weights)
    net.eval()
    return np.asarray(net(jnp.asarray(x.numpy().transpose(0, 2, 3, 1))))


class NllNet(nn.Module):
    """pytorch/examples' MNIST style: log-probabilities out (trained there with F.nll_loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, 1), nn.Conv2d(4, 8, 3, 1)
        self.dropout1, self.dropout2 = nn.Dropout(0.25), nn.Dropout(0.5)
        self.fc1, self.fc2 = nn.Linear(8 * 6 * 6, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 16, 16)  # a reshape that changes nothing
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = self.dropout1(F.max_pool2d(x, 2))
        x = self.dropout2(F.relu(self.fc1(torch.flatten(x, 1))))
        return F.log_softmax(self.fc2(x), dim=1)


class AllConvNet(nn.Module):
    """The nn tutorial's Mnist_CNN style: strided convs, an average over the whole map, the
    logits straight from the flatten (no linear layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 10, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = F.adaptive_avg_pool2d(x, 1)
        return x.view(-1, x.size(1))


def adaptive_sequential() -> nn.Module:
    """Opacus' CIFAR-10 style: adaptive pools whose sizes do not divide the map, a softmax out."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveMaxPool2d(5),
        nn.Conv2d(6, 8, 2), nn.ReLU(), nn.AdaptiveAvgPool2d((None, 3)), nn.Flatten(),
        nn.Linear(8 * 4 * 3, 10), nn.Softmax(dim=-1))


class LoopNet(TutorialNet):
    """The tutorial's loop over x.size() (only torch.export reads it), with ATen's adaptive
    max-pool (which returns the indices too) and log_softmax."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_max_pool2d(F.relu(self.conv1(x)), (14, 13))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, ceil_mode=False)
        x = F.adaptive_avg_pool2d(x, 5)
        x = x.view(-1, self.num_flat_features(x))
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x))))).log_softmax(1)


CASES = {
    "tutorial": (TutorialNet, (1, 32, 32), "torch.export"),
    "nll": (NllNet, (1, 16, 16), "torch.fx"),
    "all_conv": (AllConvNet, (1, 14, 14), "torch.fx"),
    "adaptive": (adaptive_sequential, (3, 15, 15), "torch.fx"),
    "loop_adaptive": (LoopNet, (1, 32, 32), "torch.export"),
    "size_view": (SizeViewNet, (3, 32, 32), "torch.fx"),
    "ordered_sequential": (ordered_sequential, (1, 32, 32), "torch.fx"),
    "reshape_shape": (ReshapeNet, (2, 12, 12), "torch.fx"),
    "norm": (NormNet, (3, 32, 32), "torch.fx"),
}


@pytest.mark.parametrize("case", fast_only(CASES, "norm", "adaptive"))
def test_round_trip_to_flax(case: str) -> None:
    """Each style goes to a spec and weights whose Flax model gives the module's logits."""
    make, shape, tracer = CASES[case]
    torch.manual_seed(1)
    module = trained(make(), shape)
    module.train()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    result = port(module, shape)
    assert result.tracer == tracer
    assert module.training  # left as it was found
    for k, v in module.state_dict().items():  # and its state untouched
        assert torch.equal(v, state[k]), k
    spec, weights = result.spec, result.weights
    assert spec.param_count == sum(p.numel() for p in module.parameters())
    x = torch.randn(6, *shape)
    module.eval()
    with torch.no_grad():
        want = module(x).numpy()
    assert np.abs(flax_logits(spec, weights, x) - want).max() <= LOGIT_TOL


def test_names_and_layers_come_from_the_module() -> None:
    spec, weights = to_spec(ordered_sequential(), (1, 32, 32))
    named = [getattr(layer, "name", None) for layer in spec.layers]
    assert [n for n in named if n] == ["conv1", "conv2", "head_0", "head_2"]
    assert list(weights) == list(spec.state_shapes)
    module = NormNet()
    spec, weights = to_spec(module, (3, 32, 32), name="norm_net")
    assert spec.name == "norm_net"
    kinds = [type(layer) for layer in spec.layers]
    assert kinds.count(BatchNorm) == 3 and kinds.count(Dropout) == 2
    assert kinds.count(Dropout2d) == 1 and kinds.count(Flatten) == 1
    bn0 = spec.layers[1]
    assert (bn0.name, bn0.momentum) == ("features_1", 0.2)
    assert [layer.eps for layer in spec.layers if isinstance(layer, BatchNorm)] == [
        1e-5, 1e-5, 1e-3]
    conv = spec.layers[0]
    assert isinstance(conv, Conv) and not conv.bias and conv.name == "features_0"
    np.testing.assert_array_equal(weights["bn.running_var"],
                                  module.bn.running_var.numpy())
    assert weights["bn.num_batches_tracked"].dtype == np.int64
    unnamed = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 30 * 30, 3))
    spec, _ = to_spec(unnamed, (1, 32, 32))
    assert [spec.layers[0].name, spec.layers[2].name] == ["conv_0", "fc_2"]


def test_functional_dropout_follows_the_training_flag() -> None:
    class Net(nn.Module):
        def __init__(self, training: object) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(12, 8), nn.Linear(8, 2)
            self.flag = training

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.flatten(x, 1)
            training = self.training if self.flag == "module" else self.flag
            return self.fc2(F.dropout(self.fc1(x), 0.25, training))

    spec, _ = to_spec(Net("module"), (3, 2, 2))
    assert Dropout(0.25) in spec.layers
    spec, _ = to_spec(Net(False), (3, 2, 2))  # never drops: the identity
    assert not any(isinstance(layer, Dropout) for layer in spec.layers)
    with pytest.raises(PortError, match="drops in evaluation too"):
        to_spec(Net(True), (3, 2, 2))


class Sq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        return x * x

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        return g


class Bad(nn.Module):
    """LeNet-like, with one thing a spec cannot hold, chosen by ``what``."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = (nn.ConvTranspose2d(4, 4, 3, padding=1) if what == "deconv"
                      else nn.Conv2d(4, 4, 3, padding=1))
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        if self.what == "residual":
            y = y + self.conv2(y)
        elif self.what == "custom_autograd":
            y = Sq.apply(self.conv2(y))
        elif self.what == "slice":
            y = self.conv2(y)
            y[:, :2] *= 2
        elif self.what == "shared":
            y = self.conv1.forward(F.relu(self.conv2(y))[:, :1])
        elif self.what == "half_flatten":
            return self.fc(y.reshape(-1, 4 * 8 * 8 // 2).reshape(y.shape[0], -1))
        elif self.what == "pool_dilation":
            y = F.max_pool2d(self.conv2(y), 2, 1, 1, dilation=2)
        elif self.what == "batch_in_forward":
            return self.fc(self.conv2(y).view(3, -1))
        elif self.what == "tuple":
            return self.fc(self.conv2(y).flatten(1)), y
        else:
            y = self.conv2(y)
        return self.fc(y.flatten(1))


@pytest.mark.parametrize("what, message", [
    ("residual", r"node add \(operator.add\) at test_porter.py:\d+: y = y \+ self.conv2\(y\)"
                 r".*takes two tensors of the network.*residual or a branch"),
    ("deconv", r"conv2 \(ConvTranspose2d\).*ConvTranspose2d is not supported; supported: "
               r"nn.Conv2d"),
    ("custom_autograd", r"\(operator.mul\).*x \* x.*operator.mul is not supported"),
    ("slice", r"indexing or slicing"),
    ("shared", r"indexing or slicing"),
    ("half_flatten", r"reshapes \(N, 4, 8, 8\) to \(2N, 128\).*flattening"),
    ("pool_dilation", r"pooling with dilation 2; the spec's pools have none"),
    ("batch_in_forward", r"batch size written into forward"),
    ("tuple", r"forward returns .*not the output of its last layer.*pick it with output=I"),
])
def test_what_a_spec_cannot_hold_is_one_clear_error(what: str, message: str) -> None:
    with pytest.raises(PortError, match=message) as caught:
        to_spec(Bad(what), (1, 8, 8))
    assert "\n" not in str(caught.value)


def test_weight_sharing_and_other_refusals() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.fc(x.flatten(1)))

    with pytest.raises(PortError, match="fc is applied a second time"):
        to_spec(Shared(), (1, 2, 2))
    no_stats = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False),
                             nn.Flatten(), nn.Linear(2 * 4 * 4, 2))
    with pytest.raises(PortError, match="1 \\(BatchNorm2d\\).*track_running_stats=False"):
        to_spec(no_stats, (1, 6, 6))
    cumulative = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, momentum=None),
                               nn.Flatten(), nn.Linear(2 * 4 * 4, 2))
    with pytest.raises(PortError, match="momentum=None"):
        to_spec(cumulative, (1, 6, 6))
    with pytest.raises(PortError, match="running it on a batch of \\(N, 1, 5, 5\\) images failed"):
        to_spec(TutorialNet(), (1, 5, 5))
    with pytest.raises(PortError, match="input_shape must be"):
        to_spec(TutorialNet(), (1, 1, 32, 32))


NET_FILE = """
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class Deconv(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(1, 1, 2)

    def forward(self, x):
        return self.up(x)


class NeedsArgs(nn.Module):
    def __init__(self, width):
        super().__init__()


class Classes(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


def make_model(num_classes=10):
    return Classes(num_classes)


def make_list():
    return []
"""


class Payload:
    """An object a weights_only load refuses to build."""


def test_command_line(tmp_path, capsys) -> None:
    source = tmp_path / "net.py"
    source.write_text(textwrap.dedent(NET_FILE))
    torch.manual_seed(3)
    state = {k: v + 0.01 for k, v in TutorialNet().state_dict().items()}
    torch.save(state, tmp_path / "net.pt")
    out, weights = tmp_path / "out" / "net.json", tmp_path / "net.safetensors"
    assert main([f"{source}:Net", "--input-shape", "1,32,32", "--state-dict",
                 str(tmp_path / "net.pt"), "-o", str(out), "--weights", str(weights)]) == 0
    printed = capsys.readouterr().out
    assert "61,706 parameters" in printed and "via torch.fx" in printed
    spec_json = json.loads(out.read_text())
    assert spec_json["name"] == "Net" and spec_json["input_shape"] == [1, 32, 32]
    loaded, spec = load_weights(weights)
    assert spec.to_dict() == spec_json
    for k, v in state.items():
        np.testing.assert_array_equal(loaded[k], v.numpy())
    assert isinstance(spec.layers[-1], Linear)


def test_command_line_takes_factories_and_arguments(tmp_path, capsys) -> None:
    """FILE.py:FUNCTION builds the module with a factory; --kwargs gives a class or a factory
    its arguments, as JSON."""
    (tmp_path / "net.py").write_text(textwrap.dedent(NET_FILE))
    for target, kwargs, classes in (("make_model", "{}", 10), ("make_model", '{"num_classes": 3}',
                                                               3),
                                    ("Classes", '{"num_classes": 5}', 5)):
        out = tmp_path / f"{target}{classes}.json"
        assert main([f"{tmp_path}/net.py:{target}", "--input-shape", "1,4,4", "--kwargs", kwargs,
                     "-o", str(out)]) == 0, capsys.readouterr().err
        assert json.loads(out.read_text())["layers"][-1]["out_features"] == classes
    with pytest.raises(SystemExit):
        main([f"{tmp_path}/net.py:Classes", "--input-shape", "1,4,4", "--kwargs", "[1]",
              "-o", str(tmp_path / "x.json")])
    assert "--kwargs: expected a JSON object of keyword arguments, got list" in \
        capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["{dir}/nope.py:Net"], "nope.py: no such file"),
    (["{dir}/net.py"], "expected FILE.py:CLASS"),
    (["{dir}/net.py:Missing"], "has no 'Missing'; the nn.Module classes it defines: Classes, "
                               "Deconv, "
                               "NeedsArgs, Net"),
    (["{dir}/net.py:NeedsArgs"], "NeedsArgs\\(\\) failed.*give its arguments as JSON with "
                                 "--kwargs"),
    (["{dir}/net.py:NeedsArgs", "--kwargs", '{{"depth": 3}}'], "NeedsArgs\\(depth=3\\) failed"),
    (["{dir}/net.py:make_list"], "make_list\\(\\) returned a list, not an nn.Module"),
    (["{dir}/net.py:Deconv"], "up \\(ConvTranspose2d\\).*not supported"),
    (["{dir}/net.py:Net", "--state-dict", "{dir}/other.pt"], "other.pt: does not fit Net: "
                                                             "Error.*Missing key"),
    (["{dir}/net.py:Net", "--state-dict", "{dir}/pickle.pt"], "pickle.pt: not a state dict "
                                                              "torch.load reads with "
                                                              "weights_only=True"),
    (["{dir}/net.py:Net", "--state-dict", "{dir}/nested.pt"], "nested.pt: holds a dict with "
                                                              "keys \\['model'\\], not a state"),
])
def test_command_line_errors(tmp_path, capsys, args: list[str], message: str) -> None:
    (tmp_path / "net.py").write_text(textwrap.dedent(NET_FILE))
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    torch.save({"model": TutorialNet().state_dict()}, tmp_path / "nested.pt")
    torch.save({"conv1.weight": Payload()}, tmp_path / "pickle.pt")
    argv = [a.format(dir=tmp_path) for a in args] + ["--input-shape", "1,32,32",
                                                      "-o", str(tmp_path / "s.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "s.json").exists()


def test_to_spec_leaves_torchs_generator_as_it_found_it() -> None:
    """Porting draws random numbers (the check's network is built, lazy modules initialise);
    what torch.rand gives next is what it would have given without the port."""
    torch.manual_seed(5)
    want = torch.rand(4)
    module = ordered_sequential()
    torch.manual_seed(5)
    to_spec(module, (1, 32, 32))
    assert torch.equal(torch.rand(4), want)
    lazy = nn.Sequential(nn.Flatten(), nn.LazyLinear(10))
    torch.manual_seed(5)
    spec, weights = to_spec(lazy, (1, 4, 4))  # initialised by the port's first run
    assert torch.equal(torch.rand(4), want)
    assert weights["fc_1.weight"].shape == (10, 16)


def test_a_reshape_that_changes_nothing_is_the_identity() -> None:
    """x.view(-1, 1, 12, 12) on an N×1×12×12 batch (as pytorch/examples and d2l write it) is
    no layer at all; a reshape that does change the shape is still refused."""

    class ViewFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(2 * 10 * 10, 10)

        def forward(self, x):
            x = F.relu(self.conv(x.view(-1, 1, 12, 12)))
            return self.fc(torch.flatten(x, 1))

    spec, _ = to_spec(ViewFirst(), (1, 12, 12))
    assert [layer.type for layer in spec.layers] == ["conv", "relu", "flatten", "linear"]

    class ViewOther(ViewFirst):
        def forward(self, x):
            return super().forward(x.view(-1, 1, 6, 24).view(-1, 1, 12, 12))

    with pytest.raises(PortError, match=r"reshapes \(N, 1, 12, 12\) to \(N, 1, 6, 24\)"):
        to_spec(ViewOther(), (1, 12, 12))


def test_a_forward_that_returns_a_tuple_ports_the_element_asked_for(tmp_path, capsys) -> None:
    """``return logits, features``: output=0 ports the logits (the check compares them with
    element 0 of what the module returns); another element or index is one clear error."""
    spec, _ = to_spec(Bad("tuple"), (1, 8, 8), output=0)
    assert [layer.type for layer in spec.layers] == ["conv", "conv", "flatten", "linear"]
    with pytest.raises(PortError, match="the network ends in a 4×8×8 tensor; it must end flat"):
        to_spec(Bad("tuple"), (1, 8, 8), output=1)  # the features: only the layers they need
    with pytest.raises(PortError, match=r"output=2, but forward returns 2 values"):
        to_spec(Bad("tuple"), (1, 8, 8), output=2)
    with pytest.raises(PortError, match=r"output=0, but forward returns one value"):
        to_spec(Bad("plain"), (1, 8, 8), output=0)
    source = tmp_path / "pair.py"
    source.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Pair(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(16, 3)

            def forward(self, x):
                features = torch.flatten(x, 1)
                return self.fc(features), features
        """))
    argv = [f"{source}:Pair", "--input-shape", "1,4,4", "-o", str(tmp_path / "pair.json")]
    assert main(argv) == 2 and "--output-index I" in capsys.readouterr().err
    assert main([*argv, "--output-index", "0"]) == 0
    assert json.loads((tmp_path / "pair.json").read_text())["layers"][-1]["type"] == "linear"


def test_a_shared_submodule_is_named_by_its_callers_lines() -> None:
    """A block applied twice: the refusal quotes the two lines of forward that call it, each
    with the line inside the block."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x))

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2_2 = nn.Conv2d(1, 2, 3, padding=1), Block()
            self.fc = nn.Linear(2 * 8 * 8, 3)

        def forward(self, x):
            output = self.c2_2(self.c1(x))
            output = self.c2_2(output)
            return self.fc(output.flatten(1))

    with pytest.raises(PortError) as caught:
        to_spec(Twice(), (1, 8, 8))
    inner = r"\(inside: test_porter.py:\d+: return torch.relu\(self.conv\(x\)\)\)"
    assert re.search(r"c2_2.conv \(Conv2d\) at test_porter.py:\d+: output = "
                     r"self.c2_2\(output\) " + inner + r": c2_2.conv is applied a second time "
                     r"\(its first use: c2_2.conv \(Conv2d\) at test_porter.py:\d+: output = "
                     r"self.c2_2\(self.c1\(x\)\) " + inner, str(caught.value)), caught.value


def test_output_layers_and_adaptive_pools_in_the_spec() -> None:
    """What the published forms become: the output layer last, adaptive pools at the sizes
    the module gave (a None in output_size keeps that size), logits from the flatten."""
    spec, _ = to_spec(NllNet(), (1, 16, 16))
    assert spec.layers[-1].type == "log_softmax" and spec.output == "log_probs"
    assert spec.layers[0].type == "conv"  # the x.view(-1, 1, 16, 16) is the identity
    spec, _ = to_spec(adaptive_sequential(), (3, 15, 15))
    pools = [layer for layer in spec.layers if layer.type.startswith("adaptive")]
    assert [(p.type, p.output_size) for p in pools] == [("adaptive_max_pool", (5, 5)),
                                                        ("adaptive_avg_pool", (4, 3))]
    assert spec.output == "probs"
    spec, _ = to_spec(AllConvNet(), (1, 14, 14))
    assert spec.layers[-1].type == "flatten" and spec.num_classes == 10
    assert not any(isinstance(layer, Linear) for layer in spec.layers)


class SoftmaxNet(nn.Module):
    def __init__(self, what: str) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)
        self.what = what

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.what in ("indices", "pooled"):
            x = F.adaptive_max_pool2d(x, 4, return_indices=self.what == "indices")
            x = x[0] if self.what == "indices" else x
        y = self.fc(x.flatten(1))
        if self.what == "dim0":
            return F.softmax(y, dim=0)
        if self.what == "not_last":
            return F.relu(F.log_softmax(y, 1))
        if self.what == "dtype":
            return torch.softmax(y, 1, dtype=torch.float64)
        return y.softmax(dim=-1)


@pytest.mark.parametrize("what, message", [
    ("dim0", r"softmax over dim 0; the spec's softmax is over the classes, dim 1"),
    ("not_last", r"log_softmax is an output layer and must be the network's last"),
    ("indices", r"return_indices=True returns the indices too"),
    ("dtype", r"softmax in dtype torch.float64"),
])
def test_what_an_output_layer_cannot_be(what: str, message: str) -> None:
    with pytest.raises(PortError, match=message) as caught:
        to_spec(SoftmaxNet(what), (1, 4, 4))
    assert "\n" not in str(caught.value)
    spec, _ = to_spec(SoftmaxNet("pooled"), (1, 8, 8))  # the functional forms that port
    assert [layer.type for layer in spec.layers] == ["adaptive_max_pool", "flatten", "linear",
                                                     "softmax"]


class MeanNet(nn.Module):
    """A global average by x.mean over H, W; a forward that also returns the probabilities."""

    def __init__(self, dims: tuple = (2, 3), keepdim: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.dims, self.keepdim = dims, keepdim

    def forward(self, x: torch.Tensor):
        y = F.relu(self.conv(x)).mean(self.dims, keepdim=self.keepdim)
        logits = y.flatten(1) if self.keepdim else y
        return logits, F.softmax(logits, dim=1)


def test_a_global_mean_and_a_tuple_with_the_probabilities() -> None:
    """x.mean((2, 3)) is an adaptive average to 1×1 and a flatten; output=0 ports the logits
    though the tuple's other element (a softmax of them) is computed after them."""
    for keepdim in (False, True):
        module = MeanNet(keepdim=keepdim)
        spec, weights = to_spec(module, (1, 6, 6), output=0)
        assert [layer.type for layer in spec.layers] == ["conv", "relu", "adaptive_avg_pool",
                                                         "flatten"]
        x = torch.randn(3, 1, 6, 6)
        with torch.no_grad():
            want = module(x)[0].numpy()
        assert np.abs(flax_logits(spec, weights, x) - want).max() <= LOGIT_TOL
    with pytest.raises(PortError, match=r"a mean over \(1, 2\); the spec holds the mean over"):
        to_spec(MeanNet(dims=(1, 2)), (1, 4, 4), output=0)
