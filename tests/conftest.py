"""Shared helpers: random valid specs, layout conversion, framework adapters."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from lenet_spec import AvgPool, Conv, Flatten, Linear, MaxPool, ReLU, Sigmoid, Spec, Tanh

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


NEAR_KINK = 1e-5
"""Where a network is not differentiable, two correct float32 implementations may take either
side: a max-pool window whose two largest inputs differ, but by at most this fraction of the
largest magnitude of the layer's input; a ReLU input within this fraction of zero. The ports
agree on a layer's outputs to ~1e-7 of its scale and on the logits to 1e-5; a kink taken
differently routes a gradient elsewhere, and the trajectory jumps (measured: cifar10_cnn, SGD,
step 12 of 20: 1e-4 in conv2.weight, torch against itself with oneDNN off alike; lenet5, Adam:
6.5e-3 after a ReLU input near zero). Exact ties and exact zeros (ReLU's zeros, MNIST's
background) are not near: both ports send a max's gradient to the first maximum and give ReLU
a zero gradient at 0."""


def near_kinks(spec: Spec, net, x: np.ndarray) -> np.ndarray:
    """Per image of NCHW ``x``: whether any max-pool window or ReLU of the torch ``net`` (at its
    current weights) is near a kink (see :data:`NEAR_KINK`)."""
    import torch

    from lenet_torch.model import layer_outputs

    with torch.no_grad():
        outputs = [o.numpy() for o in layer_outputs(net, torch.from_numpy(x))]
    found = np.zeros(len(x), bool)
    for i, layer in enumerate(spec.layers):
        if not isinstance(layer, (MaxPool, ReLU)):
            continue
        inp = x if i == 0 else outputs[i - 1]
        scale = np.abs(inp).reshape(len(x), -1).max(axis=1)
        if isinstance(layer, ReLU):
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
    ``net``'s current weights (replaced by further draws; the same batch when there is none)."""
    xs, ys, kept, attempt = [], [], 0, 0
    while kept < n:
        x, y = random_batch(spec, n, seed if attempt == 0 else [seed, attempt])
        ok = ~near_kinks(spec, net, x)
        xs.append(x[ok])
        ys.append(y[ok])
        kept += int(ok.sum())
        attempt += 1
        assert attempt <= 20, f"{spec.name}: most images are near a kink"
    return np.concatenate(xs)[:n], np.concatenate(ys)[:n]


@st.composite
def specs(draw: st.DrawFn, max_blocks: int = 2) -> Spec:
    """Valid specs: conv blocks (any stride, padding, activation, pooling), flatten, MLP head."""
    input_shape = c, h, w = (draw(st.integers(1, 3)), draw(st.integers(6, 20)),
                             draw(st.integers(6, 20)))
    layers: list = []
    for _ in range(draw(st.integers(0, max_blocks))):
        kh, kw = draw(st.integers(1, min(5, h))), draw(st.integers(1, min(5, w)))
        sh, sw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
        c = draw(st.integers(1, 6))
        layers.append(Conv(c, (kh, kw), (sh, sw), (ph, pw)))
        h, w = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        act = draw(st.sampled_from([None, ReLU, Tanh, Sigmoid]))
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
        layers.append(Linear(draw(st.integers(1, 24))))
        layers.append(draw(st.sampled_from([ReLU, Tanh, Sigmoid]))())
    layers.append(Linear(draw(st.integers(2, 10))))
    return Spec("random", input_shape, tuple(layers))


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


def twin_nets(spec: Spec, seed: int = 0, kernels: tuple[str, str] = ("auto", "auto")):
    """A torch net and a JAX net holding the same weights (torch's, copied into JAX), built
    with ``kernels`` (torch's, JAX's)."""
    import lenet_jax
    import lenet_torch

    t = lenet_torch.build(spec, seed, kernels=kernels[0])
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
    return lenet_jax.get_weights(holder)


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
