"""Shared helpers: random valid specs, layout conversion, framework adapters."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st

from lenet_spec import (
    ELU,
    GELU,
    AvgPool,
    BatchNorm,
    Conv,
    Flatten,
    LeakyReLU,
    Linear,
    MaxPool,
    ReLU,
    Sigmoid,
    SiLU,
    Spec,
    Tanh,
)

# Programs the tests start keep their caches (JAX's compiled programs) in one folder of this
# session's, shared by the tests and removed at the end, never the user's ~/.cache.
_CACHE = tempfile.mkdtemp(prefix="lenet-tests-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_CACHE, ignore_errors=True)


settings.register_profile(
    "lenet", deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False
)
settings.load_profile("lenet")


def nhwc(x: np.ndarray) -> np.ndarray:
    """NCHW -> NHWC (the one layout difference between the ports' inputs)."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def random_batch(spec: Spec, n: int, seed: int | list[int] = 0) -> tuple[np.ndarray, np.ndarray]:
    """A standard-normal NCHW float32 batch and integer labels for ``spec``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, n).astype(np.int64)
    return x, y


NEAR_KINK = 1e-6
"""Where a network is not differentiable, two correct float32 implementations may take either
side: a max-pool window whose two largest inputs differ, but by at most this fraction of the
largest magnitude of the layer's input; an input of a ReLU (leaky_relu, elu with alpha ≠ 1)
within this fraction of zero. The ports agree on a layer's outputs to ~1e-7 of its scale, so
this margin is ten times that; a kink taken differently routes a gradient elsewhere, and the
trajectory jumps (measured: cifar10_cnn, SGD, step 12 of 20: 1e-4 in conv2.weight, torch
against itself with oneDNN off alike; lenet5, Adam: 6.5e-3 after a ReLU input near zero). A
larger margin cannot be kept with batch_norm, which centres ReLU inputs on zero: at 1e-5 a
batch of 16 for lenet5_bn holds about 3 near-kinks. Exact ties and exact zeros (ReLU's zeros,
MNIST's background) are not near: both ports send a max's gradient to the first maximum and
give ReLU a zero gradient at 0."""


def _kinked(layer) -> bool:
    """Activations whose slope jumps at 0: ReLU, leaky_relu, and elu unless alpha is 1."""
    return isinstance(layer, (ReLU, LeakyReLU)) or (isinstance(layer, ELU) and layer.alpha != 1)


def near_kinks(spec: Spec, net, x: np.ndarray) -> np.ndarray:
    """Per image of NCHW ``x``: whether any max-pool window or kinked activation of the torch
    ``net`` (at its current weights, in its mode, on a copy so that batch_norm's running
    statistics are left alone) is near a kink (see :data:`NEAR_KINK`)."""
    import copy

    import torch

    from lenet_torch.model import layer_outputs

    with torch.no_grad():
        outputs = [o.numpy() for o in layer_outputs(copy.deepcopy(net), torch.from_numpy(x))]
    found = np.zeros(len(x), bool)
    for i, layer in enumerate(spec.layers):
        if not (isinstance(layer, MaxPool) or _kinked(layer)):
            continue
        inp = x if i == 0 else outputs[i - 1]
        scale = np.abs(inp).reshape(len(x), -1).max(axis=1)
        if not isinstance(layer, MaxPool):
            flat = inp.reshape(len(x), -1)
            found |= ((flat != 0) & (np.abs(flat) <= NEAR_KINK * scale[:, None])).any(axis=1)
            continue
        (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
        ho, wo = (inp.shape[2] - kh) // sh + 1, (inp.shape[3] - kw) // sw + 1
        windows = np.lib.stride_tricks.sliding_window_view(inp, (kh, kw), axis=(2, 3))
        windows = windows[:, :, : (ho - 1) * sh + 1 : sh, : (wo - 1) * sw + 1 : sw]
        top2 = np.sort(windows.reshape(*windows.shape[:4], -1), axis=-1)[..., -2:]
        gap = top2[..., 1] - top2[..., 0]
        found |= ((gap > 0) & (gap <= NEAR_KINK * scale[:, None, None, None])).any(axis=(1, 2, 3))
    return found


def clear_batch(spec: Spec, net, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`random_batch` without the images near a kink (:data:`NEAR_KINK`) under the torch
    ``net``'s current weights (replaced by further draws; the same batch when there is none).

    batch_norm in training couples a batch's images (its statistics are theirs), so the batch
    is judged again as a whole after each replacement, until none of its images is near one."""
    xs, ys, kept, attempt = [], [], 0, 0
    while kept < n:
        x, y = random_batch(spec, n, seed if attempt == 0 else [seed, attempt])
        ok = ~near_kinks(spec, net, x)
        xs.append(x[ok])
        ys.append(y[ok])
        kept += int(ok.sum())
        attempt += 1
        assert attempt <= 20, f"{spec.name}: most images are near a kink"
    x, y = np.concatenate(xs)[:n], np.concatenate(ys)[:n]
    for _ in range(50):
        bad = np.flatnonzero(near_kinks(spec, net, x))
        if not len(bad):
            return x, y
        fresh_x, fresh_y = random_batch(spec, len(bad), [seed, attempt])
        x[bad], y[bad] = fresh_x, fresh_y
        attempt += 1
    raise AssertionError(f"{spec.name}: no batch of {n} clear of kinks in 50 tries")


REDUNDANT_BIAS = """A bias right before a batch_norm changes nothing (batch_norm subtracts the
channel's mean), so its exact gradient is 0 and its float32 gradient rounding noise, which Adam
divides by its own size into steps of ~lr: the bias, and the running mean with it, wander
differently in any two implementations (torch against itself with oneDNN off: 3.4e-5 in the
parameters, 9.6e-5 in the running statistics after 20 Adam steps). Random specs, like
lenet5_bn and torchvision's models, leave it out."""

SCALE_BEFORE_NORM = """A weight with few inputs per output feeding a batch_norm is nearly a pure
scale of its channel, which the normalisation undoes: its gradient is then mostly the remainder
of terms that cancel, resolved by float32 only to ~1e-8 of their sum, not to 1e-5 of the result.
Hypothesis found two: conv1 1×1 on one channel (weight −0.0075), a depthwise conv, a batch_norm
of channel variance 3.4e-5 — that weight's gradient 0.362 came out 3.9e-7 (torch) and 5.0e-6
(JAX, autodiff through the variance; 2.4e-7 with torch's closed form, which the JAX port now
uses) from float64; and a 2→2 linear layer before a batch_norm of 16 values, 9.1e-6 apart on
a gradient of 0.19. Random specs with a batch_norm draw conv and linear layers of fan-in ≥ 4."""

ACTIVATIONS = [ReLU, Tanh, Sigmoid, GELU, lambda: GELU("tanh"), lambda: LeakyReLU(0.1),
               lambda: ELU(0.5), SiLU]
"""Every activation of the spec, GELU in both forms, leaky_relu and elu off their defaults."""


@st.composite
def specs(draw: st.DrawFn, max_blocks: int = 2, batch_norm: bool = True) -> Spec:
    """Valid specs: conv blocks (any stride, padding, dilation, groups, bias or not, optionally
    batch_norm, any activation, pooling), flatten, an MLP head (bias or not, batch_norm)."""
    input_shape = c, h, w = (draw(st.integers(1, 3)), draw(st.integers(6, 20)),
                             draw(st.integers(6, 20)))
    layers: list = []
    for _ in range(draw(st.integers(0, max_blocks))):
        dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        kh = draw(st.integers(1, max(1, min(5, (h - 1) // dh + 1))))
        kw = draw(st.integers(1, max(1, min(5, (w - 1) // dw + 1))))
        sh, sw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
        groups = draw(st.sampled_from([g for g in (1, 2, 3) if c % g == 0]))
        c = groups * draw(st.integers(1, 3))
        norm = batch_norm and draw(st.booleans())
        layers.append(Conv(c, (kh, kw), (sh, sw), (ph, pw), (dh, dw), groups,
                           not norm and draw(st.booleans())))
        h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if norm:  # after a bias-free layer: see REDUNDANT_BIAS
            layers.append(BatchNorm(draw(st.sampled_from([0.1, 0.3])), affine=draw(st.booleans())))
        act = draw(st.sampled_from([None, *ACTIVATIONS]))
        if act:
            layers.append(act())
        pool = draw(st.sampled_from([None, MaxPool, AvgPool]))
        if pool and h >= 2 and w >= 2:
            k = draw(st.integers(2, min(3, h, w)))
            s = draw(st.sampled_from([None, 1, 2]))
            layers.append(pool(k, s))
            s = s or k
            h, w = (h - k) // s + 1, (w - k) // s + 1
    layers.append(Flatten())
    for _ in range(draw(st.integers(0, 2))):
        norm = batch_norm and draw(st.booleans())
        layers.append(Linear(draw(st.integers(1, 24)), not norm and draw(st.booleans())))
        if norm:
            layers.append(BatchNorm())
        layers.append(draw(st.sampled_from(ACTIVATIONS))())
    layers.append(Linear(draw(st.integers(2, 10))))
    spec = Spec("random", input_shape, tuple(layers))
    assume(not any(isinstance(layer, BatchNorm) for layer in spec.layers) or all(
        info.fan_in >= 4 for info in spec.infos if isinstance(info.layer, (Conv, Linear))))
    return spec  # SCALE_BEFORE_NORM


@pytest.fixture(scope="session")
def mnist_dir() -> str:
    """The real MNIST IDX files, from $LENET_DATA_DIR; skips where absent."""
    path = os.environ.get("LENET_DATA_DIR")
    if not path or not os.path.isdir(path):
        pytest.skip("real MNIST not available: set LENET_DATA_DIR to the folder of its IDX files")
    return path


# ----------------------------------------------------------------------------- both ports
# Imported lazily so that the spec tests run without either framework.


KERNEL_PAIRS = [("stock", "stock"), ("fused", "fused"), ("stock", "fused"), ("fused", "stock")]
"""(torch, JAX) kernels: the parity battery holds for each pairing, across frameworks too."""


def without_dropout(spec: Spec) -> Spec:
    """``spec`` with every dropout at p = 0 (the identity): two frameworks cannot draw the same
    masks inside their compiled steps, so trajectories are compared without them (dropout's own
    parity is tested with one mask given to both, tests/test_layers.py)."""
    import dataclasses

    from lenet_spec import Dropout, Dropout2d

    layers = tuple(dataclasses.replace(layer, p=0.0) if isinstance(layer, (Dropout, Dropout2d))
                   else layer for layer in spec.layers)
    return Spec(spec.name, spec.input_shape, layers)


def buffers_gap(a: dict[str, np.ndarray], b: dict[str, np.ndarray], spec: Spec) -> float:
    """The largest gap between two canonical states' float buffers (running statistics),
    relative to each tensor's largest magnitude; batch counts must be equal."""
    gap = 0.0
    for name in spec.buffer_shapes:
        if name.endswith("num_batches_tracked"):
            assert a[name] == b[name], name
            continue
        gap = max(gap, float(np.abs(a[name] - b[name]).max() / np.abs(b[name]).max()))
    return gap


def busy_batch_norms(net, seed: int = 0) -> None:
    """Give the torch ``net``'s batch_norm layers state that tests their conversion: scale
    U(0.5, 1.5), shift N(0, 0.1), running mean N(0, 0.5), running variance U(0.5, 2), 7
    batches tracked (a fresh layer's 1s and 0s would hide a swapped or ignored tensor)."""
    import torch

    rng = np.random.default_rng(seed + 1000)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                if module.affine:
                    module.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, c)))
                    module.bias.copy_(torch.from_numpy(rng.normal(0, 0.1, c)))
                module.running_mean.copy_(torch.from_numpy(rng.normal(0, 0.5, c)))
                module.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, c)))
                module.num_batches_tracked.fill_(7)


def twin_nets(spec: Spec, seed: int = 0, kernels: tuple[str, str] = ("auto", "auto")):
    """A torch net and a JAX net holding the same weights (torch's, copied into JAX), built
    with ``kernels`` (torch's, JAX's)."""
    import lenet_jax
    import lenet_torch

    t = lenet_torch.build(spec, seed, kernels=kernels[0])
    busy_batch_norms(t, seed)
    j = lenet_jax.build(spec, seed + 1, kernels=kernels[1])
    lenet_jax.set_weights(j, lenet_torch.get_weights(t))
    return t, j


def torch_logits(net, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def jax_logits(net, x: np.ndarray) -> np.ndarray:
    import jax.numpy as jnp

    return np.asarray(net(jnp.asarray(nhwc(x))))


def torch_loss_and_grads(net, x: np.ndarray, y: np.ndarray, loss: str):
    """Loss value and canonical gradients of ``loss`` on (x, y), by torch autograd."""
    import torch

    from lenet_torch.loss import loss_fn

    net.zero_grad()
    value = loss_fn(loss)(net(torch.from_numpy(x)), torch.from_numpy(y))
    value.backward()
    grads = {k: p.grad.numpy().copy() for k, p in net.named_parameters()}
    return value.item(), grads


def jax_canonical(net, state) -> dict[str, np.ndarray]:
    """A parameter-shaped nnx.State (gradients, say) in canonical names and layouts."""
    from flax import nnx

    import lenet_jax

    holder = nnx.clone(net)
    nnx.update(holder, state)
    weights = lenet_jax.get_weights(holder)
    return {k: weights[k] for k in net.spec.param_shapes}


def jax_loss_and_grads(net, x: np.ndarray, y: np.ndarray, loss: str):
    """Loss value and canonical gradients of ``loss`` on (x, y), by jax.grad."""
    import jax.numpy as jnp
    from flax import nnx

    from lenet_jax.loss import loss_fn

    def f(model):
        return loss_fn(loss)(model(jnp.asarray(nhwc(x))), jnp.asarray(y))

    value, grads = nnx.value_and_grad(f)(net)
    return float(value), jax_canonical(net, grads)


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
