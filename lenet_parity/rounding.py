"""Parity below float32: each port computing at a lower precision (bfloat16, tf32) against the
float64 reference (the torch port in float64), within bounds derived from the formats' unit
roundoff and the network's depth.

**Logits** (:func:`forward_bound`): a probabilistic running error analysis (Higham and Mary,
"A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019), element
by element, to first order in the unit roundoffs. Each rounding multiplies a value by
(1 + δ), |δ| ≤ u, the δ independent with mean zero; an output's error is then a weighted sum
of bounded independent terms, sub-Gaussian with variance proxy σ² = Σ (weight·u)², and
Hoeffding's inequality gives P(|error| ≥ λσ) ≤ 2·exp(−λ²/2). (A worst-case bound, which adds
every term's magnitude through |W| at each layer, measured 300 to 2,800 times the logits
themselves: no test at all.) Walking the layers in float64 with the exact activations ``a``
and the variance proxy ``v`` of each element's error:

- conv and linear: input and weights rounded to the operand format (``u_in`` each), the exact
  products summed in float32 (K·u₃₂·Σ|w·a| for K terms, taken as a worst case), the result and
  a separately added bias rounded to the storage format (``u_out`` each):
  ``v' = W²·v + 2·u_in²·W²·a² + u_in²·b² + (K·u₃₂·(|W|·|a| + |b|))² + u_out²·((y − b)² + y²)``;
- ReLU: exact; ``v' = v`` where the input is above −:data:`NEAR`·√v (either side of 0 may be
  computed), else 0 (the output is an exact 0);
- other activations: ``v' = L²·v + u_out²·y²`` (+ 4·u₃₂ for a transcendental evaluated in
  float32), L the activation's Lipschitz constant;
- max-pool: the window's largest input variance (the maximum's error is its argument's);
  avg-pool: the window's mean variance plus ((k + 1)·u_out·mean|a|)² (k terms summed in the
  storage format, one division, as a worst case);
- batch_norm, computed in float32 and rounded once: ``(γ/σ)²·v + u_out²·y²``, in training also
  through the batch mean's and standard deviation's errors and their float32 sums over n values
  per channel (n·u₃₂, worst case);
- scale: ``s²·v + 2·u_out²·((s·a)² + t²)``; flatten and identity dropout: nothing.

The bound on each logit is λ·σ × :data:`SECOND_ORDER` (the neglected products of two
roundings), λ from the number of logits compared (:func:`sigmas_for`). Measured on the five
presets (two seeds, both modes, torch and both JAX kernels, 16 images): the largest error was
1.33 σ at bfloat16.

**Gradients and trajectories** are compared normwise, against the magnitude of the terms each
gradient sums (:func:`abs_gradients`: Σ|δ|·|a| for a weight, where the gradient is Σ δ·a),
since a gradient that is a cancelling sum has a relative error no bound on its own norm can
hold (a conv bias's, measured up to 31% at bfloat16). Each of the D layers that sum (conv,
linear, and batch_norm, whose statistics and backward pass are sums over the batch) rounds,
forward and again backward, at most its two operands and its result, ``2·u_in + u_out``
relative to the magnitude of the terms; the gradient of any parameter is a product of errors
that passed through at most D layers forward and D backward, so ``‖ĝ − g‖ ≤ 2·D·(2·u_in +
u_out)·‖Σ|δ|·|a|‖`` (:func:`gradient_bound`), ReLU and max-pool decisions that flip within the
forward error included (they flip only where an input is within its error of the kink). This
is a first-order model, not a worst-case theorem; the measured shares are stated where it is
used. A trajectory of plain SGD moves each parameter by ``−lr·Σ g``; its error is within the
gradients' bound times ``lr·Σ‖Σ|δ|·|a|‖`` over the steps, plus one float32 rounding of the
master weights per step (first order in the step count: the trajectories are short).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from lenet_kernels.precision import UNIT_ROUNDOFF, check_precision
from lenet_spec import (
    ELU,
    GELU,
    AdaptiveAvgPool,
    AdaptiveMaxPool,
    AvgPool,
    BatchNorm,
    Conv,
    Dropout,
    Dropout2d,
    Flatten,
    LeakyReLU,
    Linear,
    MaxPool,
    ReLU,
    Scale,
    Sigmoid,
    SiLU,
    Spec,
    Tanh,
    adaptive_windows,
)

U32 = UNIT_ROUNDOFF["float32"]
SECOND_ORDER = 1.1
"""The first-order bounds × this: the terms of second order in the unit roundoff."""

NEAR = 8.0
"""A ReLU input within this many of its error's scales of 0 may be computed on either side:
its error passes on; further below 0, the ReLU's output is an exact 0."""

LIPSCHITZ = {ReLU: 1.0, Tanh: 1.0, Sigmoid: 0.25, GELU: 1.13, SiLU: 1.1}
"""The largest |f'| of each smooth or piecewise-linear activation (GELU's 1.129 at x ≈ 2.4,
SiLU's 1.0998 at x ≈ 2.4); leaky_relu's and elu's follow from their parameter."""


def roundoffs(precision: str) -> tuple[float, float]:
    """(operand, storage) unit roundoffs at ``precision``: what a product's inputs are rounded
    to, and what results are stored in."""
    check_precision(precision)
    if precision == "bfloat16":
        return UNIT_ROUNDOFF["bfloat16"], UNIT_ROUNDOFF["bfloat16"]
    if precision == "tf32":
        return UNIT_ROUNDOFF["tf32"], U32
    return U32, U32


def summing_layers(spec: Spec, end: int | None = None) -> int:
    """D: the layers (of the first ``end``) whose outputs and gradients are sums of many
    rounded terms: conv, linear, and batch_norm (its batch statistics in training)."""
    return sum(isinstance(layer, (Conv, Linear, BatchNorm)) for layer in spec.layers[:end])


def forward_bound(spec: Spec, weights: Mapping[str, np.ndarray], x: np.ndarray,
                  precision: str, train: bool = False,
                  sigmas: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    """(the float64 logits of ``spec`` with ``weights`` on NCHW ``x``, a bound on each logit's
    error when a port computes at ``precision``: ``sigmas`` × its rounding error's standard
    scale), in evaluation mode or, with ``train``, in training mode (batch statistics; dropout
    must be off: :func:`~lenet_parity.battery.without_dropout`)."""
    import torch

    u_in, u_out = roundoffs(precision)
    net = float64_net(spec, weights).train(train)
    a = torch.from_numpy(np.asarray(x, np.float64))
    v = torch.zeros_like(a)
    with torch.no_grad():
        for info in spec.infos[: spec.logits_end]:
            a, v = _layer(net, info, a, v, u_in, u_out, train)
    return a.numpy(), SECOND_ORDER * sigmas * np.sqrt(v.numpy())


def float64_net(spec: Spec, weights: Mapping[str, np.ndarray]) -> Any:
    """The torch port of ``spec`` in float64 holding ``weights`` exactly (float64 values
    stay float64: the reference of a trajectory)."""
    import torch

    from lenet_spec import check_weights
    from lenet_torch.model import build

    check_weights(spec, {k: np.asarray(v, np.float32) if np.asarray(v).dtype.kind == "f"
                         else v for k, v in weights.items()})
    net = build(spec, kernels="stock").double()
    net.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()})
    return net


def sigmas_for(count: int, alpha: float = 1e-6) -> float:
    """λ such that ``count`` errors, each sub-Gaussian with the scale :func:`forward_bound`
    computes, all stay within λ scales with probability ≥ 1 − ``alpha``: Hoeffding's
    P(|S| ≥ λσ) ≤ 2·exp(−λ²/2) for each, and a union over ``count``."""
    return math.sqrt(2 * math.log(2 * count / alpha))


def _layer(net: Any, info: Any, a: Any, v: Any, u_in: float, u_out: float, train: bool):
    """(exact output, its error's variance proxy) of one layer, given its exact input and the
    input's."""
    import torch
    import torch.nn.functional as F

    layer = info.layer
    y = net.apply_layer(layer, a)
    if isinstance(layer, (Conv, Linear)):
        module = getattr(net, layer.name)
        w2 = module.weight.square()
        b = torch.zeros(y.shape[1], dtype=y.dtype) if module.bias is None else module.bias
        if isinstance(layer, Conv):
            def apply(t, weight, bias=None):
                return F.conv2d(t, weight, bias, layer.stride, layer.padding, layer.dilation,
                                layer.groups)
        else:
            def apply(t, weight, bias=None):
                return F.linear(t, weight, bias)
        shape = (1, -1) + (1,) * (y.dim() - 2)
        terms = apply(a.abs(), module.weight.abs(), b.abs())  # Σ|w||a| + |b|
        return y, (apply(v, w2)  # the input's errors, carried by the weights
                   + 2 * u_in**2 * apply(a.square(), w2)  # input and weight rounded
                   + u_in**2 * b.square().reshape(shape)  # bias rounded
                   + (info.fan_in * U32 * terms) ** 2  # the float32 sum (worst case)
                   + u_out**2 * ((y - b.reshape(shape)).square() + y.square()))  # y, + b
    if isinstance(layer, ReLU):  # exact; an error passes where the input may be positive
        return y, torch.where(a > -NEAR * v.sqrt(), v, 0.0)
    if type(layer) in LIPSCHITZ:
        return y, LIPSCHITZ[type(layer)] ** 2 * v + (u_out + 4 * U32) ** 2 * y.square()
    if isinstance(layer, LeakyReLU):
        return y, max(1.0, abs(layer.negative_slope)) ** 2 * v + u_out**2 * y.square()
    if isinstance(layer, ELU):
        return y, max(1.0, abs(layer.alpha)) ** 2 * v + (u_out + 4 * U32) ** 2 * y.square()
    if isinstance(layer, MaxPool):
        return y, F.max_pool2d(v, layer.kernel_size, layer.stride, layer.padding,
                               ceil_mode=layer.ceil_mode)
    if isinstance(layer, AvgPool):
        def mean(t):
            return F.avg_pool2d(t, layer.kernel_size, layer.stride, layer.padding,
                                layer.ceil_mode, layer.count_include_pad)
        k = layer.kernel_size[0] * layer.kernel_size[1]
        return y, mean(v) + ((k + 1) * u_out * mean(a.abs())) ** 2
    if isinstance(layer, AdaptiveMaxPool):
        return y, F.adaptive_max_pool2d(v, layer.output_size)
    if isinstance(layer, AdaptiveAvgPool):
        (_, h, w) = info.in_shape
        k = (max(s1 - s0 for s0, s1 in adaptive_windows(h, layer.output_size[0]))
             * max(s1 - s0 for s0, s1 in adaptive_windows(w, layer.output_size[1])))
        return y, (F.adaptive_avg_pool2d(v, layer.output_size)
                   + ((k + 1) * u_out * F.adaptive_avg_pool2d(a.abs(), layer.output_size)) ** 2)
    if isinstance(layer, BatchNorm):
        return y, _batch_norm(getattr(net, layer.name), a, v, y, u_out, train)
    if isinstance(layer, Scale):
        from lenet_torch.model import _per_channel

        s, t = (torch.as_tensor(_per_channel(value, a)) for value in (layer.scale, layer.shift))
        return y, s.square() * v + 2 * u_out**2 * ((a * s).square() + t.square())
    if isinstance(layer, Flatten):
        return y, torch.flatten(v, 1)
    if isinstance(layer, (Dropout, Dropout2d)):
        if train and layer.p > 0:
            raise ValueError(f"{layer.name}: the bound is for dropout off in training "
                             "(lenet_parity.battery.without_dropout)")
        return y, v
    raise TypeError(f"no rounding bound for layer {layer!r}")


def _batch_norm(module: Any, a: Any, v: Any, y: Any, u_out: float, train: bool) -> Any:
    """The variance proxy of batch_norm's output error (normalised in float32, stored in
    ``u_out``)."""
    import torch

    dims = [0, 2, 3] if a.dim() == 4 else [0]
    shape = (1, -1) + (1,) * (a.dim() - 2)
    gamma = module.weight.reshape(shape) if module.weight is not None else torch.ones(shape)
    beta = module.bias.reshape(shape) if module.bias is not None else torch.zeros(shape)
    if train:
        n = a.numel() // a.shape[1]
        centred = a - a.mean(dims, keepdim=True)
        sd = torch.sqrt(centred.square().mean(dims, keepdim=True) + module.eps)
        # the centred value: its own error and the mean's; the deviation through the variance,
        # Δσ = mean(c·Δc)/σ; the float32 sums over n values per channel (worst case)
        vc = v + v.mean(dims, keepdim=True) / n
        vsd = (centred.square() * v).mean(dims, keepdim=True) / (n * sd.square())
        out = (gamma / sd).square() * vc + (gamma * centred / sd.square()).square() * vsd
        out = out + (n * U32 * gamma / sd * a.abs().mean(dims, keepdim=True)) ** 2
    else:
        centred = a - module.running_mean.reshape(shape)
        sd = torch.sqrt(module.running_var.reshape(shape) + module.eps)
        out = (gamma / sd).square() * v
    return (out + u_out**2 * y.square()
            + (6 * U32 * ((gamma * centred / sd).abs() + beta.abs())) ** 2)


def gradient_bound(spec: Spec, precision: str) -> float:
    """The bound on ‖ĝ − g‖ / ‖g‖ for every parameter's gradient at ``precision`` (the module's
    docstring derives it): 2·D·(2·u_in + u_out), D the :func:`summing_layers`."""
    u_in, u_out = roundoffs(precision)
    return 2 * summing_layers(spec, spec.logits_end) * (2 * u_in + u_out)


def _keep(seen: dict[str, Any], name: str, module: Any, inputs: Any, output: Any) -> None:
    """A forward hook: the layer's input, and its output, which keeps its gradient (δ)."""
    output.retain_grad()
    seen[name] = (inputs[0].detach(), output)


def abs_gradients(spec: Spec, weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray,
                  loss: str = "ce") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the float64 gradients of ``loss`` in training mode, the same sums taken over the
    terms' magnitudes: Σ|δ|·|a| for a weight, Σ|δ| for a bias, Σ|δ|·|x̂| for a batch_norm
    scale), canonical names; dropout must be off."""
    import torch

    from lenet_torch.loss import loss_fn
    from lenet_train.options import loss_on_logits

    net = float64_net(spec, weights).train()
    seen: dict[str, Any] = {}
    hooks = []
    for info in spec.infos:
        if isinstance(info.layer, (Conv, Linear, BatchNorm)):
            module = getattr(net, info.label)
            hooks.append(module.register_forward_hook(partial(_keep, seen, info.label)))
    out = net(torch.from_numpy(np.asarray(x, np.float64)), logits=loss_on_logits(loss))
    loss_fn(loss)(out, torch.from_numpy(y)).backward()
    for h in hooks:
        h.remove()
    seen = {name: (a, out.grad) for name, (a, out) in seen.items()}
    grads = {k: p.grad.numpy().copy() for k, p in net.named_parameters()}
    sums: dict[str, np.ndarray] = {}
    layers = {info.label: info.layer for info in spec.infos}
    with torch.no_grad():
        for name, (a, d) in seen.items():
            layer, module, d = layers[name], getattr(net, name), d.abs()
            dims = [0, 2, 3] if d.dim() == 4 else [0]
            if isinstance(layer, Conv):
                weight = torch.nn.grad.conv2d_weight(a.abs(), module.weight.shape, d,
                                                     layer.stride, layer.padding,
                                                     layer.dilation, layer.groups)
            elif isinstance(layer, Linear):
                weight = d.T @ a.abs()
            else:
                centred = a - a.mean(dims, keepdim=True)
                xhat = centred / torch.sqrt(centred.square().mean(dims, keepdim=True)
                                            + module.eps)
                weight = (d * xhat.abs()).sum(dims)
            if module.weight is not None:
                sums[f"{name}.weight"] = weight.numpy()
            if module.bias is not None:
                sums[f"{name}.bias"] = d.sum(dims).numpy()
    return grads, sums


@dataclass
class Bounded:
    """One comparison below float32: the largest error against the float64 reference as a
    share of its bound (``share`` ≤ 1 passes), and the error itself."""

    check: str
    side: str
    share: float
    error: float
    where: str = ""

    @property
    def ok(self) -> bool:
        return self.share <= 1.0  # NaN is not ok


def precision_battery(spec: Spec, weights: Mapping[str, np.ndarray], precision: str, *,
                      batch: int = 16, seed: int = 0, steps: int = 5, lr: float = 0.05,
                      jax_kernels: str = "auto", alpha: float = 1e-6,
                      progress: Any = None) -> list[Bounded]:
    """Both ports at ``precision`` against the float64 reference on ``spec`` with ``weights``:
    logits in evaluation and training mode (:func:`forward_bound`, λ from
    :func:`sigmas_for` over every logit compared at level ``alpha``), every parameter's
    gradient (:func:`gradient_bound`), and ``steps`` plain-SGD steps at ``lr`` by the
    programs' own train steps (the gradients' bound times lr·Σ‖Σ|terms|‖ per tensor, plus
    the float32 master weights' roundings). Dropout is off throughout."""
    from lenet_parity.battery import random_batch, without_dropout

    say = progress or (lambda what: None)
    spec = without_dropout(spec)
    nets = _nets(spec, weights, precision, jax_kernels)
    x, y = random_batch(spec, batch, seed)
    sigmas = sigmas_for(2 * len(nets) * batch * spec.infos[spec.logits_end - 1].out_shape[0],
                        alpha)
    rows = []
    for train in (False, True):
        say(f"logits, {'training' if train else 'evaluation'} mode")
        ref, bound = forward_bound(spec, weights, x, precision, train, sigmas)
        for side, net in nets.items():
            got = _logits(side, net, x, train)
            ratio = np.abs(got - ref) / bound
            rows.append(Bounded(f"logits, {'training' if train else 'evaluation'} mode "
                                f"(≤ {sigmas:.1f} σ)", side, float(ratio.max()),
                                float(np.abs(got - ref).max())))
    say("gradients")
    grads, sums = abs_gradients(spec, weights, x, y)
    beta = gradient_bound(spec, precision)
    for side, net in nets.items():
        got = _gradients(side, net, x, y)
        shares = {k: np.linalg.norm(got[k] - grads[k]) / (beta * np.linalg.norm(sums[k]))
                  for k in grads}
        worst = max(shares, key=lambda k: shares[k])
        rows.append(Bounded(f"gradients (‖Δ‖ ≤ {beta:.3g}·‖Σ|terms|‖)", side,
                            float(shares[worst]),
                            float(np.linalg.norm(got[worst] - grads[worst])), worst))
    if steps:
        rows += _trajectories(spec, weights, precision, jax_kernels, steps, lr, batch, seed,
                              beta, say)
    return rows


def _nets(spec: Spec, weights: Mapping[str, np.ndarray], precision: str,
          jax_kernels: str) -> dict[str, Any]:
    import lenet_jax
    import lenet_torch

    t = lenet_torch.build(spec, kernels="stock", precision=precision)
    lenet_torch.set_weights(t, weights)
    j = lenet_jax.build(spec, kernels=jax_kernels, precision=precision)
    lenet_jax.set_weights(j, weights)
    return {"torch": t, "jax": j}


def _logits(side: str, net: Any, x: np.ndarray, train: bool) -> np.ndarray:
    from lenet_parity.battery import jax_logits, nhwc

    if side == "torch":
        import torch

        net.train(train)
        with torch.no_grad():
            return net(torch.from_numpy(x), logits=True).numpy().astype(np.float64)
    import jax.numpy as jnp

    if train:
        net.train()
        return np.asarray(net(jnp.asarray(nhwc(x)), logits=True), np.float64)
    net.eval()
    return np.asarray(jax_logits(net, x), np.float64)


def _gradients(side: str, net: Any, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    from lenet_parity.battery import jax_loss_and_grads, torch_loss_and_grads

    net.train()
    fn = torch_loss_and_grads if side == "torch" else jax_loss_and_grads
    return {k: v.astype(np.float64) for k, v in fn(net, x, y, "ce")[1].items()}


def _trajectories(spec: Spec, weights: Mapping[str, np.ndarray], precision: str,
                  jax_kernels: str, steps: int, lr: float, batch: int, seed: int, beta: float,
                  say: Any) -> list[Bounded]:
    """``steps`` plain-SGD steps of each port by its program's train step, and of the float64
    reference; per port the worst tensor's final error as a share of its bound."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    import lenet_jax
    import lenet_torch
    from lenet_jax.loss import loss_fn as jax_loss_fn
    from lenet_jax.optim import make_tx
    from lenet_jax.trainer import make_step as jax_make_step
    from lenet_jax.trainer import split_for_training
    from lenet_parity.battery import nhwc, random_batch
    from lenet_torch.loss import loss_fn as torch_loss_fn
    from lenet_torch.optim import make_optimizer
    from lenet_torch.trainer import make_step as torch_make_step

    params = list(spec.param_shapes)
    ref = {k: np.asarray(v, np.float64) if k in spec.param_shapes else v
           for k, v in weights.items()}
    budget = {k: 0.0 for k in params}
    nets = _nets(spec, weights, precision, jax_kernels)
    t = nets["torch"].train()
    t_step = torch_make_step(t, make_optimizer(t, "sgd", lr, 0.0, 0.0), torch_loss_fn("ce"))
    tx = make_tx("sgd", lr, 0.0, 0.0)
    graphdef, _, jparams, stats, rest = split_for_training(nets["jax"])
    j_step = jax.jit(jax_make_step(graphdef, tx, jax_loss_fn("ce")))
    state = (jparams, stats, tx.init(jparams))
    every = jnp.arange(batch, dtype=jnp.int32)
    for step in range(steps):
        say(f"trajectory step {step + 1}/{steps}")
        x, y = random_batch(spec, batch, seed + 1 + step)
        grads, sums = abs_gradients(spec, ref, x, y)
        for k in params:
            ref[k] = ref[k] - lr * grads[k]
            budget[k] += lr * np.linalg.norm(sums[k]) * beta + U32 * np.linalg.norm(ref[k])
        t_step(torch.from_numpy(x), torch.from_numpy(y), lr)
        state, _, _ = j_step(state, rest, jnp.asarray(nhwc(x)), jnp.asarray(y),
                             every[: len(y)], np.int32(step), np.uint32(0), np.float32(1))
    nnx.update(nets["jax"], state[0], state[1])
    rows = []
    for side, got in (("torch", lenet_torch.get_weights(t)),
                      ("jax", lenet_jax.get_weights(nets["jax"]))):
        shares = {k: np.linalg.norm(got[k] - ref[k]) / budget[k] for k in params}
        worst = max(shares, key=lambda k: shares[k])
        rows.append(Bounded(f"{steps} SGD steps, lr {lr:g} (parameters)", side,
                            float(shares[worst]),
                            float(np.linalg.norm(got[worst] - ref[worst])), worst))
    return rows

