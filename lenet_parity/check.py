"""The parity battery on any spec: per layer forward, per parameter gradients, an SGD
trajectory and batch_norm statistics, torch port against JAX port, in one :class:`Report`."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from lenet_parity.battery import (
    GRAD_FLOOR,
    GRAD_TOL,
    LOGIT_TOL,
    LOSS_TOL,
    SGD,
    STATS_TOL,
    TRAJ_LOSS_TOL,
    TRAJ_PARAM_TOL,
    busy_batch_norms,
    clear_batch,
    jax_loss_and_grads,
    nhwc,
    random_batch,
    torch_loss_and_grads,
    trajectories,
    without_dropout,
)
from lenet_spec import Flatten, LayerInfo, Linear, Spec, chw_to_hwc, fmt_shape, hwc_to_chw

Weights = Mapping[str, np.ndarray]

FORWARD = "forward, evaluation mode"
GRADIENTS = "gradients, training mode (dropout off), cross-entropy"
TRAJECTORY = "SGD trajectory (lr 0.01, momentum 0.9, weight decay 5e-4)"
STATISTICS = "batch_norm running statistics after the trajectory"


@dataclass
class Row:
    """One comparison: max |Δ| between the ports against its bound."""

    section: str
    layer: str
    name: str
    detail: str
    gap: float
    scale: float
    bound: float

    @property
    def rel(self) -> float:
        return self.gap / self.scale if self.scale > 0 else self.gap

    @property
    def ok(self) -> bool:
        return self.gap <= self.bound  # NaN is not ok


@dataclass
class Report:
    """The rows of a parity run, in order, and what it was run on."""

    spec: Spec
    notes: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    @property
    def first_failure(self) -> Row | None:
        return next((row for row in self.rows if not row.ok), None)

    def verdict(self) -> str:
        """``parity: ok (…)`` or ``parity: first divergence at LAYER (…)``."""
        bad = self.first_failure
        if bad is not None:
            return (f"parity: first divergence at {bad.layer} ({bad.section}: {bad.name} max "
                    f"|Δ| {bad.gap:.3g} > bound {bad.bound:.3g})")
        parts = []
        for section, what in ((FORWARD, "forward"), (GRADIENTS, "gradients"),
                              (TRAJECTORY, "trajectory"), (STATISTICS, "statistics")):
            rows = [r for r in self.rows if r.section == section]
            if rows:
                worst = max(rows, key=lambda r: r.gap / r.bound if r.bound > 0 else 0)
                parts.append(f"{what}: {len(rows)} checks, worst {worst.name} at "
                             f"{worst.gap / worst.bound:.2g} of its bound")
        return f"parity: ok ({'; '.join(parts)})"

    def table(self) -> str:
        """The rows as a table, one block per section, then the verdict."""
        head = ("", "kind / shape", "max |Δ|", "rel Δ", "bound", "")
        lines = [*self.notes]
        for section in dict.fromkeys(r.section for r in self.rows):
            rows = [r for r in self.rows if r.section == section]
            cells = [head] + [(r.name, r.detail, f"{r.gap:.3g}", f"{r.rel:.3g}",
                               f"{r.bound:.3g}", "ok" if r.ok else "DIVERGES") for r in rows]
            widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
            align = ["<", "<", ">", ">", ">", "<"]
            lines += ["", section]
            for c in cells:
                lines.append("  ".join(f"{v:{a}{w}}" for v, a, w in
                                       zip(c, align, widths, strict=True)).rstrip())
        lines += ["", self.verdict()]
        return "\n".join(lines)


def _flat_orders(spec: Spec) -> list[tuple[int, ...] | None]:
    """Per layer: the (C, H, W) its flat output was flattened from, while the JAX port keeps
    that output in H, W, C order (from a flatten up to the linear layer whose
    ``flattened_from`` it is), else None."""
    orders: list[tuple[int, ...] | None] = []
    current = None
    for info in reversed(spec.infos):
        orders.append(None if isinstance(info.layer, Linear) else current)
        if isinstance(info.layer, Linear):
            current = info.flattened_from
        elif isinstance(info.layer, Flatten):
            current = None
    return orders[::-1]


def to_torch_layout(x: np.ndarray, flat_from: tuple[int, ...] | None) -> np.ndarray:
    """A JAX port's activation in the torch port's layout (NHWC → NCHW; a flat H·W·C → C·H·W)."""
    x = np.asarray(x)
    if x.ndim == 4:
        return x.transpose(0, 3, 1, 2)
    if flat_from is not None:
        return hwc_to_chw(x, flat_from, axis=1)
    return x


def to_jax_layout(x: np.ndarray, flat_from: tuple[int, ...] | None) -> np.ndarray:
    """The inverse of :func:`to_torch_layout`."""
    if x.ndim == 4:
        return nhwc(x)
    if flat_from is not None:
        return np.ascontiguousarray(chw_to_hwc(x, flat_from, axis=1))
    return x


def _row(section: str, layer: str, name: str, detail: str, a: np.ndarray, b: np.ndarray,
         bound: Callable[[float], float]) -> Row:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return Row(section, layer, name, f"{detail} (shapes {a.shape} vs {b.shape})",
                   math.inf, 0.0, 0.0)
    scale = float(np.abs(a).max()) if a.size else 0.0
    gap = float(np.abs(a - b).max()) if a.size else 0.0
    return Row(section, layer, name, detail, gap, scale, bound(scale))


def _layer(info: LayerInfo) -> str:
    """The layer's name, or for an unnamed one its type and index."""
    return info.label if info.params or info.buffers else f"{info.label} ({info.index})"


def _output_bound(scale: float) -> float:
    return LOGIT_TOL * max(1.0, scale)


def _grad_bound(scale: float) -> float:
    return GRAD_TOL * scale + GRAD_FLOOR


def check(spec: Spec, torch_weights: Weights | None = None, jax_weights: Weights | None = None,
          *, steps: int = 20, batch: int = 16, seed: int = 0, single_step: bool = False,
          kernels: tuple[str, str] = ("auto", "auto"),
          progress: Callable[[str], None] | None = None) -> Report:
    """Both ports of ``spec`` compared: every layer's output in evaluation mode, the loss and
    every gradient in training mode (dropout off: two frameworks cannot draw the same masks),
    ``steps`` SGD steps' losses and parameters, and batch_norm's running statistics.

    Weights: each side from its own mapping, one mapping for both, or (neither) the torch
    port's initialisation from ``seed`` with non-trivial batch_norm state, copied to JAX.
    ``single_step`` feeds every layer the torch port's input to it (and, backwards, its output
    gradient), so a layer's row measures that layer alone. Batches are random and kept clear
    of kinks (max-pool near-ties, activations near 0), as in the tests.
    """
    # frameworks load on first use: the command line reads its flags first
    import lenet_jax
    import lenet_torch

    say = progress or (lambda _: None)
    report = Report(spec)
    t = lenet_torch.build(spec, seed, kernels=kernels[0])
    if torch_weights is None and jax_weights is None:
        busy_batch_norms(t, seed)
        torch_weights = jax_weights = lenet_torch.get_weights(t)
        origin = (f"the torch port's initialisation from seed {seed}"
                  + (" (batch_norm state made non-trivial)" if spec.buffer_count else "")
                  + ", copied to JAX")
    else:
        torch_weights = torch_weights if torch_weights is not None else jax_weights
        jax_weights = jax_weights if jax_weights is not None else torch_weights
        origin = "as given"
    gaps = {k: float(np.abs(np.asarray(torch_weights[k], np.float64)
                            - np.asarray(jax_weights[k], np.float64)).max())
            for k in spec.state_shapes}
    worst = max(gaps, key=gaps.get) if gaps else ""
    report.notes += [
        f"{spec.name}: {spec.param_count:,} parameters, {len(spec.layers)} layers; kernels "
        f"torch {kernels[0]}, JAX {kernels[1]}; batch {batch}, seed {seed}"
        + ("; single-step: each layer gets the torch port's input" if single_step else ""),
        f"weights: {origin}" + (f"; the two sides differ by up to {gaps[worst]:.3g} ({worst})"
                                 if gaps and gaps[worst] > 0 else ""),
    ]

    def twins(s: Spec, mode: str) -> tuple:
        tn = lenet_torch.build(s, kernels=kernels[0])
        jn = lenet_jax.build(s, kernels=kernels[1])
        lenet_torch.set_weights(tn, torch_weights)
        lenet_jax.set_weights(jn, jax_weights)
        for net in (tn, jn):
            net.train() if mode == "train" else net.eval()
        return tn, jn

    say("forward")
    _forward(report, spec, *twins(spec, "eval"), batch, seed, single_step)
    bare = without_dropout(spec)
    say("gradients")
    _gradients(report, bare, *twins(bare, "train"), batch, seed, single_step)
    if steps:
        say("trajectory")
        _trajectory(report, bare, *twins(bare, "train"), steps, batch, seed, say)
    return report


def _forward(report: Report, spec: Spec, t, j, batch: int, seed: int,
             single_step: bool) -> None:
    # frameworks load on first use: the command line reads its flags first
    import jax.numpy as jnp
    import torch

    from lenet_jax.model import layer_outputs as jax_layer_outputs
    from lenet_torch.model import layer_outputs as torch_layer_outputs

    x, _ = random_batch(spec, batch, seed)
    with torch.no_grad():
        outs_t = [o.numpy() for o in torch_layer_outputs(t, torch.from_numpy(x))]
        logits_t = t(torch.from_numpy(x)).numpy()
    orders = _flat_orders(spec)
    if single_step:
        ins = [x, *outs_t[:-1]]
        outs_j = [j.apply_layer(layer, jnp.asarray(to_jax_layout(ins[i], orders[i - 1]
                                                                  if i else None)))
                  for i, layer in enumerate(spec.layers)]
    else:
        outs_j = jax_layer_outputs(j, jnp.asarray(nhwc(x)))
    for info, out_t, out_j, order in zip(spec.infos, outs_t, outs_j, orders, strict=True):
        report.rows.append(_row(FORWARD, _layer(info), _layer(info),
                                f"{info.kind}, {fmt_shape(info.out_shape)}", out_t,
                                to_torch_layout(out_j, order), _output_bound))
    logits_j = np.asarray(j(jnp.asarray(nhwc(x))))
    report.rows.append(_row(FORWARD, "logits", "logits (whole network)",
                            "kernels as built", logits_t, logits_j,
                            _output_bound))


def _gradients(report: Report, spec: Spec, t, j, batch: int, seed: int,
               single_step: bool) -> None:
    x, y = clear_batch(spec, t, batch, seed + 1)
    if not single_step:
        lt, gt = torch_loss_and_grads(t, x, y, "ce")
        lj, gj = jax_loss_and_grads(j, x, y, "ce")
        report.rows.append(Row(GRADIENTS, "loss", "loss", "cross-entropy", abs(lt - lj),
                               abs(lt), LOSS_TOL * max(1.0, abs(lt))))
        owner = {k: info.label for info in spec.infos for k in info.params}
        for k, shape in spec.param_shapes.items():
            report.rows.append(_row(GRADIENTS, owner[k], k, fmt_shape(shape), gt[k], gj[k],
                                    _grad_bound))
        return
    _gradients_per_layer(report, spec, t, j, x, y)


def _gradients_per_layer(report: Report, spec: Spec, t, j, x: np.ndarray,
                         y: np.ndarray) -> None:
    """Each layer's backward pass alone: its input and the gradient of the loss with respect
    to its output, both from torch, through the JAX layer; parameter and input gradients."""
    # frameworks load on first use: the command line reads its flags first
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from lenet_jax.loss import loss_fn as jax_loss
    from lenet_parity.battery import jax_canonical
    from lenet_torch.loss import loss_fn as torch_loss

    xt = torch.from_numpy(x).requires_grad_(True)
    h, ins, outs = xt, [], []
    for layer in spec.layers:
        ins.append(h)
        h = t.apply_layer(layer, h)
        h.retain_grad()
        outs.append(h)
    t.zero_grad()
    loss = torch_loss("ce")(h, torch.from_numpy(y))
    loss.backward()
    lj = float(jax_loss("ce")(jnp.asarray(h.detach().numpy()), jnp.asarray(y)))
    report.rows.append(Row(GRADIENTS, "loss", "loss (of the torch logits)", "cross-entropy",
                           abs(loss.item() - lj), abs(loss.item()),
                           LOSS_TOL * max(1.0, abs(loss.item()))))
    grads_t = {k: p.grad.numpy() for k, p in t.named_parameters()}
    orders = _flat_orders(spec)
    for i, info in enumerate(spec.infos):
        order_in = orders[i - 1] if i else None
        xin = jnp.asarray(to_jax_layout(ins[i].detach().numpy(), order_in))
        cot = jnp.asarray(to_jax_layout(outs[i].grad.numpy(), orders[i]))
        layer = info.layer

        def f(net, xin, layer=layer, cot=cot):
            return jnp.vdot(net.apply_layer(layer, xin), cot)

        gnet, gx = nnx.grad(f, argnums=(0, 1))(j, xin)
        input_grad = ins[i].grad
        if input_grad is not None:
            report.rows.append(_row(GRADIENTS, _layer(info), f"{_layer(info)} input",
                                    f"{info.kind}, {fmt_shape(info.in_shape)}",
                                    input_grad.numpy(), to_torch_layout(jax.device_get(gx),
                                                                        order_in),
                                    _grad_bound))
        if info.params:
            canonical = jax_canonical(j, gnet)
            for k, shape in info.params.items():
                report.rows.append(_row(GRADIENTS, info.label, k, fmt_shape(shape),
                                        grads_t[k], canonical[k], _grad_bound))


def _trajectory(report: Report, spec: Spec, t, j, steps: int, batch: int, seed: int,
                say: Callable[[str], None]) -> None:
    # frameworks load on first use: the command line reads its flags first
    import lenet_jax
    import lenet_torch

    lt, lj = trajectories(spec, t, j, SGD, steps, batch, seed + 100, "ce", say)
    rel = np.abs(lt - lj) / np.maximum(np.abs(lt), 1e-30)
    k = int(np.argmax(rel)) if len(rel) else 0
    report.rows.append(Row(TRAJECTORY, "loss", f"losses, {steps} steps",
                           f"relative; worst at step {k + 1}", float(rel[k]), 1.0,
                           TRAJ_LOSS_TOL))
    wt, wj = lenet_torch.get_weights(t), lenet_jax.get_weights(j)
    owner = {k: info.label for info in spec.infos for k in (*info.params, *info.buffers)}
    for name, shape in spec.param_shapes.items():
        report.rows.append(_row(TRAJECTORY, owner[name], name, fmt_shape(shape), wt[name],
                                wj[name], lambda _: TRAJ_PARAM_TOL))
    for name, shape in spec.buffer_shapes.items():
        if name.endswith("num_batches_tracked"):
            report.rows.append(Row(STATISTICS, owner[name], name, "count",
                                   abs(float(wt[name]) - float(wj[name])), float(wt[name]), 0.0))
            continue
        report.rows.append(_row(STATISTICS, owner[name], name, fmt_shape(shape), wt[name],
                                wj[name], lambda scale: STATS_TOL * scale))
