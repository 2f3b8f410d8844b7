"""The shape bound of a spec's train step: ``python -m bench.bound '<json config>'``.

A train step's arithmetic is matrix products: each conv as patches × kernel (M = N·Ho·Wo rows,
K = kh·kw·C/groups, one product per group), each linear as batch × weight; the backward pass
adds the weight's gradient (Kᵀ-shaped) and, for every layer after the first with parameters,
the input's gradient. The bound is the best time of each of those products at its real shape
on this machine (the fastest of numpy's BLAS, torch's ``bmm`` and XLA's ``dot``, each the best of
several repeats), summed: a step cannot run faster unless it skips or fuses arithmetic. Beside the
2048² GEMM bound (which assumes every product runs at the large-matrix rate) it says how far a
variant is from what these shapes allow. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from lenet_spec import Conv, Linear, Spec, load_spec, widen

Product = tuple[int, int, int, int]
"""(groups, M, K, N): ``groups`` independent (M × K) @ (K × N) products."""


def products(spec: Spec, batch: int) -> list[tuple[str, Product]]:
    """The matrix products of one train step on ``batch`` images: (name, shape) per product."""
    out: list[tuple[str, Product]] = []
    seen_params = False
    for info in spec.infos:
        layer = info.layer
        if isinstance(layer, Conv):
            g = layer.groups
            (kh, kw), (_, ho, wo) = layer.kernel_size, info.out_shape
            m, k, n = batch * ho * wo, kh * kw * info.in_shape[0] // g, layer.out_channels // g
        elif isinstance(layer, Linear):
            g, m, k, n = 1, batch, info.in_shape[0], layer.out_features
        else:
            continue
        out.append((f"{layer.name} forward", (g, m, k, n)))
        out.append((f"{layer.name} weight gradient", (g, k, m, n)))
        if seen_params:
            out.append((f"{layer.name} input gradient", (g, m, n, k)))
        seen_params = True
    return out


def _best(call: Callable[[], Any], seconds: float = 0.2) -> float:
    """The best time of one ``call`` over at least 5 timed repeats (about ``seconds`` in all)."""
    call()
    t0 = time.perf_counter()
    call()
    once = max(time.perf_counter() - t0, 1e-7)
    best = float("inf")
    for _ in range(max(5, min(200, int(seconds / once)))):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return best


def time_product(shape: Product) -> dict[str, float]:
    """Seconds of one product of ``shape`` by each library here, best of its repeats."""
    g, m, k, n = shape
    rng = np.random.default_rng(0)
    a = rng.standard_normal((g, m, k)).astype(np.float32)
    b = rng.standard_normal((g, k, n)).astype(np.float32)
    times = {"numpy": _best(lambda: np.matmul(a, b))}
    try:
        import torch
    except ImportError:
        pass
    else:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        out = torch.empty(g, m, n)
        times["torch"] = _best(lambda: torch.bmm(ta, tb, out=out))
    try:
        import jax
    except ImportError:
        return times
    ja, jb = jax.device_put(a), jax.device_put(b)
    dot = jax.jit(jax.numpy.matmul)
    times["jax"] = _best(lambda: dot(ja, jb).block_until_ready())
    return times


def bound(spec: Spec, batch: int) -> dict[str, Any]:
    """The shape bound of ``spec``'s train step at ``batch``: each product's best time and the
    sum, as seconds per step and images per second."""
    rows, total = [], 0.0
    cache: dict[Product, dict[str, float]] = {}
    for name, shape in products(spec, batch):
        if shape not in cache:
            cache[shape] = time_product(shape)
        best = min(cache[shape].values())
        total += best
        rows.append({"product": name, "shape": list(shape), "seconds": best,
                     "by": min(cache[shape], key=cache[shape].get)})
    return {"spec": spec.name, "batch_size": batch, "products": rows, "step_s": total,
            "images_per_sec": batch / total,
            "flops_per_step": sum(2 * g * m * k * n for _, (g, m, k, n) in products(spec, batch))}


def main() -> int:
    config = json.loads(sys.argv[1])
    spec = load_spec(config["spec"])
    if config.get("width", 1) != 1:
        spec = widen(spec, config["width"])
    print(json.dumps({**bound(spec, config["batch_size"]), "spec": config["spec"],
                      "width": config.get("width", 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
