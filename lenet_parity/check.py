"""The parity battery on any spec: per layer forward, per parameter gradients, an SGD
trajectory and batch_norm statistics, torch port against JAX port, in one :class:`Report`."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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
TRAJECTORY = "optimizer trajectory"
STATISTICS = "batch_norm running statistics"


ROUNDING_MULTIPLE = 2.0
"""A float32 difference that a fixed bound does not cover is still rounding, not a divergence,
when it is at most this multiple of the two sides' own float32 errors, each measured against
the same computation in float64 (same port, same kernels, same data). If both ports compute the
same function, |torch − JAX| ≤ torch's error + JAX's error + their float64 difference (the
triangle inequality, element by element), and the float64 difference is float64 rounding
(~1e-16 relative); a port computing something else moves its float64 result as much as its
float32 one, so the gap exceeds its own rounding."""


@dataclass
class Row:
    """One comparison: max |Δ| between the ports' float32 results; the fixed bound; each side's
    own float32 error against its float64 result (NaN when not measured)."""

    section: str
    layer: str
    name: str
    detail: str
    gap: float
    scale: float
    bound: float
    err_torch: float = math.nan
    err_jax: float = math.nan

    @property
    def rel(self) -> float:
        return self.gap / self.scale if self.scale > 0 else self.gap

    @property
    def rounding(self) -> float:
        """The gap float32 rounding explains: ROUNDING_MULTIPLE × the two sides' own errors."""
        errors = [e for e in (self.err_torch, self.err_jax) if not math.isnan(e)]
        return ROUNDING_MULTIPLE * sum(errors) if len(errors) == 2 else 0.0

    @property
    def limit(self) -> float:
        """The larger of the fixed bound and the rounding the float64 reference measured."""
        return max(self.bound, self.rounding)

    @property
    def ok(self) -> bool:
        return self.gap <= self.limit  # NaN is not ok


@dataclass
class Report:
    """The rows of a parity run, in order, and what it was run on."""

    spec: Spec
    notes: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    moved: float = math.nan
    """The largest change of a parameter along the trajectory (torch's, float32): a
    trajectory whose weights barely moved proves little."""

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
            errors = ("" if math.isnan(bad.err_torch) else
                      f"; float32 errors against float64: torch {bad.err_torch:.3g}, JAX "
                      f"{bad.err_jax:.3g}")
            return (f"parity: first divergence at {bad.layer} ({bad.section}: {bad.name} max "
                    f"|Δ| {bad.gap:.3g} > bound {bad.limit:.3g}{errors})")
        parts = []
        for section, what in ((FORWARD, "forward"), (GRADIENTS, "gradients"),
                              (TRAJECTORY, "trajectory"), (STATISTICS, "statistics")):
            rows = [r for r in self.rows if r.section == section]
            if rows:
                worst = max(rows, key=lambda r: r.gap / r.limit if r.limit > 0 else 0)
                share = worst.gap / worst.limit if worst.limit > 0 else 0.0
                parts.append(f"{what}: {len(rows)} checks, worst {worst.name} at "
                             f"{share:.2g} of its bound")
        return f"parity: ok ({'; '.join(parts)})"

    def table(self) -> str:
        """The rows as a table, one block per section, then the verdict."""
        head = ("", "kind / shape", "max |Δ|", "torch err", "JAX err", "bound", "")
        lines = [*self.notes]
        for section in dict.fromkeys(r.section for r in self.rows):
            rows = [r for r in self.rows if r.section == section]
            cells = [head] + [(r.name, r.detail, f"{r.gap:.3g}", _err(r.err_torch),
                               _err(r.err_jax), f"{r.limit:.3g}", "ok" if r.ok else "DIVERGES")
                              for r in rows]
            widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
            align = ["<", "<", ">", ">", ">", ">", "<"]
            lines += ["", section]
            for c in cells:
                lines.append("  ".join(f"{v:{a}{w}}" for v, a, w in
                                       zip(c, align, widths, strict=True)).rstrip())
        lines += ["", self.verdict()]
        return "\n".join(lines)


def _err(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.3g}"


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


@dataclass
class Cmp:
    """One quantity as each port computed it, before the rows compare two precisions of it."""

    section: str
    layer: str
    name: str
    detail: str
    torch: np.ndarray
    jax: np.ndarray
    bound: Callable[[float], float]
    relative: bool = False  # compared relative to the torch value, element by element


def _cmp(section: str, layer: str, name: str, detail: str, a: Any, b: Any,
         bound: Callable[[float], float], relative: bool = False) -> Cmp:
    return Cmp(section, layer, name, detail, np.asarray(a, np.float64),
               np.asarray(b, np.float64), bound, relative)


def _maxdiff(a: np.ndarray, b: np.ndarray, scale_by: np.ndarray | None = None) -> float:
    if not a.size:
        return 0.0
    d = np.abs(a - b)
    if scale_by is not None:
        d = d / np.maximum(np.abs(scale_by), 1e-30)
    return float(d.max())


def _rows(c32: list[Cmp], c64: list[Cmp] | None) -> list[Row]:
    """Rows from the float32 comparisons, with each side's float32 error against its float64
    result where ``c64`` (the same comparisons, in float64) is given."""
    rows = []
    for i, c in enumerate(c32):
        a, b = c.torch, c.jax
        if a.shape != b.shape:
            rows.append(Row(c.section, c.layer, c.name, f"{c.detail} (shapes {a.shape} vs "
                            f"{b.shape})", math.inf, 0.0, 0.0))
            continue
        rel = a if c.relative else None
        scale = 1.0 if c.relative else (float(np.abs(a).max()) if a.size else 0.0)
        row = Row(c.section, c.layer, c.name, c.detail, _maxdiff(a, b, rel), scale,
                  c.bound(scale))
        if c64 is not None:
            r = c64[i]
            if (r.section, r.name) != (c.section, c.name) or r.torch.shape != a.shape:
                raise AssertionError(f"float64 pass out of step at {c.name}")
            row.err_torch, row.err_jax = _maxdiff(a, r.torch, rel), _maxdiff(b, r.jax, rel)
        rows.append(row)
    return rows


def _layer(info: LayerInfo) -> str:
    """The layer's name, or for an unnamed one its type and index."""
    return info.label if info.params or info.buffers else f"{info.label} ({info.index})"


def _output_bound(scale: float) -> float:
    return LOGIT_TOL * max(1.0, scale)


def _grad_bound(scale: float) -> float:
    return GRAD_TOL * scale


LOSS_NAMES = {"ce": "cross-entropy", "mse": "mean squared error"}

PARTS = ("forward", "gradients", "trajectory")
"""What :func:`check` compares: each layer's output; the loss and the gradients; a trajectory
of optimizer steps (its losses, parameters and batch_norm statistics)."""


def check(spec: Spec, torch_weights: Weights | None = None, jax_weights: Weights | None = None,
          *, steps: int = 20, batch: int = 16, seed: int = 0, single_step: bool = False,
          kernels: tuple[str, str] = ("auto", "auto"), reference: bool = True,
          optimizer: dict[str, Any] | None = None, loss: str = "ce",
          parts: tuple[str, ...] = PARTS, grad_floor: float = GRAD_FLOOR,
          progress: Callable[[str], None] | None = None) -> Report:
    """Both ports of ``spec`` compared: every layer's output in evaluation mode, the loss
    (``loss``) and every gradient in training mode (dropout off: two frameworks cannot draw
    the same masks), ``steps`` optimizer steps (``optimizer``: make_optimizer's arguments,
    default :data:`SGD`) by each training program's own train step, their losses and
    parameters, and batch_norm's running statistics; ``parts`` of :data:`PARTS` only.

    Weights: each side from its own mapping, one mapping for both, or (neither) the torch
    port's initialisation from ``seed`` with non-trivial batch_norm state, copied to JAX.
    ``single_step`` feeds every layer the torch port's input to it (and, backwards, its output
    gradient), so a layer's row measures that layer alone. Batches are random and kept clear
    of kinks (max-pool near-ties, activations near 0), as in the tests.

    With ``reference`` (the default) everything is computed again in float64 by both ports on
    the same batches, and a row's bound grows to :data:`ROUNDING_MULTIPLE` × the two sides'
    own float32 errors where the fixed bound is tighter than float32 rounding can meet (a
    gradient that is zero in exact arithmetic, a long trajectory). Without it, a gradient's
    bound is the fixed one plus ``grad_floor``.
    """
    optimizer = optimizer or SGD
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

    memo: dict[str, Any] = {}  # the float32 pass's batches, replayed in float64

    def compare(precision: str) -> list[Cmp]:
        dtype = np.float32 if precision == "float32" else np.float64

        def twins(s: Spec, mode: str) -> tuple:
            tn = lenet_torch.build(s, kernels=kernels[0])
            jn = lenet_jax.build(s, kernels=kernels[1])
            lenet_torch.set_weights(tn, torch_weights)
            lenet_jax.set_weights(jn, jax_weights)
            if dtype == np.float64:
                tn.double()
                _jax_float64(jn)
            for net in (tn, jn):
                net.train() if mode == "train" else net.eval()
            return tn, jn

        cmps: list[Cmp] = []
        if "forward" in parts:
            say(f"forward ({precision})")
            cmps += _forward(spec, *twins(spec, "eval"), batch, seed, single_step, dtype)
        bare = without_dropout(spec)
        if "gradients" in parts:
            say(f"gradients ({precision})")
            bound = _grad_bound if reference else (lambda s: GRAD_TOL * s + grad_floor)
            cmps += _gradients(bare, *twins(bare, "train"), batch, seed, single_step, memo,
                               bound, loss)
        if steps and "trajectory" in parts:
            say(f"trajectory ({precision})")
            cmps += _trajectory(bare, *twins(bare, "train"), steps, batch, seed, say, memo,
                                optimizer, loss, report if precision == "float32" else None)
        return cmps

    import jax

    c32 = compare("float32")
    c64 = None
    if reference:
        with jax.enable_x64(True):
            c64 = compare("float64")
        report.notes.append(
            "bound: the larger of the fixed bound and "
            f"{ROUNDING_MULTIPLE:g} × (torch err + JAX err), each side's float32 error against "
            "the same computation in float64")
    report.rows += _rows(c32, c64)
    return report


def _jax_float64(net: Any) -> None:
    """``net``'s floating-point state in float64 (inside ``jax.enable_x64``)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    state = nnx.state(net)
    nnx.update(net, jax.tree.map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, state))


def _forward(spec: Spec, t, j, batch: int, seed: int, single_step: bool,
             dtype: type = np.float32) -> list[Cmp]:
    # frameworks load on first use: the command line reads its flags first
    import jax.numpy as jnp
    import torch

    from lenet_jax.model import layer_outputs as jax_layer_outputs
    from lenet_torch.model import layer_outputs as torch_layer_outputs

    x, _ = random_batch(spec, batch, seed)
    x = x.astype(dtype)
    cmps = []
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
        cmps.append(_cmp(FORWARD, _layer(info), _layer(info),
                         f"{info.kind}, {fmt_shape(info.out_shape)}", out_t,
                         to_torch_layout(np.asarray(out_j), order), _output_bound))
    logits_j = np.asarray(j(jnp.asarray(nhwc(x))))
    cmps.append(_cmp(FORWARD, "logits", f"{spec.output.replace('_', '-')} (whole network)",
                     "kernels as built", logits_t, logits_j, _output_bound))
    return cmps


def _gradients(spec: Spec, t, j, batch: int, seed: int, single_step: bool,
               memo: dict[str, Any], bound: Callable[[float], float],
               loss: str = "ce") -> list[Cmp]:
    if "gradients" not in memo:
        memo["gradients"] = clear_batch(spec, t, batch, seed + 1)
    x, y = memo["gradients"]
    x = x.astype(next(t.parameters()).detach().numpy().dtype)
    if single_step:
        return _gradients_per_layer(spec, t, j, x, y, bound)
    lt, gt = torch_loss_and_grads(t, x, y, loss)
    lj, gj = jax_loss_and_grads(j, x, y, loss)
    cmps = [_cmp(GRADIENTS, "loss", "loss", LOSS_NAMES[loss], lt, lj,
                 lambda scale: LOSS_TOL * max(1.0, scale))]
    owner = {k: info.label for info in spec.infos for k in info.params}
    for k, shape in spec.param_shapes.items():
        cmps.append(_cmp(GRADIENTS, owner[k], k, fmt_shape(shape), gt[k], gj[k], bound))
    return cmps + _statistics(spec, t, j, "after the gradients' forward pass")


def _gradients_per_layer(spec: Spec, t, j, x: np.ndarray, y: np.ndarray,
                         bound: Callable[[float], float]) -> list[Cmp]:
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
    for layer in spec.layers[:spec.logits_end]:  # the loss is of the logits
        ins.append(h)
        h = t.apply_layer(layer, h)
        h.retain_grad()
        outs.append(h)
    t.zero_grad()
    loss = torch_loss("ce")(h, torch.from_numpy(y))
    loss.backward()
    lj = float(jax_loss("ce")(jnp.asarray(h.detach().numpy()), jnp.asarray(y)))
    cmps = [_cmp(GRADIENTS, "loss", "loss (of the torch logits)", "cross-entropy", loss.item(),
                 lj, lambda scale: LOSS_TOL * max(1.0, scale))]
    grads_t = {k: p.grad.numpy() for k, p in t.named_parameters()}
    orders = _flat_orders(spec)
    for i, info in enumerate(spec.infos[:spec.logits_end]):
        order_in = orders[i - 1] if i else None
        xin = jnp.asarray(to_jax_layout(ins[i].detach().numpy(), order_in))
        cot = jnp.asarray(to_jax_layout(outs[i].grad.numpy(), orders[i]))
        layer = info.layer

        def f(net, xin, layer=layer, cot=cot):
            return jnp.vdot(net.apply_layer(layer, xin), cot)

        gnet, gx = nnx.grad(f, argnums=(0, 1))(j, xin)
        input_grad = ins[i].grad
        if input_grad is not None:
            cmps.append(_cmp(GRADIENTS, _layer(info), f"{_layer(info)} input",
                             f"{info.kind}, {fmt_shape(info.in_shape)}", input_grad.numpy(),
                             to_torch_layout(np.asarray(jax.device_get(gx)), order_in),
                             bound))
        if info.params:
            canonical = jax_canonical(j, gnet)
            for k, shape in info.params.items():
                cmps.append(_cmp(GRADIENTS, info.label, k, fmt_shape(shape), grads_t[k],
                                 canonical[k], bound))
    return cmps


def _trajectory(spec: Spec, t, j, steps: int, batch: int, seed: int,
                say: Callable[[str], None], memo: dict[str, Any], optimizer: dict[str, Any],
                loss: str, report: Report | None) -> list[Cmp]:
    # frameworks load on first use: the command line reads its flags first
    import lenet_jax
    import lenet_torch

    replay = memo.get("trajectory")
    record = None if replay is not None else memo.setdefault("trajectory", [])
    before = lenet_torch.get_weights(t)
    lt, lj = trajectories(spec, t, j, optimizer, steps, batch, seed + 100, loss, say,
                          record=record, replay=replay)
    shown = ", ".join(f"{k} {v:g}" for k, v in optimizer.items() if k != "name")
    cmps = [_cmp(TRAJECTORY, "loss", f"losses, {steps} {optimizer['name']} steps",
                 f"relative, worst step ({shown})", lt, lj, lambda _: TRAJ_LOSS_TOL,
                 relative=True)]
    wt, wj = lenet_torch.get_weights(t), lenet_jax.get_weights(j)
    if report is not None:
        report.moved = max(float(np.abs(wt[k] - before[k]).max()) for k in spec.param_shapes)
    owner = {k: info.label for info in spec.infos for k in info.params}
    for name, shape in spec.param_shapes.items():
        cmps.append(_cmp(TRAJECTORY, owner[name], name, fmt_shape(shape), wt[name], wj[name],
                         lambda _: TRAJ_PARAM_TOL))
    return cmps + _statistics(spec, t, j, "after the trajectory")


def _statistics(spec: Spec, t, j, when: str) -> list[Cmp]:
    """batch_norm's running statistics of the two nets (the batch counts exactly)."""
    # frameworks load on first use: the command line reads its flags first
    import lenet_jax
    import lenet_torch

    wt, wj = lenet_torch.get_weights(t), lenet_jax.get_weights(j)
    owner = {k: info.label for info in spec.infos for k in info.buffers}
    cmps = []
    for name, shape in spec.buffer_shapes.items():
        if name.endswith("num_batches_tracked"):
            cmps.append(_cmp(STATISTICS, owner[name], name, f"count, {when}", wt[name],
                             wj[name], lambda _: 0.0))
            continue
        cmps.append(_cmp(STATISTICS, owner[name], name, f"{fmt_shape(shape)}, {when}",
                         wt[name], wj[name], lambda scale: STATS_TOL * scale))
    return cmps
