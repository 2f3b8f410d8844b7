"""batch_norm, dropout, the new activations and conv options, where ports between PyTorch and
Flax go wrong: each convention has a test that fails when that one conversion is wrong.

batch_norm: momentum (Flax's is 1 − torch's), the unbiased variance in the running variance,
the two-pass batch variance, one value per channel refused in training, batches counted.
dropout: one mask given to both ports (a test-only hook) gives equal outputs and gradients;
each port's own dropout drops the right fraction (a bound from the sample size) and scales
survivors by 1 / (1 − p); evaluation is the identity. GELU: exact (erf) unless asked for tanh.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from helpers import SLOW, busy_batch_norms, fast_only, nhwc, twin_nets

import lenet_jax
import lenet_torch
from lenet_jax import model as jax_model
from lenet_jax.batchnorm import CanonicalBatchNorm
from lenet_spec import (
    ELU,
    GELU,
    PRESETS,
    BatchNorm,
    Conv,
    Dropout,
    Dropout2d,
    Flatten,
    LeakyReLU,
    Linear,
    MaxPool,
    ReLU,
    SiLU,
    Spec,
)

REL = 1e-5  # relative to each tensor's largest magnitude, as the parity battery's gradients


def _close(got, want, tol: float = REL) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= tol * max(np.abs(want).max(), 1e-30), \
        (np.abs(got - want).max(), np.abs(want).max())


def _bn_spec(momentum: float = 0.1, spatial: bool = True, affine: bool = True) -> Spec:
    layers = ((Conv(3, 3, name="conv1"), BatchNorm(momentum, affine=affine), ReLU(), Flatten())
              if spatial else (Flatten(), Linear(5), BatchNorm(momentum, affine=affine), ReLU()))
    return Spec("bn", (2, 4, 4), (*layers, Linear(3)))


def _train_forwards(spec: Spec, batches: list[np.ndarray]):
    """Both ports, same weights and busy batch_norm state, in training mode, through
    ``batches``: the last logits of each and their canonical states."""
    t, j = twin_nets(spec)
    for x in batches:
        lt = t(torch.from_numpy(x)).detach().numpy()
        lj = np.asarray(j(jnp.asarray(nhwc(x))))
    return (lt, lenet_torch.get_weights(t)), (lj, lenet_jax.get_weights(j))


@pytest.mark.parametrize("spatial", [True, False])
@pytest.mark.parametrize("momentum", fast_only([0.1, 0.3], 0.3))
def test_batch_norm_momentum_and_unbiased_running_variance(spatial: bool, momentum: float) -> None:
    """Three training forwards: both ports' running mean and variance equal torch's rule
    r ← (1 − m)·r + m·batch, the variance the unbiased one (× n/(n−1); n is 2·2·2 = 8 values
    per channel for the conv, 2 for the linear: a biased variance is 8/7 or 2× off, a swapped
    momentum 7/3 or more), within 1e-5 relative; the logits agree too."""
    spec = _bn_spec(momentum, spatial)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((2, 2, 4, 4)).astype(np.float32) for _ in range(3)]
    (lt, wt), (lj, wj) = _train_forwards(spec, batches)
    _close(lj, lt)
    for name in ("bn1.running_mean", "bn1.running_var"):
        _close(wj[name], wt[name])
    # and torch's rule itself, recomputed here from the batches
    t = lenet_torch.build(spec)
    busy_batch_norms(t)
    mean, var = (t.bn1.running_mean.numpy().astype(np.float64).copy(),
                 t.bn1.running_var.numpy().astype(np.float64).copy())
    for x in batches:
        with torch.no_grad():
            xt = torch.from_numpy(x)
            h = t.conv1(xt) if spatial else t.fc1(torch.flatten(xt, 1))
        h = h.numpy().astype(np.float64)
        axes = (0, 2, 3) if spatial else (0,)
        n = h.size // h.shape[1]
        mean = (1 - momentum) * mean + momentum * h.mean(axes)
        var = (1 - momentum) * var + momentum * h.var(axes) * n / (n - 1)
    _close(wt["bn1.running_mean"], mean)
    _close(wt["bn1.running_var"], var)


def test_batch_norm_counts_training_batches_only() -> None:
    spec = _bn_spec()
    t, j = twin_nets(spec)
    x = np.random.default_rng(1).standard_normal((4, 2, 4, 4)).astype(np.float32)
    for _ in range(3):
        t(torch.from_numpy(x))
        j(jnp.asarray(nhwc(x)))
    t.eval()
    j.eval()
    t(torch.from_numpy(x))
    j(jnp.asarray(nhwc(x)))
    for w in (lenet_torch.get_weights(t), lenet_jax.get_weights(j)):
        assert w["bn1.num_batches_tracked"] == 7 + 3  # busy_batch_norms starts it at 7
        assert w["bn1.num_batches_tracked"].dtype == np.int64


def test_batch_norm_variance_in_two_passes() -> None:
    """The same activations, of mean 1,000 and standard deviation 1, given to both ports'
    batch_norm: E[x²] − E[x]² in float32 (Flax's default) loses the variance to rounding (the
    spacing of float32 near 1e6 is 0.06); the two-pass variance matches torch's within 1e-5 in
    the output and the running variance, and Flax's default misses by more than 1e-3."""
    x = (1000 + np.random.default_rng(2).standard_normal((8, 2, 4, 4))).astype(np.float32)
    torch_bn = torch.nn.BatchNorm2d(2)
    jax_bn = CanonicalBatchNorm(2, BatchNorm(), rngs=nnx.Rngs(0))
    yt = torch_bn(torch.from_numpy(x)).detach().numpy()
    yj = np.asarray(jax_bn(jnp.asarray(nhwc(x)))).transpose(0, 3, 1, 2)
    _close(np.asarray(jax_bn.var[...]), torch_bn.running_var.numpy())
    # x − mean cannot be finer than float32's spacing near 1,000 (6.1e-5): both ports' means
    # round to one of two neighbours, so the outputs (std 1) may differ by two spacings
    assert np.abs(yj - yt).max() <= 2 * np.spacing(np.float32(1000))
    fast = nnx.BatchNorm(2, momentum=0.0, use_fast_variance=True, rngs=nnx.Rngs(0))
    fast(jnp.asarray(nhwc(x)))  # momentum 0: its running variance is the batch's
    biased = x.astype(np.float64).var((0, 2, 3))
    assert np.abs(np.asarray(fast.var[...]) - biased).max() > 1e-3 * biased.max()
    two_pass = (np.asarray(jax_bn.var[...]) - 0.9) / 0.1 * (127 / 128)  # back to the batch's
    assert np.abs(two_pass - biased).max() <= 1e-4 * biased.max()


@pytest.mark.parametrize("spatial, shape", [(False, (1, 2, 4, 4)), (True, (1, 2, 2, 2))])
def test_batch_norm_refuses_one_value_per_channel_in_training(spatial, shape) -> None:
    """torch raises on one value per channel in training; Flax would divide by a zero variance
    and train on NaNs; the JAX port raises torch's error."""
    spec = (Spec("bn", (2, 2, 2), (Conv(3, 2, name="conv1"), BatchNorm(), Flatten(), Linear(3)))
            if spatial else _bn_spec(spatial=False))
    t, j = twin_nets(spec)
    x = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"
                       ) as torch_error:
        t(torch.from_numpy(x))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"
                       ) as jax_error:
        j(jnp.asarray(nhwc(x)))
    assert str(jax_error.value).split(", got")[0] == str(torch_error.value).split(", got")[0]
    t.eval()
    j.eval()
    _close(np.asarray(j(jnp.asarray(nhwc(x)))), t(torch.from_numpy(x)).detach().numpy())


def test_batch_norm_without_affine_has_buffers_only() -> None:
    spec = _bn_spec(affine=False)
    assert "bn1.weight" not in spec.state_shapes
    assert list(spec.buffer_shapes) == ["bn1.running_mean", "bn1.running_var",
                                        "bn1.num_batches_tracked"]
    (lt, wt), (lj, wj) = _train_forwards(
        spec, [np.random.default_rng(3).standard_normal((3, 2, 4, 4)).astype(np.float32)])
    assert wt.keys() == wj.keys() == spec.state_shapes.keys()
    _close(lj, lt)


@pytest.mark.parametrize("layer, torch_fn", [
    (GELU(), lambda x: F.gelu(x)),
    (GELU("tanh"), lambda x: F.gelu(x, approximate="tanh")),
    (LeakyReLU(0.2), lambda x: F.leaky_relu(x, 0.2)),
    (ELU(0.7), lambda x: F.elu(x, 0.7)),
    (SiLU(), F.silu),
])
def test_activations_match_torch(layer, torch_fn) -> None:
    """Each activation of the JAX port against torch's, values and gradients within 1e-5 of the
    largest (GELU: exact erf by default; Flax's tanh default is 4.7e-4 away), at exactly 0
    too: leaky_relu's gradient there is torch's negative slope, not jax.nn.leaky_relu's 1."""
    x = np.linspace(-6, 6, 2001, dtype=np.float32)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch_fn(xt)
    yt.sum().backward()
    f = lambda v: jax_model.ACTIVATIONS[type(layer)](layer, v)  # noqa: E731
    assert 0.0 in x
    _close(np.asarray(f(jnp.asarray(x))), yt.detach().numpy())
    _close(np.asarray(jax.grad(lambda v: f(v).sum())(jnp.asarray(x))), xt.grad.numpy())
    if isinstance(layer, GELU) and layer.approximate == "none":  # the default that bites
        assert np.abs(np.asarray(jax.nn.gelu(jnp.asarray(x))) - yt.detach().numpy()).max() > 1e-4


# ----------------------------------------------------------------------------- dropout

def _dropout_spec() -> Spec:
    return Spec("drop", (2, 6, 6), (
        Conv(4, 3, name="conv1"), ReLU(), Dropout2d(0.25), MaxPool(2), Flatten(),
        Linear(8, name="fc1"), ReLU(), Dropout(0.5), Linear(3, name="fc2")))


@SLOW
def test_one_mask_for_both_ports_gives_equal_outputs_and_gradients(monkeypatch) -> None:
    """The test hands both ports the same keep masks (torch's F.dropout/F.dropout2d replaced by
    torch's own formula x·keep/(1 − p); the JAX port's keep_mask replaced): logits and every
    gradient agree within 1e-5, for both kernels of each port."""
    spec = _dropout_spec()
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 2, 6, 6)).astype(np.float32)
    y = rng.integers(0, 3, 5)
    keep2d = rng.random((5, 4, 1, 1)) >= 0.25  # per image and channel (NCHW)
    keep = rng.random((5, 8)) >= 0.5

    def torch_dropout(x, p, training=True, inplace=False):
        mask = keep if x.dim() == 2 else keep2d
        return x * torch.from_numpy(mask.astype(np.float32)) * (1 / (1 - p)) if training else x

    masks = iter([])

    def jax_keep(key, p, shape):
        return jnp.asarray(next(masks))

    monkeypatch.setattr(F, "dropout", torch_dropout)
    monkeypatch.setattr(F, "dropout2d", torch_dropout)
    monkeypatch.setattr(jax_model, "keep_mask", jax_keep)
    for kernels in (("stock", "stock"), ("fused", "fused")):
        t, j = twin_nets(spec, kernels=kernels)
        t.zero_grad()
        loss_t = F.cross_entropy(t(torch.from_numpy(x)), torch.from_numpy(y))
        loss_t.backward()
        masks = iter([keep2d.transpose(0, 2, 3, 1), keep])  # NHWC, then the features

        def loss_j(m):
            return optax_ce(m(jnp.asarray(nhwc(x))), jnp.asarray(y))

        loss_j_value, grads = nnx.value_and_grad(loss_j)(j)
        assert abs(float(loss_j_value) - loss_t.item()) <= 1e-5 * loss_t.item()
        from helpers import jax_canonical

        gj = jax_canonical(j, grads)
        for name, param in t.named_parameters():
            _close(gj[name], param.grad.numpy())


def optax_ce(logits, labels):
    from lenet_jax.loss import cross_entropy

    return cross_entropy(logits, labels)


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_drops_p_and_scales_survivors(framework: str, p: float) -> None:
    """Each port's own dropout on 200,000 ones: the dropped fraction f has standard error
    σ = √(p(1−p)/n) ≈ 0.0011 at n = 200,000, so |f − p| ≤ 6σ fails a correct dropout with
    probability < 2e-9; every survivor is 1/(1 − p) in float32 (torch multiplies by
    1/(1 − p), JAX divides by 1 − p: at most 1 ulp apart); whole channels for dropout2d; the
    identity in evaluation."""
    n = 200_000
    for layer, shape in ((Dropout(p), (n, 1, 1, 1)), (Dropout2d(p), (n, 3, 2, 2))):
        spec = Spec("d", shape[1:], (layer, Flatten(), Linear(1)))
        if framework == "torch":
            net = lenet_torch.build(spec)
            out = net.apply_layer(layer, torch.ones(shape)).numpy()
            net.eval()
            assert np.array_equal(net.apply_layer(layer, torch.ones(shape)).numpy(),
                                  np.ones(shape))
        else:
            net = lenet_jax.build(spec)
            out = np.asarray(net.apply_layer(layer, jnp.ones(nhwc(np.ones(shape)).shape),
                                             nnx.Rngs(dropout=7))).transpose(0, 3, 1, 2)
            net.eval()
            assert np.array_equal(np.asarray(net.apply_layer(layer, jnp.ones((n, 2, 2, 3)))),
                                  np.ones((n, 2, 2, 3)))
        channels = out.reshape(n, shape[1], -1)
        assert np.all(channels == channels[:, :, :1])  # one decision per channel (and pixel)
        dropped = float(np.mean(channels[:, :, 0] == 0))
        sigma = math.sqrt(p * (1 - p) / channels[:, :, 0].size)
        assert abs(dropped - p) <= 6 * sigma, (dropped, p, sigma)
        survivors = out[out != 0]
        scale = np.float32(1) / np.float32(1 - p)
        assert np.abs(survivors - scale).max() <= np.spacing(scale)


@SLOW
def test_jax_dropout_masks_follow_the_step() -> None:
    """The JAX training step draws dropout from (seed, step): the same step the same mask (a
    resumed run), another step another mask."""
    from lenet_jax.loss import loss_fn
    from lenet_jax.optim import make_tx
    from lenet_jax.trainer import make_steps, split_for_training

    spec = PRESETS["lenet5_bn"]
    graphdef, eval_graphdef, params, stats, rest = split_for_training(lenet_jax.build(spec))
    tx = make_tx("sgd", 0.0)
    step, _, _ = make_steps(graphdef, eval_graphdef, tx, loss_fn("ce"), seed=3)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((8, 32, 32, 1)), jnp.float32)
    y = jnp.zeros(8, jnp.int32)
    idx = jnp.arange(8, dtype=jnp.int32)

    def loss_at(i):
        state = jax.tree.map(jnp.copy, (params, stats, tx.init(params)))
        return float(step(state, rest, x, y, idx, np.int32(i))[1])

    assert loss_at(5) == loss_at(5) != loss_at(6)
