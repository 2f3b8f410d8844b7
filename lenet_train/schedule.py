"""The learning rate of every optimizer step, the same in both frameworks."""

from __future__ import annotations

import math


def lr_at(schedule: str, peak: float, step: int, total: int) -> float:
    """The learning rate of ``step`` (0-based) of ``total``.

    constant: ``peak``. cosine: ``peak · ½(1 + cos(π·step/total))``. onecycle: linear warm-up
    from peak/25 to peak over the first 30% of steps, then cosine down to peak/25e4 (the start,
    end and 30% of torch's OneCycleLR defaults; its warm-up is a cosine, ours is linear).
    """
    if schedule == "constant":
        return peak
    t = min(step, total) / max(total, 1)
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "onecycle":
        start, end, warm = peak / 25, peak / 25e4, 0.3
        if t < warm:
            return start + (peak - start) * t / warm
        u = (t - warm) / (1 - warm)
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * u))
    raise ValueError(f"unknown schedule {schedule!r}")
