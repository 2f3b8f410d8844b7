"""What ``python -m bench`` prints and draws: the table, the tiers' headline ratios (same math
and tuned in float32, mixed precision in bfloat16), the merge of interleaved rounds, and the
chart."""

from __future__ import annotations

import io
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from lenet_util import atomic_write_bytes

SAME_MATH = {"jax": "jax-stock-jit", "torch": "torch-stock-eager"}
"""The same-math tier: the frameworks' own layers, each in its usual execution mode."""


def _fmt(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def table(results: list[dict[str, Any]], env: dict[str, Any] | None = None) -> str:
    """The results as a markdown table; training throughput also as a share of the GEMM bound
    (``env``'s GEMM rate over the step's FLOPs) and of the shape bound (``bench.bound``)."""
    rows = ["| spec | framework | kernels | mode | precision | width | batch "
            "| train img/s (median [min, max]) | % GEMM bound | % shape bound "
            "| infer img/s | batch-1 latency ms | warm-up s | threads | peak RSS MB |",
            "| --- | --- | --- | --- | --- | " + "---: | " * 10]
    for r in results:
        head = f"| {r['spec']} | {r['framework']} | {r['kernels']} | {r['mode']} | " \
               f"{precision_of(r)} | {r.get('width', 1):g} | {r['batch_size']} |"
        if "error" in r:
            rows.append(f"{head} failed: {r['error']} | | | | | | | |")
            continue
        rate = r["train_images_per_sec"]
        gemm = env["gemm_gflops"] * 1e9 / r["train_flops_per_image"] if env else None
        shape = r.get("shape_bound_images_per_sec")
        rows.append(
            f"{head} {_fmt(rate)} [{_fmt(r['train_images_per_sec_min'])}, "
            f"{_fmt(r['train_images_per_sec_max'])}] | {_of(rate, gemm) if gemm else '—'} | "
            f"{_of(rate, shape) if shape else '—'} | {_fmt(r['infer_images_per_sec'])} | "
            f"{_fmt(r['latency_ms'], 3)} | {_fmt(r['compile_s'], 1)} | {r['threads']} | "
            f"{_fmt(r['peak_rss_mb'])} |")
    return "\n".join(rows)


def precision_of(result: dict[str, Any]) -> str:
    """A result's precision (float32 for records that predate the setting)."""
    return result.get("precision", "float32")


def _pick(results: list[dict[str, Any]], spec: str, width: float, batch: int, framework: str,
          variant: str | None = None, precision: str = "float32"):
    """The fastest result of ``framework`` (or its ``variant``) at (spec, width, batch,
    precision)."""
    group = [r for r in results if "error" not in r and r["spec"] == spec and r["width"] == width
             and r["batch_size"] == batch and r["framework"] == framework
             and precision_of(r) == precision
             and (variant is None or r["variant"] == variant)]
    return max(group, key=lambda r: r["train_images_per_sec"], default=None)


def _tier_line(name: str, results, rounds, spec: str, width: float, batch: int,
               same_math: bool, env: dict[str, Any], precision: str = "float32") -> str | None:
    def pair(rs):
        return tuple(_pick(rs, spec, width, batch, fw, SAME_MATH[fw] if same_math else None,
                           precision) for fw in ("jax", "torch"))

    j, t = pair(results)
    if not (j and t):
        return None
    line = (f"{name}: JAX ({j['kernels']}, {j['mode']}) {j['train_images_per_sec']:,.0f} img/s "
            f"vs torch ({t['kernels']}, {t['mode']}) {t['train_images_per_sec']:,.0f} img/s = "
            f"{j['train_images_per_sec'] / t['train_images_per_sec']:.2f}×")
    ratios = [pj["train_images_per_sec"] / pt["train_images_per_sec"]
              for rs in rounds or [] for pj, pt in [pair(rs)] if pj and pt]
    if len(ratios) > 1:
        line += (f" (within each of {len(ratios)} rounds: {min(ratios):.2f}–{max(ratios):.2f}×, "
                 f"median {float(np.median(ratios)):.2f}×)")
    gemm = env["gemm_gflops"] * 1e9 / j["train_flops_per_image"]
    line += (f"; JAX at {_of(j['train_images_per_sec'], gemm)}, torch at "
             f"{_of(t['train_images_per_sec'], gemm)} of the GEMM bound ({gemm:,.0f} img/s at "
             f"{env['gemm_gflops']:.0f} GFLOP/s)")
    shape = j.get("shape_bound_images_per_sec")
    if shape:
        line += (f", JAX at {_of(j['train_images_per_sec'], shape)}, torch at "
                 f"{_of(t['train_images_per_sec'], shape)} of the shape bound ({shape:,.0f} "
                 "img/s)")
    return line


def _of(rate: float, bound: float) -> str:
    return f"{100 * rate / bound:.0f}%"


def summary(results: list[dict[str, Any]], env: dict[str, Any],
            rounds: list[list[dict[str, Any]]] | None = None) -> list[str]:
    """The headline per (spec, width, batch): the same-math tier (stock kernels, jit vs eager)
    and the tuned tier (each framework's fastest variant), with the range of the ratios measured
    within each round when there are several."""
    lines = []
    ok = [r for r in results if "error" not in r]
    for spec in dict.fromkeys(r["spec"] for r in ok):
        for width in sorted({r["width"] for r in ok}):
            for b in sorted({r["batch_size"] for r in ok}):
                same = _tier_line("", ok, rounds, spec, width, b, True, env)
                tuned = _tier_line("", ok, rounds, spec, width, b, False, env)
                where = f"{spec}, width {width:g}, batch {b}"
                if same:
                    lines.append(f"{where}, same-math tier{same}")
                if tuned and tuned != same:
                    lines.append(f"{where}, tuned tier{tuned}")
                elif tuned:  # the fastest variants are the same-math ones: nothing tuned ran
                    lines.append(f"{where}, tuned tier: the same variants (no faster variant "
                                 "was measured)")
                mixed = _tier_line("", ok, rounds, spec, width, b, False, env, "bfloat16")
                if mixed:
                    lines.append(f"{where}, mixed-precision tier (bfloat16){mixed}"
                                 f"{_against_float32(ok, spec, width, b)}")
    return lines


def _against_float32(results: list[dict[str, Any]], spec: str, width: float, batch: int) -> str:
    """Each framework's fastest bfloat16 variant against its fastest float32 one."""
    parts = []
    for fw, name in (("jax", "JAX"), ("torch", "torch")):
        low = _pick(results, spec, width, batch, fw, None, "bfloat16")
        full = _pick(results, spec, width, batch, fw, None, "float32")
        if low and full:
            ratio = low["train_images_per_sec"] / full["train_images_per_sec"]
            parts.append(f"{name} {ratio:.2f}×")
    return f"; bfloat16 against each one's fastest float32: {', '.join(parts)}" if parts else ""


def merge_rounds(rounds: list[list[dict[str, Any]]], variants: list[str],
                 precisions: list[str] | None = None) -> list[dict[str, Any]]:
    """One result per (spec, width, batch, variant, precision): the round whose training
    throughput is the median of the rounds', with min and max over every round's repeats and
    each round's median under ``rounds``."""
    if len(rounds) == 1:
        return rounds[0]
    merged = []
    specs = list(dict.fromkeys(r["spec"] for r in rounds[0]))
    order = precisions or ["float32"]
    key = lambda r: (specs.index(r["spec"]), r["width"], r["batch_size"],  # noqa: E731
                     variants.index(r["variant"]), order.index(precision_of(r)))
    for first in sorted(rounds[0], key=key):
        same = [r for rs in rounds for r in rs if key(r) == key(first)]
        ok = sorted((r for r in same if "error" not in r),
                    key=lambda r: r["train_images_per_sec"])
        if not ok:
            merged.append(same[0])
            continue
        result = dict(ok[(len(ok) - 1) // 2])
        result["train_images_per_sec_min"] = min(r["train_images_per_sec_min"] for r in ok)
        result["train_images_per_sec_max"] = max(r["train_images_per_sec_max"] for r in ok)
        result["rounds"] = [r["train_images_per_sec"] for r in same if "error" not in r]
        merged.append(result)
    return merged


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Bar chart: training and inference throughput per variant and batch size, one row of
    two panels per spec."""
    # matplotlib takes a second to import: only when a chart is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    widths = sorted({r["width"] for r in ok})
    width = 1.0 if 1.0 in widths else widths[0]
    ok = [r for r in ok if r["width"] == width]
    specs = list(dict.fromkeys(r["spec"] for r in ok))
    variants = list(dict.fromkeys((r["variant"], precision_of(r)) for r in ok))
    batches = sorted({r["batch_size"] for r in ok})
    fig, axes = plt.subplots(len(specs), 2, figsize=(13, 5 * len(specs)), squeeze=False)
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(variants), 2)))
    bar_w = 0.8 / max(len(variants), 1)
    for row, spec in zip(axes, specs, strict=True):
        mine = [r for r in ok if r["spec"] == spec]
        for ax, key, title in ((row[0], "train_images_per_sec", "training"),
                               (row[1], "infer_images_per_sec", "inference")):
            for k, (v, p) in enumerate(variants):
                values = [next((r[key] for r in mine if r["variant"] == v
                                and precision_of(r) == p and r["batch_size"] == b), 0)
                          for b in batches]
                ax.bar(np.arange(len(batches)) + k * bar_w, values, bar_w,
                       label=v if p == "float32" else f"{v} {p}", color=colors[k])
            ax.set_xticks(np.arange(len(batches)) + bar_w * (len(variants) - 1) / 2)
            ax.set_xticklabels([str(b) for b in batches])
            ax.set_xlabel("batch size")
            ax.set_ylabel("images / s (median)")
            ax.set_yscale("log")
            ax.set_title(f"{title}, {spec}")
            ax.grid(axis="y", alpha=0.3)
    # one legend for all panels, below them, so that no bar hides behind it
    handles, labels = axes[0][0].get_legend_handles_labels()
    rows = -(-len(labels) // 4)
    legend_h = 0.25 * rows + 0.2
    fig.set_size_inches(13, 5 * len(specs) + legend_h)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_h / fig.get_figheight(), 1, 1))
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    atomic_write_bytes(path, png.getvalue())


def merge_populations(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One record per (spec, batch, population, variant): the median over rounds of the
    member-images/s, with every round's value."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for results in rounds:
        for r in results:
            key = (r["spec"], r["batch_size"], r["population"], r["variant"])
            groups.setdefault(key, []).append(r)
    merged = []
    for rs in groups.values():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            merged.append(rs[0])
            continue
        rates = [r["train_images_per_sec"] for r in ok]
        merged.append({**ok[0], "train_images_per_sec": statistics.median(rates),
                       "rounds_images_per_sec": rates})
    return merged


def population_table(results: list[dict[str, Any]], env: dict[str, Any] | None = None) -> str:
    """Markdown: member-images/s of every population size, and the time a population takes
    against as many separate runs (the rate at population 1 over the rate at P)."""
    sizes = sorted({r["population"] for r in results})
    lines = ["| spec | batch | variant | " + " | ".join(f"P = {p}" for p in sizes) + " |",
             "| --- | ---: | --- |" + " ---: |" * len(sizes)]
    keys = sorted({(r["spec"], r["batch_size"], r["variant"]) for r in results})
    for spec, batch, variant in keys:
        row = {r["population"]: r for r in results
               if (r["spec"], r["batch_size"], r["variant"]) == (spec, batch, variant)}
        single = row.get(1, {}).get("train_images_per_sec")
        cells = []
        for p in sizes:
            r = row.get(p)
            if r is None or "error" in r:
                cells.append("failed" if r else "—")
                continue
            rate = r["train_images_per_sec"]
            cells.append(f"{rate:,.0f}" + (f" ({single / rate:.2f}×)" if single and p > 1
                                            else ""))
        lines.append(f"| `{spec}` | {batch} | {variant} | " + " | ".join(cells) + " |")
    note = ("member-images/s (median over rounds); in brackets the time of the population "
            "against as many separate runs of population 1 (< 1: the population is faster)")
    if env:
        note += f"; {env['cpu']}, {env['cores']} cores"
    return "\n".join(lines) + "\n\n" + note
