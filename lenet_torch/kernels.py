"""The torch port's tuned formulations (``build(..., kernels="fused")``), the JAX port's by the
same plan (:func:`lenet_kernels.fusion_plan`), each computing what torch's own layers compute,
to float32 rounding:

- a stride-1 conv, any batch_norm and activations, and a non-overlapping max- or avg-pool as
  ONE matrix product over the pool's phases, the layers between applied to every phase and the
  pool a reduction over them (:func:`conv_pool`; with a monotone activation or none before a
  max-pool, the maximum is taken first: :func:`conv_max_pool`);
- a one-channel conv as a shift-and-add with a GEMM backward pass (:func:`conv_one_channel`);
- a non-overlapping pool as a reshape and a reduction (:func:`pool`).

Every max here sends its gradient to the first maximum of a window, as ``F.max_pool2d`` does
(``torch.max`` over a dimension returns the first maximal index). They exist so that the
benchmark can give both frameworks the same formulations; on this project's CPU torch trains
faster with its own layers (README, benchmark), so ``"auto"`` is ``"stock"`` for torch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lenet_kernels import check_kernels, fusion_plan, phase_scatter, window_slices
from lenet_spec import Pair


def resolve(kernels: str) -> str:
    """``"stock"`` or ``"fused"``: ``"auto"`` is the faster (measured: stock, on CPU; stock on
    GPU until a measurement there says otherwise)."""
    check_kernels(kernels)
    return "stock" if kernels == "auto" else kernels


def forward(net: Any, x: torch.Tensor, end: int | None = None) -> torch.Tensor:
    """``net``'s output for NCHW ``x`` (its first ``end`` layers) by the shared fusion plan
    (:func:`lenet_kernels.fusion_plan`): fused where a formulation applies, else by ``net``'s
    own layers."""
    infos = net.spec.infos[:end]
    for step in fusion_plan(infos):
        layer = infos[step.start].layer
        if step.kind == "conv_pool":  # conv, the layers between, pool: computed together
            conv = getattr(net, layer.name)
            between = [lambda y, b=infos[k].layer: net.apply_layer(b, y) for k in step.between]
            x = conv_pool(x, conv.weight, conv.bias, layer.padding,
                          infos[step.stop - 1].layer.kernel_size, between, step.take_max,
                          step.commutes)
        elif step.kind == "conv_one_channel":
            conv = getattr(net, layer.name)
            x = conv_one_channel(x, conv.weight, conv.bias, layer.stride, layer.padding)
        elif step.kind == "pool":
            x = pool(x, layer.kernel_size, "max" if step.take_max else "mean")
        else:
            x = net.apply_layer(layer, x)
    return x


def pool(x: torch.Tensor, window: Pair, reduce: str) -> torch.Tensor:
    """Non-overlapping pooling of NCHW ``x`` ("max" or "mean") as a reshape and a reduction
    (floor mode: a ragged edge is dropped)."""
    n, c, h, w = x.shape
    (kh, kw), ho, wo = window, h // window[0], w // window[1]
    x = x[:, :, : ho * kh, : wo * kw].reshape(n, c, ho, kh, wo, kw)
    if reduce == "mean":
        return x.mean(dim=(3, 5))
    return x.permute(0, 1, 2, 4, 3, 5).reshape(n, c, ho, wo, kh * kw).max(dim=4).values


def conv_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: Pair,
              pool: Pair, between: list, take_max: bool, commutes: bool = False) -> torch.Tensor:
    """pool(between(conv(x) + bias)) for an NCHW ``x``, an OIHW ``weight`` of stride 1 and
    non-overlapping ``pool`` windows (max if ``take_max``, else mean), ``between`` a list of
    functions applied in turn to the conv's output (batch_norm, activations): the conv as one
    matrix product over the pool's phases (:func:`conv_max_pool`), ``between`` applied to
    every phase (as NCHW tensors whose rows are the phases' rows one after another: a
    batch_norm sees every output of the conv), the pool a reduction over the phases. With
    ``commutes`` (``between`` is a monotone activation or nothing) a max-pool is taken before
    the bias and ``between``."""
    y = _phase_product(x, weight, padding, pool)  # (N, Ho, Wo, phases, Cout)
    n, ho, wo, phases, c = y.shape
    if take_max and commutes:
        y = y.max(dim=3).values
        y = y + bias if bias is not None else y
        for f in between:  # elementwise: in this layout, before the permute
            y = f(y)
        return y.permute(0, 3, 1, 2)
    y = y + bias if bias is not None else y
    y = y.permute(0, 4, 3, 1, 2).reshape(n, c, phases * ho, wo)
    for f in between:
        y = f(y)
    y = y.reshape(n, c, phases, ho, wo)
    return y.max(dim=2).values if take_max else y.mean(dim=2)


def conv_max_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: Pair,
                  pool: Pair, activation=None) -> torch.Tensor:
    """max-pool(activation(conv(x) + bias)) for an NCHW ``x``, an OIHW ``weight`` of stride 1,
    non-overlapping ``pool`` windows and a monotone ``activation`` (or none), as one matrix
    product.

    The convolution is evaluated at the pool's ph·pw phases at once: the input is rearranged
    space-to-depth by the pool's shape, so that every phase of the output is a convolution of
    that input with a kernel scattered from ``weight`` (zeros elsewhere); the phases' maximum is
    the pool, and the bias and a monotone activation commute with it.
    """
    return conv_pool(x, weight, bias, padding, pool, [activation] if activation else [], True,
                     True)


def _phase_product(x: torch.Tensor, weight: torch.Tensor, padding: Pair,
                   pool: Pair) -> torch.Tensor:
    """conv(x) (no bias) at the pool's phases: (N, Ho, Wo, ph·pw, Cout), Ho, Wo pooled, the
    phases in the window's row-major order; a ragged edge the pool drops is not computed."""
    (ph, pw), (cout, cin, kh, kw) = pool, weight.shape
    (pad_h, pad_w) = padding
    n, _, h, w = x.shape
    h, w = h + 2 * pad_h, w + 2 * pad_w
    ho, wo = (h - kh + 1) // ph, (w - kw + 1) // pw  # pooled output; a ragged edge is dropped
    kp, kq = (ph + kh - 2) // ph + 1, (pw + kw - 2) // pw + 1  # taps of the phase kernel
    hs, ws = ho + kp - 1, wo + kq - 1
    # rows/columns past the input are read by zero taps only; cut what no tap reads
    x = F.pad(x, (pad_w, pad_w + max(ws * pw - w, 0), pad_h, pad_h + max(hs * ph - h, 0)))
    x = x[:, :, : hs * ph, : ws * pw]
    x = x.reshape(n, cin, hs, ph, ws, pw).permute(0, 2, 4, 3, 5, 1).reshape(n, hs, ws, -1)
    scatter = torch.from_numpy(phase_scatter((kh, kw), pool)).to(weight)
    taps = torch.einsum("PRqrabyx,oiyx->PRqriabo", scatter, weight).reshape(
        kp * kq * ph * pw * cin, ph * pw * cout)
    patches = torch.cat([x[:, p : p + ho, r : r + wo] for p in range(kp) for r in range(kq)],
                        dim=-1)
    return (patches.reshape(-1, taps.shape[0]) @ taps).reshape(n, ho, wo, ph * pw, cout)


def _windows(x: torch.Tensor, kernel: Pair, stride: Pair, out: Pair) -> list[torch.Tensor]:
    """The kernel's kh·kw shifted, strided views of one-channel NCHW ``x``, each (N, Ho, Wo)."""
    return [x[:, 0, rows, cols] for rows, cols in window_slices(kernel, stride, out)]


def conv_one_channel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     stride: Pair, padding: Pair) -> torch.Tensor:
    """The convolution of a one-channel NCHW ``x`` with an OIHW ``weight``: what ``nn.Conv2d``
    computes, to float32 rounding."""
    (ph, pw), (kh, kw) = padding, weight.shape[2:]
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    out = ((x.shape[2] - kh) // stride[0] + 1, (x.shape[3] - kw) // stride[1] + 1)
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])  # adds nothing; its gradient is not used
    return _ShiftAndAdd.apply(x, weight, bias, stride, out)


class _ShiftAndAdd(torch.autograd.Function):
    """Σ over kernel taps of shifted image × tap; the backward pass makes the weight's gradient
    one matrix product of the stacked windows (autograd would reduce once per tap)."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, stride: Pair, out: Pair) -> torch.Tensor:
        cout, _, kh, kw = weight.shape
        taps = weight.reshape(cout, kh * kw)
        y = bias.reshape(1, cout, 1, 1).expand(x.shape[0], cout, *out).clone()
        for t, window in enumerate(_windows(x, (kh, kw), stride, out)):
            y.addcmul_(window.unsqueeze(1), taps[:, t].reshape(1, cout, 1, 1))
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.out = stride, out
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        cout, _, kh, kw = weight.shape
        windows = torch.stack(_windows(x, (kh, kw), ctx.stride, ctx.out))
        dweight = (windows.reshape(kh * kw, -1) @ dy.permute(0, 2, 3, 1).reshape(-1, cout))
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.nn.grad.conv2d_input(x.shape, weight, dy, ctx.stride)
        return dx, dweight.T.reshape(weight.shape), dy.sum((0, 2, 3)), None, None
