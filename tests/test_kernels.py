"""The tuned formulations (``kernels="fused"``) of both ports against each framework's own layers:
values and the gradients of input, kernel and bias within 1e-5 of each tensor's largest
magnitude (float32 sums in another order), ties sent where torch's max-pool sends them, and the
choice of kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import SLOW, fast_only

import lenet_jax
import lenet_torch
from lenet_jax import kernels as jk
from lenet_torch import kernels as tk

TOL = 1e-5


def _close(got, want) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOL * np.abs(want).max()


def _jax_vs(reference, fused, args, rng) -> None:
    """Values and vjp of ``fused`` against ``reference`` (JAX)."""
    y_ref, vjp_ref = jax.vjp(reference, *args)
    y, vjp = jax.vjp(fused, *args)
    _close(y, y_ref)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    for got, want in zip(vjp(dy), vjp_ref(dy), strict=True):
        _close(got, want)


def _torch_vs(reference, fused, args, rng) -> None:
    """Values and gradients of ``fused`` against ``reference`` (torch)."""
    grads = []
    for f in (fused, reference):
        leaves = [torch.tensor(a, requires_grad=True) for a in args]
        y = f(*leaves)
        dy = torch.from_numpy(np.random.default_rng(9).standard_normal(tuple(y.shape))
                              .astype(np.float32))
        y.backward(dy)
        grads.append([y.detach().numpy(), *(leaf.grad.numpy() for leaf in leaves)])
    for got, want in zip(*grads, strict=True):
        _close(got, want)


ACTS = {"relu": (jax.nn.relu, F.relu), "tanh": (jnp.tanh, torch.tanh),
        "sigmoid": (jax.nn.sigmoid, torch.sigmoid), None: (None, None)}


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("stride, padding", [((1, 1), (0, 0)), ((2, 1), (1, 2)), ((3, 3), (2, 0))])
def test_one_channel_conv_equals_the_framework_conv(framework, stride, padding) -> None:
    """The shift-and-add one-channel conv (with its GEMM backward pass)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 1, 13, 11)).astype(np.float32)
    w = rng.standard_normal((5, 1, 3, 4)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    if framework == "torch":
        _torch_vs(lambda x, w, b: F.conv2d(x, w, b, stride, padding),
                  lambda x, w, b: tk.conv_one_channel(x, w, b, stride, padding), (x, w, b), rng)
        return
    pads = ((padding[0],) * 2, (padding[1],) * 2)

    def xla(x, k, b):
        return jax.lax.conv_general_dilated(x, k, stride, pads,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC")) + b

    args = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(w.transpose(2, 3, 1, 0)),
            jnp.asarray(b))
    _jax_vs(xla, lambda x, k, b: jk.conv_one_channel(x, k, b, stride, padding), args, rng)


@SLOW
@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("kernel, padding, pool, cin, act", [
    ((5, 5), (0, 0), (2, 2), 1, "relu"),     # lenet5's conv1 block
    ((5, 5), (0, 0), (2, 2), 6, "relu"),     # its conv2 block
    ((3, 3), (1, 1), (2, 2), 3, "tanh"),
    ((4, 2), (0, 1), (3, 2), 2, "sigmoid"),  # even kernel, unequal pool, ragged edges
    ((1, 1), (0, 0), (2, 2), 4, None),       # conv straight into the pool
])
def test_conv_max_pool_equals_conv_then_pool(framework, kernel, padding, pool, cin, act) -> None:
    """conv + activation + max-pool as one matrix product over the pool's phases, against the
    framework's conv, the activation and its max-pool."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, cin, 15, 12)).astype(np.float32)
    w = rng.standard_normal((5, cin, *kernel)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    jax_act, torch_act = ACTS[act]
    if framework == "torch":
        f = torch_act or (lambda v: v)
        _torch_vs(lambda x, w, b: F.max_pool2d(f(F.conv2d(x, w, b, padding=padding)), pool),
                  lambda x, w, b: tk.conv_max_pool(x, w, b, padding, pool, torch_act),
                  (x, w, b), rng)
        return
    f = jax_act or (lambda v: v)
    pads = ((padding[0],) * 2, (padding[1],) * 2)

    def reference(x, k, b):
        y = f(jax.lax.conv_general_dilated(x, k, (1, 1), pads,
                                           dimension_numbers=("NHWC", "HWIO", "NHWC")) + b)
        return jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, *pool, 1), (1, *pool, 1),
                                     "VALID")

    args = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(w.transpose(2, 3, 1, 0)),
            jnp.asarray(b))
    _jax_vs(reference, lambda x, k, b: jk.conv_max_pool(x, k, b, padding, pool, jax_act),
            args, rng)


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("between, take_max, padding", [
    (("batch_norm", "relu"), True, (0, 0)),    # lenet5_bn's block
    (("tanh",), False, (0, 0)),                # lenet5_classic's block
    (("batch_norm", "gelu"), True, (1, 2)),    # a non-monotone activation: no max first
    (("batch_norm",), False, (1, 1)),
    ((), False, (0, 1)),                       # conv straight into an avg-pool, ragged edge
])
def test_conv_pool_with_layers_between(framework, between, take_max, padding) -> None:
    """conv, batch_norm and activations, then a max- or avg-pool, as one matrix product over
    the pool's phases (the layers between applied to every phase), against the framework's
    conv, the layers on the conv's output and its pooling, in both ports."""
    from lenet_jax.batchnorm import normalise

    rng = np.random.default_rng(4)
    pool = (2, 2)
    # with batch_norm the conv's output must tile into the pool's windows: 14 + 2p - 2
    x = rng.standard_normal((3, 3, 14, 16 if between else 15)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    commutes = take_max and between == ("relu",)
    if framework == "torch":
        fns = {"batch_norm": lambda y: F.batch_norm(y, None, None, training=True) * 1.5 - 0.5,
               "relu": F.relu, "tanh": torch.tanh, "gelu": F.gelu}
        chain = [fns[name] for name in between]

        def stock(x, w, b):
            y = F.conv2d(x, w, b, padding=padding)
            for f in chain:
                y = f(y)
            return F.max_pool2d(y, pool) if take_max else F.avg_pool2d(y, pool)

        def fused_t(x, w, b):
            return tk.conv_pool(x, w, b, padding, pool, chain, take_max, commutes)

        if "batch_norm" in between:  # the bias's gradient is 0 in exact arithmetic: noise
            bt = torch.from_numpy(b)
            _torch_vs(lambda x, w: stock(x, w, bt), lambda x, w: fused_t(x, w, bt), (x, w), rng)
        else:
            _torch_vs(stock, fused_t, (x, w, b), rng)
        return
    fns = {"batch_norm": lambda y: normalise(y, 1e-5)[0] * 1.5 - 0.5, "relu": jax.nn.relu,
           "tanh": jnp.tanh, "gelu": lambda y: jax.nn.gelu(y, approximate=False)}
    chain = [fns[name] for name in between]
    pads = ((padding[0],) * 2, (padding[1],) * 2)
    xj, kj, bj = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(w.transpose(2, 3, 1, 0)),
                  jnp.asarray(b))

    def reference(x, k, b):
        y = jax.lax.conv_general_dilated(x, k, (1, 1), pads,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
        for f in chain:
            y = f(y)
        if take_max:
            return jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, *pool, 1),
                                         (1, *pool, 1), "VALID")
        return jax.lax.reduce_window(y, 0.0, jax.lax.add, (1, *pool, 1), (1, *pool, 1),
                                     "VALID") / 4

    def fused(x, k, b):
        return jk.conv_pool(x, k, b, padding, pool, chain, take_max, commutes)

    if "batch_norm" in between:  # the bias's gradient is 0 in exact arithmetic: rounding noise
        _jax_vs(lambda x, k: reference(x, k, bj), lambda x, k: fused(x, k, bj), (xj, kj), rng)
    else:
        _jax_vs(reference, fused, (xj, kj, bj), rng)


def test_fusion_plan() -> None:
    """The one plan both ports' fused kernels follow: batch_norm and activations between conv
    and pool are taken into a conv_pool step (a max first where a monotone activation or
    nothing stands between); dropout, a stride, overlapping windows, a batch_norm facing a
    ragged edge leave the conv to the framework; a one-channel conv and a non-overlapping pool
    have their own steps."""
    from lenet_kernels import fusion_plan
    from lenet_spec import GELU, AvgPool, BatchNorm, Conv, Dropout, Flatten, Linear, MaxPool, ReLU
    from lenet_spec import Spec as S

    def plan(layers, shape=(2, 12, 12)):
        steps = fusion_plan(S("s", shape, (*layers, Flatten(), Linear(2))).infos)
        return [(s.kind, s.stop - s.start, s.take_max, s.commutes) for s in steps[:-2]]

    conv = Conv(4, (3, 3), padding=(1, 1))
    assert plan((conv, BatchNorm(), ReLU(), MaxPool(2))) == [("conv_pool", 4, True, False)]
    assert plan((conv, ReLU(), MaxPool(2))) == [("conv_pool", 3, True, True)]
    assert plan((conv, GELU(), MaxPool(2))) == [("conv_pool", 3, True, False)]
    assert plan((conv, AvgPool(2))) == [("conv_pool", 2, False, True)]
    assert plan((conv, Dropout(0.5), MaxPool(2))) == [
        ("layer", 1, False, False), ("layer", 1, False, False), ("pool", 1, True, False)]
    assert plan((Conv(4, (3, 3), stride=(2, 2)), MaxPool(2)))[0] == ("layer", 1, False, False)
    assert plan((conv, MaxPool(3, 2)))[1] == ("layer", 1, False, False)
    assert plan((Conv(4, (3, 3)), BatchNorm(), MaxPool(4)))[0][0] == "layer"  # 10 × 10, 4 × 4
    assert plan((Conv(4, (3, 3)), ReLU(), MaxPool(4)))[0] == ("conv_pool", 3, True, True)
    assert plan((Conv(4, (3, 3), stride=(2, 2)),), (1, 12, 12))[0][0] == "conv_one_channel"


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_pool_equals_the_framework_pool(framework, reduce) -> None:
    """Non-overlapping pooling as a reshape, on a ragged 7×9 input with 2×3 windows."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 7, 9)).astype(np.float32)
    if framework == "torch":
        stock = F.max_pool2d if reduce == "max" else F.avg_pool2d
        _torch_vs(lambda x: stock(x, (2, 3)), lambda x: tk.pool(x, (2, 3), reduce), (x,), rng)
        return
    from flax import nnx

    stock = nnx.max_pool if reduce == "max" else nnx.avg_pool
    _jax_vs(lambda x: stock(x, (2, 3), (2, 3)), lambda x: jk.pool(x, (2, 3), reduce),
            (jnp.asarray(x.transpose(0, 2, 3, 1)),), rng)


def _tied_problem():
    """A mostly-zero image (as MNIST is): a window's values tie, and a positive bias lets
    ReLU pass the ties."""
    rng = np.random.default_rng(2)
    x = np.zeros((2, 1, 12, 12), np.float32)
    x[:, :, 3:7, 4:8] = rng.standard_normal((2, 1, 4, 4))
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    b = np.abs(rng.standard_normal(4)).astype(np.float32)
    dy = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    F.max_pool2d(F.relu(F.conv2d(xt, wt, bt)), 2).backward(torch.from_numpy(dy))
    return (x, w, b, dy), [g.numpy() for g in (xt.grad, wt.grad, bt.grad)]


@pytest.mark.parametrize("kernels", ["stock", "fused"])
def test_jax_sends_tied_gradients_where_torch_does(kernels) -> None:
    """JAX's reduce_window max-pool (stock) and the phase maximum (fused) send a tied window's
    gradient to its first maximum, as torch's max_pool2d does: input, kernel and bias
    gradients match torch's."""
    (x, w, b, dy), want = _tied_problem()

    def f(x, k, b):
        if kernels == "fused":
            return jk.conv_max_pool(x, k, b, (0, 0), (2, 2), jax.nn.relu)
        y = jax.lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        from flax import nnx

        return nnx.max_pool(jax.nn.relu(y + b), (2, 2), (2, 2))

    xj, kj = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(w.transpose(2, 3, 1, 0))
    _, vjp = jax.vjp(f, xj, kj, jnp.asarray(b))
    dx, dk, db = vjp(jnp.asarray(dy.transpose(0, 2, 3, 1)))
    for got, expected in zip((np.asarray(dx).transpose(0, 3, 1, 2),
                              np.asarray(dk).transpose(3, 2, 0, 1), db), want, strict=True):
        _close(got, expected)


def test_torch_fused_sends_tied_gradients_where_its_max_pool_does() -> None:
    (x, w, b, dy), want = _tied_problem()
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    tk.conv_max_pool(xt, wt, bt, (0, 0), (2, 2), F.relu).backward(torch.from_numpy(dy))
    for got, expected in zip((xt.grad, wt.grad, bt.grad), want, strict=True):
        _close(got.numpy(), expected)


def test_kernels_choice() -> None:
    """auto is the measured-faster choice per framework and backend (JAX: fused on XLA:CPU,
    stock elsewhere; torch: stock); an unknown name is one ValueError naming the choices."""
    want = "fused" if jax.default_backend() == "cpu" else "stock"
    assert lenet_jax.build("lenet5").kernels == want
    assert lenet_torch.build("lenet5").kernels == "stock"
    for pkg in (lenet_jax, lenet_torch):
        assert pkg.build("lenet5", kernels="stock").kernels == "stock"
        assert pkg.build("lenet5", kernels="fused").kernels == "fused"
        with pytest.raises(ValueError, match="unknown kernels 'fast'; expected one of auto"):
            pkg.build("lenet5", kernels="fast")


@pytest.mark.parametrize("seed", fast_only(range(4), 1))
def test_jax_fused_pool_gradient_survives_jit(seed: int) -> None:
    """A max-pool fed by batch_norm: under jit XLA recomputes the batch_norm for the backward
    pass with another rounding, so a backward that compared values with the forward's maximum
    found none and dropped the window's gradient (1e-2 off, measured); the fused pool routes by
    the phase its forward pass recorded, and jitted gradients equal the eager ones (within TOL)."""
    from flax import nnx

    from lenet_jax.loss import loss_fn
    from lenet_spec import BatchNorm, Conv, Flatten, Linear, MaxPool, Spec

    spec = Spec("pool_after_bn", (2, 11, 18),
                (Conv(1, (2, 2), stride=(2, 1), bias=False), BatchNorm(), MaxPool(3), Flatten(),
                 Linear(3)))
    net = lenet_jax.build(spec, seed, kernels="fused")
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((64, 11, 18, 2)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 64))
    loss = loss_fn("ce")

    def f(m):
        return loss(m(x), y)

    eager, jitted = nnx.grad(f)(net), nnx.jit(nnx.grad(f))(net)
    for got, want in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
        _close(got, want)
