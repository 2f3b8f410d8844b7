"""Each port on its own, checked against the spec: structure, shapes, counts, init, errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import SLOW, fast_only, nhwc, random_batch, specs, twin_nets
from hypothesis import given, settings

import lenet_jax
import lenet_torch
from lenet_jax import model as jax_model
from lenet_spec import PRESETS, BatchNorm, Spec, WeightsError
from lenet_torch import model as torch_model

PORTS = {"torch": (lenet_torch, torch_model), "jax": (lenet_jax, jax_model)}


def _shape_checks(spec: Spec) -> None:
    t, j = twin_nets(spec)
    x, _ = random_batch(spec, 3)
    t_outs = torch_model.layer_outputs(t, torch.from_numpy(x))
    j_outs = jax_model.layer_outputs(j, jnp.asarray(nhwc(x)))
    for info, to, jo in zip(spec.infos, t_outs, j_outs, strict=True):
        want = info.out_shape
        assert tuple(to.shape) == (3, *want), info.label
        # JAX is NHWC: a spatial (C, H, W) appears as (H, W, C)
        j_want = want[1:] + want[:1] if len(want) == 3 else want
        assert tuple(jo.shape) == (3, *j_want), info.label
    counts = spec.layer_param_counts()
    assert torch_model.layer_param_counts(t) == counts
    assert jax_model.layer_param_counts(j) == counts
    assert sum(p.numel() for p in t.parameters()) == spec.param_count
    # parameters and buffers: names, order, shapes, counts
    assert [k for k, _ in t.named_parameters()] == list(spec.param_shapes)
    assert [k for k, _ in t.named_buffers()] == list(spec.buffer_shapes)
    for weights in (lenet_torch.get_weights(t), lenet_jax.get_weights(j)):
        assert {k: v.shape for k, v in weights.items()} == spec.state_shapes
        assert list(weights) == list(spec.state_shapes)
    from flax import nnx

    assert sum(v.size for v in jax.tree.leaves(nnx.state(j, nnx.BatchStat))) == \
        spec.buffer_count


@pytest.mark.parametrize("name", fast_only(PRESETS, "lenet5_bn"))
def test_layer_shapes_and_counts_match_spec(name: str) -> None:
    _shape_checks(PRESETS[name])


@SLOW
@settings(max_examples=25)
@given(specs())
def test_random_spec_shapes_and_counts(spec: Spec) -> None:
    _shape_checks(spec)


def test_torch_print_reads_like_the_tutorial() -> None:
    text = repr(lenet_torch.build("lenet5"))
    assert text.splitlines() == [
        "LeNet(",
        "  (conv1): Conv2d(1, 6, kernel_size=(5, 5), stride=(1, 1))",
        "  (conv2): Conv2d(6, 16, kernel_size=(5, 5), stride=(1, 1))",
        "  (fc1): Linear(in_features=400, out_features=120, bias=True)",
        "  (fc2): Linear(in_features=120, out_features=84, bias=True)",
        "  (fc3): Linear(in_features=84, out_features=10, bias=True)",
        ")",
    ]


@pytest.mark.parametrize("port", PORTS)
def test_layers_are_named_attributes(port: str) -> None:
    pkg, _ = PORTS[port]
    net = pkg.build("cifar10_cnn")
    for name in ("conv1", "conv2", "conv3", "linear1", "linear2"):
        assert hasattr(net, name)


def test_wrong_input_shapes() -> None:
    t, j = twin_nets(PRESETS["lenet5"])
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 1, 32, 32\).*unsqueeze"):
        t(torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 32, 32, 1\).*x\[None\]"):
        j(jnp.zeros((32, 32, 1)))
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\) \(NCHW\), got \(2, 1, 28, 28\)"):
        t(torch.zeros(2, 1, 28, 28))
    # an NCHW batch handed to the NHWC model
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 1\) \(NHWC\), got \(2, 1, 32, 32\)"):
        j(jnp.zeros((2, 1, 32, 32)))


@pytest.mark.parametrize("port", PORTS)
def test_set_weights_of_another_spec(port: str) -> None:
    pkg, _ = PORTS[port]
    net = pkg.build("lenet5")
    other = lenet_torch.get_weights(lenet_torch.build("lenet5_3x3"))
    with pytest.raises(WeightsError, match=r"'conv1.weight' has shape \(6, 1, 3, 3\), the spec "
                                           r"expects \(6, 1, 5, 5\)"):
        pkg.set_weights(net, other)
    weights = pkg.get_weights(net)
    del weights["fc3.bias"]
    with pytest.raises(WeightsError, match="missing tensor 'fc3.bias'"):
        pkg.set_weights(net, weights)


@pytest.mark.parametrize("port", PORTS)
def test_seeds(port: str) -> None:
    pkg, _ = PORTS[port]
    a, b, c = (pkg.get_weights(pkg.build("lenet5", seed=s)) for s in (0, 0, 1))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv1.weight"], c["conv1.weight"])


# ----------------------------------------------------------------------------- init


def _pooled_weights(pkg, spec: Spec, name: str, init: str, min_n: int) -> np.ndarray:
    """A layer's weights pooled over as many seeds as it takes to have ``min_n`` samples."""
    n = math.prod(spec.param_shapes[name])
    seeds = range(math.ceil(min_n / n))
    return np.concatenate([pkg.get_weights(pkg.build(spec, s, init))[name].ravel() for s in seeds])


@pytest.mark.parametrize("port", PORTS)
@pytest.mark.parametrize("name", fast_only(PRESETS, "lenet5"))
def test_default_init_std(port: str, name: str) -> None:
    """Weights ~ U(±1/√fan_in): std 1/√(3·fan_in), within 5%.

    The sample std of n uniform draws has relative standard error √(0.8/n)/2 ≈ 0.447/√n
    (uniform kurtosis 9/5). Layers are pooled over seeds to n ≥ 2,000, so 5% is ≥ 5 standard
    errors: a false failure has probability < 1e-6.
    """
    pkg, _ = PORTS[port]
    spec = PRESETS[name]
    for info in spec.infos:
        if not info.params:
            continue
        if isinstance(info.layer, BatchNorm):  # scale 1, shift 0 in both ports, as torch's
            built = pkg.get_weights(pkg.build(spec, 0))
            assert np.all(built[f"{info.label}.weight"] == 1)
            assert np.all(built[f"{info.label}.bias"] == 0)
            assert np.all(built[f"{info.label}.running_var"] == 1)
            continue
        wname = f"{info.label}.weight"
        fan_in = math.prod(spec.param_shapes[wname][1:])
        w = _pooled_weights(pkg, spec, wname, "torch", 2_000)
        expected = 1 / math.sqrt(3 * fan_in)
        assert abs(w.std() / expected - 1) < 0.05, (info.label, w.std(), expected)
        assert np.abs(w).max() <= 1 / math.sqrt(fan_in)
        if info.layer.bias:
            b = pkg.get_weights(pkg.build(spec, 0))[f"{info.label}.bias"]
            assert np.abs(b).max() <= 1 / math.sqrt(fan_in) and np.abs(b).max() > 0
        else:
            assert f"{info.label}.bias" not in pkg.get_weights(pkg.build(spec, 0))


@pytest.mark.parametrize("port", PORTS)
def test_lecun_normal_init(port: str) -> None:
    """lecun_normal: std 1/√fan_in (same 5 standard-error bound: the std of a ±2σ truncated
    normal has relative standard error ≈ 0.5·√((κ-1)/n) with κ ≈ 2.4, so n ≥ 2,000 gives
    ≤ 1.3%), values within ±2σ, zero biases."""
    pkg, _ = PORTS[port]
    spec = PRESETS["lenet5"]
    for info in spec.infos:
        if info.params and not isinstance(info.layer, BatchNorm):
            wname = f"{info.label}.weight"
            fan_in = math.prod(spec.param_shapes[wname][1:])
            w = _pooled_weights(pkg, spec, wname, "lecun_normal", 2_000)
            assert abs(w.std() * math.sqrt(fan_in) - 1) < 0.065
            assert np.abs(w).max() <= 2 / math.sqrt(fan_in) / 0.8796 + 1e-6
            bias = pkg.get_weights(pkg.build(spec, 0, "lecun_normal"))[f"{info.label}.bias"]
            assert not bias.any()
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        pkg.build(spec, 0, "xavier")


@pytest.mark.parametrize("port", PORTS)
@pytest.mark.parametrize("name", fast_only(PRESETS, "lenet5"))
def test_initial_cross_entropy_is_ln10(port: str, name: str) -> None:
    """At init the logits are small, so cross-entropy ≈ ln 10. Averaged over 512 standard-normal
    images and 4 init seeds; the per-image loss has std ≤ 0.15 on these presets (measured),
    so the mean's standard error is ≤ 0.007 and the 0.15 window (≥ 20 standard errors) tests
    the size of the initial logits, not sampling luck."""
    pkg, _ = PORTS[port]
    spec = PRESETS[name]
    x, y = random_batch(spec, 512, seed=7)
    losses = []
    for seed in range(4):
        net = pkg.build(spec, seed)
        if port == "torch":
            with torch.no_grad():
                losses.append(float(torch.nn.functional.cross_entropy(
                    net(torch.from_numpy(x)), torch.from_numpy(y))))
        else:
            from lenet_jax.loss import cross_entropy
            losses.append(float(cross_entropy(net(jnp.asarray(nhwc(x))), jnp.asarray(y))))
    assert abs(np.mean(losses) - math.log(10)) < 0.15, losses


@SLOW
@pytest.mark.parametrize("init", ["torch", "lecun_normal"])
def test_jax_build_draws_what_op_by_op_init_draws(init: str) -> None:
    """lenet_jax.build compiles the construction as one program; its weights are bit for bit
    those of Flax's op-by-op initialisation (nnx.Rngs(seed), one draw per parameter)."""
    from flax import nnx

    for name, spec in PRESETS.items():
        for seed in (0, 3):
            built = lenet_jax.get_weights(lenet_jax.build(spec, seed, init))
            eager = lenet_jax.get_weights(jax_model.LeNet(spec, init=init, rngs=nnx.Rngs(seed)))
            assert built.keys() == eager.keys()
            assert all(np.array_equal(built[k], eager[k]) for k in built), (name, seed)
