"""The parity battery's pieces, shared by ``python -m lenet_parity`` and the tests: the
tolerances, random batches kept clear of kinks, layout conversion, losses and gradients in
each framework, and the gaps between two canonical states.

Frameworks are imported inside the functions, so that importing this module stays cheap.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np

from lenet_spec import (
    ELU,
    AdaptiveMaxPool,
    Dropout,
    Dropout2d,
    LeakyReLU,
    MaxPool,
    ReLU,
    Spec,
    adaptive_windows,
)
from lenet_train.options import loss_on_logits

LOGIT_TOL = 1e-5
"""Max |Δ| of logits (and of any layer's output, relative to max(1, max |output|))."""
GRAD_TOL = 1e-5
"""Max |Δ| of a gradient, relative to that gradient's max |g|."""
GRAD_FLOOR = 1.2e-7
"""An absolute floor added to :data:`GRAD_TOL` for specs the tests did not choose: a gradient
that is a cancelling batch mean (a bias of a 2-class head, say) can be ~1e-3 while its
per-example terms are O(1), and float32 resolves such a sum only to ~2^-23 ≈ 1.2e-7."""
LOSS_TOL = 1e-5
"""|Δ| of a loss, relative to max(1, |loss|)."""
TRAJ_LOSS_TOL = 1e-4
"""|Δ| of each step's loss along a trajectory, relative."""
TRAJ_PARAM_TOL = 1e-4
"""Max |Δ| of every parameter after a 20-step trajectory."""
STATS_TOL = 1e-5
"""batch_norm's running statistics, relative to each tensor's max |value|."""

SGD = dict(name="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4)
"""The trajectories' optimizer."""

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


def nhwc(x: np.ndarray) -> np.ndarray:
    """NCHW -> NHWC (the one layout difference between the ports' inputs)."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def random_batch(spec: Spec, n: int, seed: int | list[int] = 0) -> tuple[np.ndarray, np.ndarray]:
    """A standard-normal NCHW float32 batch and integer labels for ``spec``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, n).astype(np.int64)
    return x, y


def _kinked(layer: Any) -> bool:
    """Activations whose slope jumps at 0: ReLU, leaky_relu, and elu unless alpha is 1."""
    return isinstance(layer, (ReLU, LeakyReLU)) or (isinstance(layer, ELU) and layer.alpha != 1)


def near_kinks(spec: Spec, net: Any, x: np.ndarray) -> np.ndarray:
    """Per image of NCHW ``x``: whether any max-pool window or kinked activation of the torch
    ``net`` (at its current weights, in its mode, on a copy so that batch_norm's running
    statistics are left alone) is near a kink (see :data:`NEAR_KINK`)."""
    # frameworks load on first use: the spec tests import this module without them
    import torch

    from lenet_torch.model import layer_outputs

    with torch.no_grad():
        outputs = [o.numpy() for o in layer_outputs(copy.deepcopy(net), torch.from_numpy(x))]
    found = np.zeros(len(x), bool)
    for i, layer in enumerate(spec.layers):
        if not (isinstance(layer, (MaxPool, AdaptiveMaxPool)) or _kinked(layer)):
            continue
        inp = x if i == 0 else outputs[i - 1]
        scale = np.abs(inp).reshape(len(x), -1).max(axis=1)
        if _kinked(layer):
            flat = inp.reshape(len(x), -1)
            found |= ((flat != 0) & (np.abs(flat) <= NEAR_KINK * scale[:, None])).any(axis=1)
            continue
        for top2 in _window_top2(layer, inp):  # (N, C, the windows' top two values)
            gap = top2[..., 1] - top2[..., 0]
            found |= ((gap > 0) & (gap <= NEAR_KINK * scale[:, None, None])).any(axis=(1, 2))
    return found


def _window_top2(layer: Any, inp: np.ndarray) -> list[np.ndarray]:
    """The two largest values of each of a max-pool's windows over NCHW ``inp``, as arrays
    (N, C, windows, 2) (one per window size)."""
    if isinstance(layer, AdaptiveMaxPool):
        (oh, ow), (h, w) = layer.output_size, inp.shape[2:]
        tops = []
        for r0, r1 in adaptive_windows(h, oh):
            for c0, c1 in adaptive_windows(w, ow):
                win = inp[:, :, r0:r1, c0:c1].reshape(*inp.shape[:2], 1, -1)
                tops.append(np.sort(win, axis=-1)[..., -2:] if win.shape[-1] > 1 else
                            np.concatenate([win, win], axis=-1))
        return tops
    (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
    ho, wo = (inp.shape[2] - kh) // sh + 1, (inp.shape[3] - kw) // sw + 1
    windows = np.lib.stride_tricks.sliding_window_view(inp, (kh, kw), axis=(2, 3))
    windows = windows[:, :, : (ho - 1) * sh + 1 : sh, : (wo - 1) * sw + 1 : sw]
    windows = windows.reshape(*inp.shape[:2], ho * wo, kh * kw)
    return [np.sort(windows, axis=-1)[..., -2:]]


class NoClearBatch(RuntimeError):
    """No batch clear of kinks could be drawn for a spec."""


def clear_batch(spec: Spec, net: Any, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
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
        if attempt > 20:
            raise NoClearBatch(f"{spec.name}: most images are near a kink")
    x, y = np.concatenate(xs)[:n], np.concatenate(ys)[:n]
    for _ in range(50):
        bad = np.flatnonzero(near_kinks(spec, net, x))
        if not len(bad):
            return x, y
        fresh_x, fresh_y = random_batch(spec, len(bad), [seed, attempt])
        x[bad], y[bad] = fresh_x, fresh_y
        attempt += 1
    raise NoClearBatch(f"{spec.name}: no batch of {n} clear of kinks in 50 tries")


def without_dropout(spec: Spec) -> Spec:
    """``spec`` with every dropout at p = 0 (the identity): two frameworks cannot draw the same
    masks inside their compiled steps, so gradients and trajectories are compared without them
    (dropout's own parity is tested with one mask given to both, tests/test_layers.py)."""
    layers = tuple(dataclasses.replace(layer, p=0.0) if isinstance(layer, (Dropout, Dropout2d))
                   else layer for layer in spec.layers)
    return dataclasses.replace(spec, layers=layers)


def buffers_gap(a: dict[str, np.ndarray], b: dict[str, np.ndarray], spec: Spec) -> float:
    """The largest gap between two canonical states' float buffers (running statistics),
    relative to each tensor's largest magnitude; infinite when their batch counts differ."""
    gap = 0.0
    for name in spec.buffer_shapes:
        if name.endswith("num_batches_tracked"):
            if int(a[name]) != int(b[name]):
                return float("inf")
            continue
        gap = max(gap, float(np.abs(a[name] - b[name]).max()
                             / max(float(np.abs(b[name]).max()), 1e-30)))
    return gap


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """The largest |Δ| over tensors of the same names."""
    if a.keys() != b.keys():
        raise KeyError(f"different tensors: {sorted(set(a) ^ set(b))}")
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def busy_batch_norms(net: Any, seed: int = 0) -> None:
    """Give the torch ``net``'s batch_norm layers state that tests their conversion: scale
    U(0.5, 1.5), shift N(0, 0.1), running mean N(0, 0.5), running variance U(0.5, 2), 7
    batches tracked (a fresh layer's 1s and 0s would hide a swapped or ignored tensor)."""
    # frameworks load on first use: the spec tests import this module without them
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


def torch_logits(net: Any, x: np.ndarray) -> np.ndarray:
    # frameworks load on first use: the spec tests import this module without them
    import torch

    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def jax_logits(net: Any, x: np.ndarray) -> np.ndarray:
    # frameworks load on first use: the spec tests import this module without them
    import jax.numpy as jnp

    return np.asarray(net(jnp.asarray(nhwc(x))))


def torch_loss_and_grads(net: Any, x: np.ndarray, y: np.ndarray,
                         loss: str) -> tuple[float, dict[str, np.ndarray]]:
    """Loss value and canonical gradients of ``loss`` on (x, y), by torch autograd."""
    # frameworks load on first use: the spec tests import this module without them
    import torch

    from lenet_torch.loss import loss_fn

    net.zero_grad()
    value = loss_fn(loss)(net(torch.from_numpy(x), logits=loss_on_logits(loss)),
                          torch.from_numpy(y))
    value.backward()
    grads = {k: p.grad.numpy().copy() for k, p in net.named_parameters()}
    return value.item(), grads


def jax_canonical(net: Any, state: Any) -> dict[str, np.ndarray]:
    """A parameter-shaped nnx.State (gradients, say) in canonical names and layouts."""
    # frameworks load on first use: the spec tests import this module without them
    from flax import nnx

    import lenet_jax

    holder = nnx.clone(net)
    nnx.update(holder, state)
    weights = lenet_jax.get_weights(holder)
    return {k: weights[k] for k in net.spec.param_shapes}


def jax_loss_and_grads(net: Any, x: np.ndarray, y: np.ndarray,
                       loss: str) -> tuple[float, dict[str, np.ndarray]]:
    """Loss value and canonical gradients of ``loss`` on (x, y), by jax.grad."""
    # frameworks load on first use: the spec tests import this module without them
    import jax.numpy as jnp
    from flax import nnx

    from lenet_jax.loss import loss_fn

    def f(model: Any) -> Any:
        return loss_fn(loss)(model(jnp.asarray(nhwc(x)), logits=loss_on_logits(loss)),
                             jnp.asarray(y))

    value, grads = nnx.value_and_grad(f)(net)
    return float(value), jax_canonical(net, grads)


def trajectories(spec: Spec, t: Any, j: Any, opt: dict[str, Any], steps: int = 20,
                 batch: int = 16, first_seed: int = 100, loss: str = "ce",
                 say: Any = None, record: list | None = None,
                 replay: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` optimizer steps (``opt``: make_optimizer's arguments) of the torch net ``t``
    and the JAX net ``j`` (in training mode, dropout off) on the same batches, each by the
    train step its training program runs (``lenet_torch.trainer.make_step`` eagerly,
    ``lenet_jax.trainer.make_step`` jitted), batch k drawn from seed ``first_seed + k`` clear of
    kinks under ``t``'s weights; the per-step losses of each. The nets end at their trained
    weights. The batches are appended to ``record``; ``replay`` gives them instead (cast to
    the nets' precision: a float64 run of the same steps)."""
    # frameworks load on first use: the spec tests import this module without them
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from lenet_jax.loss import loss_fn as jax_loss_fn
    from lenet_jax.optim import make_tx
    from lenet_jax.trainer import make_step as jax_make_step
    from lenet_jax.trainer import split_for_training
    from lenet_torch.loss import loss_fn as torch_loss_fn
    from lenet_torch.optim import make_optimizer as torch_optimizer
    from lenet_torch.trainer import make_step as torch_make_step

    on_logits = loss_on_logits(loss)
    t_step = torch_make_step(t, torch_optimizer(t, **opt), torch_loss_fn(loss), on_logits)
    tx = make_tx(**opt)
    graphdef, _, params, stats, rest = split_for_training(j)
    j_step = jax.jit(jax_make_step(graphdef, tx, jax_loss_fn(loss), on_logits))
    state = (params, stats, tx.init(params))
    every = jnp.arange(batch, dtype=jnp.int32)  # the step indexes its data: all of it here
    losses_t, losses_j = [], []
    for step in range(steps):
        if replay is not None:
            x, y = replay[step]
            x = x.astype(next(t.parameters()).detach().numpy().dtype)
        else:
            x, y = clear_batch(spec, t, batch, first_seed + step)
        if record is not None:
            record.append((x, y))
        value, _ = t_step(torch.from_numpy(x), torch.from_numpy(y), opt["lr"])
        losses_t.append(value.item())
        state, value, _ = j_step(state, rest, jnp.asarray(nhwc(x)), jnp.asarray(y),
                                 every[: len(y)], np.int32(step), np.uint32(0),
                                 np.float32(1))  # the tx holds the learning rate
        losses_j.append(float(value))
        if say is not None:
            say(f"trajectory step {step + 1}/{steps}")
    nnx.update(j, state[0], state[1])
    return np.array(losses_t), np.array(losses_j)
