"""Forms the porter reads by what they compute, not by a list of spellings: arithmetic with
constants (the spec's scale), reshapes judged by their shapes, calls that change nothing,
dropout on a flat vector, pools with padding and ceil_mode, images without a channel axis,
an exported module's dropout, factories and arguments on the command line. Every module here
is written for the test, in the styles of published ones (Atari Q-networks, DCGAN
discriminators, recipes); each ports, and the Flax model of its spec gives its logits."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import port_round_trip
from torch import nn

from lenet_port import PortError, port
from lenet_port.__main__ import main
from lenet_spec import AvgPool, Dropout, Dropout2d, Flatten, Linear, MaxPool, Scale, Spec


def _round_trip(module: nn.Module, shape: tuple[int, ...], tracer: str | None = None) -> Spec:
    """:func:`helpers.port_round_trip` on frames of pixel values (4 channels: an Atari
    network's) or a normal batch; the spec."""
    x = torch.rand(5, *shape) * 255 if shape[0] == 4 else torch.randn(5, *shape)
    return port_round_trip(module, shape, x, tracer).spec


class QNet(nn.Module):
    """An Atari DQN's shape: uint8-range frames scaled by 1/255, strided convs, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 8, stride=4)
        self.conv2 = nn.Conv2d(8, 16, 4, stride=2)
        self.fc = nn.Linear(16 * 3 * 3, 32)
        self.out = nn.Linear(32, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / 255.0
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.out(F.relu(self.fc(x.view(x.size(0), -1))))


class Normalised(nn.Module):
    """Input centred and scaled per channel by buffers, then numbers every way round."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1))
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = 1 - 2 * torch.relu(self.conv(x))
        x = torch.sub(x.mul(0.5), 0.25, alpha=2) + 3
        return self.fc(torch.flatten(-x, 1))


class Discriminator(nn.Module):
    """A DCGAN discriminator: convs down to a (N, 1, 1, 1) score, squeezed (or not)."""

    def __init__(self, squeeze: bool) -> None:
        super().__init__()
        self.squeeze = squeeze
        self.conv1 = nn.Conv2d(1, 8, 4, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 1, 4, 1, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.sigmoid(self.conv2(F.leaky_relu(self.bn(self.conv1(x)), 0.2)))
        return x.view(-1, 1).squeeze(1) if self.squeeze else x


class NoOps(nn.Module):
    """Calls that change nothing when the tensor already is what they ask for."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(x.device).float().contiguous()
        x = self.conv(x).type_as(x)
        return self.fc(x.reshape(x.shape[0], -1).unsqueeze(1).squeeze(1))


class Recipe(nn.Module):
    """The "Defining a neural network" recipe: nn.Dropout2d on a flat vector (torch warns and
    drops single elements)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.dropout2 = nn.Dropout2d(0.5)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(self.dropout2(torch.flatten(x, 1)))


class Pools(nn.Module):
    """Pools with padding, ceil_mode and count_include_pad, on sizes they do not divide."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.max = nn.MaxPool2d(3, 2, padding=1)
        self.avg = nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False)
        self.fc = nn.Linear(4 * 2 * 2, 5)  # 13 → 11 → 6 → 4 (ceil) → 2 (ceil)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avg(self.max(F.relu(self.conv(x))))
        x = F.max_pool2d(x, 2, ceil_mode=True)
        x = F.avg_pool2d(x, 1, padding=0, count_include_pad=True)
        return self.fc(torch.flatten(x, 1))


class ChannelLess(nn.Module):
    """Takes (N, H, W) images and adds their channel itself."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.conv = nn.Conv2d(1, 4, 5)
        self.fc = nn.Linear(4 * 12 * 12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1) if self.spelling == "method" else torch.unsqueeze(x, 1)
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(x.flatten(1))


class LoopDropout(nn.Module):
    """torch.fx cannot trace the loop over x.size(): torch.export reads it, with nn.Dropout and
    nn.Dropout2d in evaluation mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.drop2d = nn.Dropout2d(0.2)
        self.fc = nn.Linear(4 * 6 * 6, 6)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop2d(F.relu(self.conv(x)))
        n = 1
        for s in x.size()[1:]:
            n *= s
        return self.drop(self.fc(x.view(-1, n)))


def test_arithmetic_with_constants_is_the_specs_scale() -> None:
    spec = _round_trip(QNet(), (4, 36, 36))
    assert spec.layers[0] == Scale(1 / 255.0, 0.0)
    spec = _round_trip(Normalised(), (3, 8, 8))
    scales = [layer for layer in spec.layers if isinstance(layer, Scale)]
    assert scales[0].shift == pytest.approx((-0.4, -0.5, -0.6))
    assert scales[1].scale == pytest.approx((5.0, 4.0, 1 / 0.3))
    assert len(scales) == 8  # − mean, / std, 2·, 1 −, ·0.5, − 2·0.25, + 3, −x


@pytest.mark.parametrize("squeeze", [True, False])
def test_a_discriminators_single_output_ports(squeeze: bool) -> None:
    """(N, 1, 1, 1), returned as it is or squeezed to (N,): the spec's one logit, (N, 1)."""
    spec = _round_trip(Discriminator(squeeze).eval(), (1, 8, 8))
    assert isinstance(spec.layers[-1], Flatten) and spec.num_classes == 1


def test_calls_that_change_nothing_are_the_identity() -> None:
    spec = _round_trip(NoOps(), (1, 6, 6))
    assert [layer.type for layer in spec.layers] == ["conv", "flatten", "linear"]


def test_dropout2d_on_a_flat_vector_is_dropout() -> None:
    spec = _round_trip(Recipe(), (1, 10, 10), "torch.fx")
    assert Dropout(0.5) in spec.layers and not any(isinstance(layer, Dropout2d)
                                                   for layer in spec.layers)


def test_pools_with_padding_and_ceil_mode() -> None:
    spec = _round_trip(Pools(), (2, 13, 13))
    pools = [layer for layer in spec.layers if isinstance(layer, (MaxPool, AvgPool))]
    assert pools[0] == MaxPool(3, 2, padding=(1, 1))
    assert pools[1] == AvgPool(3, 2, padding=(1, 1), ceil_mode=True, count_include_pad=False)
    assert pools[2] == MaxPool(2, ceil_mode=True)


@pytest.mark.parametrize("spelling", ["method", "function"])
def test_images_without_a_channel_axis(spelling: str, tmp_path) -> None:
    """to_spec(module, (28, 28)): the spec takes 1×28×28 images, fed (N, 28, 28) as the
    module takes them (both ports add the axis); the command line's --input-shape 28,28."""
    spec = _round_trip(ChannelLess(spelling), (28, 28))
    assert spec.input_shape == (1, 28, 28) and spec.fed == "NHW"
    assert Spec.from_dict(json.loads(spec.to_json())) == spec
    source = tmp_path / "net.py"
    source.write_text("from torch import nn\n\n\nclass Net(nn.Module):\n"
                      "    def __init__(self):\n        super().__init__()\n"
                      "        self.fc = nn.Linear(28 * 28, 10)\n\n"
                      "    def forward(self, x):\n"
                      "        return self.fc(x.unsqueeze(1).flatten(1))\n")
    assert main([f"{source}:Net", "--input-shape", "28,28", "-o", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["fed"] == "NHW"


def test_an_exported_modules_dropout_in_evaluation() -> None:
    """The export path read an evaluation-mode nn.Dropout as one that drops in evaluation too
    (ATen's flag is named train, not training): it ports, as dropout and dropout2d."""
    spec = _round_trip(LoopDropout(), (1, 8, 8), "torch.export")
    assert Dropout2d(0.2) in spec.layers and Dropout(0.3) in spec.layers


@pytest.mark.parametrize("forward, says", [
    (lambda self, x: self.fc(x.double().float().flatten(1)), "converts the network's torch.float32 "
                                                       "tensor to torch.float64"),
    (lambda self, x: self.fc((x * torch.arange(16.0).view(1, 1, 4, 4)).flatten(1)),
     "computes with a constant of shape (1, 1, 4, 4)"),
    (lambda self, x: self.fc((1 / x).flatten(1)), "divides a constant by the network's tensor"),
    (lambda self, x: self.fc(x.view(-1, 2, 8).flatten(1)), "reshapes (N, 1, 4, 4) to (N, 2, 8)"),
])
def test_what_is_still_not_a_spec_is_one_clear_error(forward, says: str) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 2)

    Net.forward = forward
    with pytest.raises(PortError, match=says.replace("(", r"\(").replace(")", r"\)")):
        port(Net(), (1, 4, 4))


def test_the_new_layers_hold_parity_in_both_modes() -> None:
    """Scale (numbers and per channel) and pools with padding, ceil_mode and
    count_include_pad: the two ports' logits and gradients agree (the parity battery's
    verdict, its float64 reference included)."""
    from lenet_parity.check import check

    spec = Spec("forms", (3, 11, 11), (
        Scale((0.5, 2.0, -1.0), (0.1, 0.0, -0.2)), MaxPool(3, 2, padding=1, ceil_mode=True),
        AvgPool(2, 2, padding=1, ceil_mode=True, count_include_pad=False),
        AvgPool(3, 1, padding=1), Flatten(), Scale(0.25, 1.0), Dropout(0.1),
        Linear(4)))
    report = check(spec, steps=5, batch=8)
    assert report.ok, report.table()


def test_a_learned_scale_is_not_taken_for_a_constant() -> None:
    """x * self.gamma with gamma an nn.Parameter: a constant in the spec would not train, so
    it is refused, naming the parameter."""

    class Gain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gamma = nn.Parameter(torch.full((1, 2, 1, 1), 0.5))
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(2 * 4 * 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(self.conv(x) * self.gamma, 1))

    with pytest.raises(PortError, match="with the learned parameter gamma; a spec's scale is a "
                                        "constant"):
        port(Gain(), (1, 6, 6))


class ChannelsLast(nn.Module):
    """Observations as environments give them, (N, H, W, C), scaled, then moved channels first
    (``permute`` or ``movedim``)."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.conv = nn.Conv2d(3, 4, 3, 2)
        self.fc = nn.Linear(4 * 4 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spelling == "permute":
            x = x.permute(0, 3, 1, 2) / 255.0
        else:
            x = torch.movedim(x.float() / 255.0, -1, 1)
        return self.fc(F.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("spelling", ["permute", "movedim"])
def test_channels_last_images_moved_first(spelling: str) -> None:
    """to_spec(module, (H, W, C)) of a module that moves channels first: a spec fed NHWC of
    C×H×W images, whose torch port takes (N, H, W, C) as the module does (and NCHW as the
    programs feed it), and whose Flax port takes NHWC as always."""
    spec = port_round_trip(ChannelsLast(spelling), (9, 11, 3),
                           torch.rand(5, 9, 11, 3) * 255).spec
    assert spec.input_shape == (3, 9, 11) and spec.fed == "NHWC"
    assert spec.layers[0] == Scale(1 / 255.0, 0.0)
    assert Spec.from_dict(json.loads(spec.to_json())) == spec


def test_a_permute_elsewhere_is_refused() -> None:
    """Axes reordered after a layer, or any other way: one error naming the reordering."""

    class Late(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.fc = nn.Linear(2 * 3 * 3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).permute(0, 1, 3, 2).flatten(1))

    with pytest.raises(PortError, match=r"reorders the axes of \(N, 2, 3, 3\) to \(N, 2, 3, 3\); "
                                        r"a spec holds one reordering, channels-last"):
        port(Late(), (2, 3, 3))
