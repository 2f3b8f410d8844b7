"""``python -m bench``: JAX and PyTorch training and inference of a spec'd LeNet, side by side.

Every (variant, batch size, width) is measured in its own subprocess (``bench.worker``) so
thread pools and allocators do not interfere; same spec, batch, dtype (float32) and thread
count for every variant; data already in memory / on the device; warm-up reported apart; at
least 5 timed repeats, reported as median, min and max. ``--time-to-accuracy`` runs the real
training programs on MNIST instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from lenet_spec.atomic import atomic_write_bytes
from lenet_train.runlog import read_jsonl

VARIANTS = ("jax-jit", "jax-scan", "torch-eager", "torch-compile")
PROGRAMS = {"jax": "lenet_jax.train", "torch": "lenet_torch.train"}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _variants(text: str) -> list[str]:
    names = [v for v in text.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown}; choose from "
                                         f"{', '.join(VARIANTS)}")
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--spec", default="lenet5", help="preset name or path to a JSON spec")
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 32, 128, 512])
    p.add_argument("--widths", type=_float_list, default=[1.0],
                   help="width multipliers of the spec's channels and features")
    p.add_argument("--variants", type=_variants, default=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (at least 5)")
    p.add_argument("--images", type=int, default=12_800,
                   help="images per timed repeat (steps = images / batch, 5 to 2,000)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="threads for every variant (torch.set_num_threads; XLA uses all cores)")
    p.add_argument("--quick", action="store_true",
                   help="batch 128 only and fewer images per repeat (a smoke run, < 2 min)")
    p.add_argument("--json", type=Path, default=None, help="write {env, results} here")
    p.add_argument("--plot", type=Path, default=None, help="bar chart of throughput (PNG)")
    p.add_argument("--time-to-accuracy", type=float, default=None, metavar="ACC",
                   help="instead: wall time of the real training programs to reach ACC")
    p.add_argument("--train-args", default="",
                   help="extra flags for the training programs (with --time-to-accuracy)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure everything this many times, interleaved (each round in a "
                        "rotated variant order), and report medians over the rounds and the "
                        "ratios of each round: this machine's speed drifts over minutes")
    return p


def gemm_gflops() -> float:
    """The machine's float32 matrix-multiply rate (numpy's BLAS, all cores, best of 5)."""
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(5))
    return 2 * 2048**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def environment() -> dict[str, Any]:
    """CPU, cores, device and library versions of this machine."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "platform": platform.platform(), **versions, "gemm_gflops": gemm_gflops()}


def measure(config: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One worker subprocess's result, or a record of its failure."""
    env = dict(os.environ, OMP_NUM_THREADS=str(config["threads"]))
    try:
        res = subprocess.run([sys.executable, "-m", "bench.worker", json.dumps(config)],
                             capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**config, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    if res.returncode != 0 or not lines:
        return {**config, "error": res.stderr.strip().splitlines()[-1] if res.stderr.strip()
                else f"exit status {res.returncode}"}
    return json.loads(lines[-1])


def _fmt(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def table(results: list[dict[str, Any]]) -> str:
    """The results as a markdown table."""
    rows = ["| variant | width | batch | train img/s (median [min, max]) | infer img/s | "
            "batch-1 latency ms | warm-up s | peak RSS MB |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['variant']} | {r.get('width', 1):g} | {r['batch_size']} | "
                        f"failed: {r['error']} | | | | |")
            continue
        rows.append(
            f"| {r['variant']} | {r['width']:g} | {r['batch_size']} | "
            f"{_fmt(r['train_images_per_sec'])} [{_fmt(r['train_images_per_sec_min'])}, "
            f"{_fmt(r['train_images_per_sec_max'])}] | {_fmt(r['infer_images_per_sec'])} | "
            f"{_fmt(r['latency_ms'], 3)} | {_fmt(r['compile_s'], 1)} | {_fmt(r['peak_rss_mb'])} |")
    return "\n".join(rows)


def _best(results: list[dict[str, Any]], width: float, batch: int, framework: str):
    group = [r for r in results if "error" not in r and r["width"] == width
             and r["batch_size"] == batch and r["framework"] == framework]
    return max(group, key=lambda r: r["train_images_per_sec"], default=None)


def summary(results: list[dict[str, Any]], env: dict[str, Any],
            rounds: list[list[dict[str, Any]]] | None = None) -> list[str]:
    """The headline ratios: best JAX over best torch per (width, batch), and the GEMM bound;
    with several rounds, also the range of the ratios measured within each round."""
    lines = []
    ok = [r for r in results if "error" not in r]
    for width in sorted({r["width"] for r in ok}):
        for b in sorted({r["batch_size"] for r in ok}):
            j, t = _best(ok, width, b, "jax"), _best(ok, width, b, "torch")
            if not (j and t):
                continue
            bound = env["gemm_gflops"] * 1e9 / j["train_flops_per_image"]
            line = (f"width {width:g}, batch {b}: best JAX ({j['variant']}) "
                    f"{j['train_images_per_sec']:,.0f} img/s vs best torch ({t['variant']}) "
                    f"{t['train_images_per_sec']:,.0f} img/s = "
                    f"{j['train_images_per_sec'] / t['train_images_per_sec']:.2f}×")
            ratios = [pj["train_images_per_sec"] / pt["train_images_per_sec"]
                      for rs in rounds or [] for pj, pt in [(_best(rs, width, b, "jax"),
                                                              _best(rs, width, b, "torch"))]
                      if pj and pt]
            if len(ratios) > 1:
                line += (f" (within each of {len(ratios)} rounds: {min(ratios):.2f}–"
                         f"{max(ratios):.2f}×, median {float(np.median(ratios)):.2f}×)")
            lines.append(f"{line}; JAX at {100 * j['train_images_per_sec'] / bound:.0f}% of the "
                         f"GEMM bound ({bound:,.0f} img/s at {env['gemm_gflops']:.0f} GFLOP/s)")
    return lines


def merge_rounds(rounds: list[list[dict[str, Any]]], variants: list[str]) -> list[dict[str, Any]]:
    """One result per (width, batch, variant): the round whose training throughput is the
    median of the rounds', with min and max over every round's repeats and each round's median
    under ``rounds``."""
    if len(rounds) == 1:
        return rounds[0]
    merged = []
    key = lambda r: (r["width"], r["batch_size"], variants.index(r["variant"]))  # noqa: E731
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
    """Bar chart: training and inference throughput per variant and batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    widths = sorted({r["width"] for r in ok})
    width = 1.0 if 1.0 in widths else widths[0]
    ok = [r for r in ok if r["width"] == width]
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in ok)]
    batches = sorted({r["batch_size"] for r in ok})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "train_images_per_sec", "training"),
                           (axes[1], "infer_images_per_sec", "inference")):
        bar_w = 0.8 / max(len(variants), 1)
        for k, v in enumerate(variants):
            values = [next((r[key] for r in ok if r["variant"] == v and r["batch_size"] == b), 0)
                      for b in batches]
            ax.bar(np.arange(len(batches)) + k * bar_w, values, bar_w, label=v)
        ax.set_xticks(np.arange(len(batches)) + bar_w * (len(variants) - 1) / 2)
        ax.set_xticklabels([str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s (median)")
        ax.set_yscale("log")
        ax.set_title(f"{title}, {ok[0]['spec'] if ok else ''}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(suffix=".png", dir=path.parent, delete=False) as f:
        fig.savefig(f.name, dpi=110)
    os.replace(f.name, path)


def time_to_accuracy(target: float, extra: list[str], timeout: float) -> list[dict[str, Any]]:
    """Wall time of each real training program, from launch (imports, data, compilation
    included) to the first epoch whose test accuracy reaches ``target``."""
    results = []
    for framework, module in PROGRAMS.items():
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp) / "run"
            cmd = [sys.executable, "-m", module, "--quiet", "--workdir", str(workdir), *extra]
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
            reached, best, epochs = None, 0.0, 0
            while reached is None and time.perf_counter() - t0 < timeout:
                records = read_jsonl(workdir / "metrics.jsonl") if (
                    workdir / "metrics.jsonl").exists() else []
                epochs = len(records)
                best = max([best, *(r["test_accuracy"] for r in records)])
                hit = [r for r in records if r["test_accuracy"] >= target]
                if hit:
                    reached = time.perf_counter() - t0
                    epochs = hit[0]["epoch"] + 1
                elif proc.poll() is not None:
                    break
                time.sleep(0.02)
            proc.kill()
            proc.wait()
        results.append({"framework": framework, "command": " ".join(cmd[1:3] + extra),
                        "target": target, "seconds": reached, "epochs": epochs,
                        "best_accuracy": best})
    return results


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.repeats < 5:
        parser().error("--repeats must be at least 5")
    if args.rounds < 1:
        parser().error("--rounds must be at least 1")
    env = environment()
    print(f"{env['cpu']}, {env['cores']} cores; jax {env['jax']}, flax {env['flax']}, "
          f"torch {env['torch']}; float32 GEMM {env['gemm_gflops']:.0f} GFLOP/s", flush=True)
    if args.time_to_accuracy is not None:
        results = time_to_accuracy(args.time_to_accuracy, args.train_args.split(), args.timeout)
        for r in results:
            took = "not reached" if r["seconds"] is None else f"{r['seconds']:.1f} s"
            print(f"{r['framework']}: {took} to test accuracy ≥ {r['target']} "
                  f"({r['epochs']} epochs; best {r['best_accuracy']:.4f})")
        out = {"env": env, "time_to_accuracy": results}
    else:
        batches = [128] if args.quick else args.batch_sizes
        images = 2_560 if args.quick else args.images
        rounds: list[list[dict[str, Any]]] = []
        for k in range(args.rounds):
            order = args.variants[k % len(args.variants):] + args.variants[:k % len(args.variants)]
            results = []
            for width in args.widths:
                for batch in batches:
                    for variant in order:
                        config = {"spec": args.spec, "variant": variant, "batch_size": batch,
                                  "width": width, "steps": min(2_000, max(5, images // batch)),
                                  "repeats": args.repeats,
                                  "latency_calls": 50 if args.quick else 200,
                                  "threads": args.threads}
                        r = measure(config, args.timeout)
                        results.append(r)
                        rate = ("failed: " + r["error"]) if "error" in r else (
                            f"{r['train_images_per_sec']:,.0f} img/s train")
                        print(f"  round {k + 1}/{args.rounds} {variant:14s} width {width:g} "
                              f"batch {batch:5d}: {rate}", file=sys.stderr, flush=True)
            rounds.append(results)
        results = merge_rounds(rounds, args.variants)
        print(table(results))
        for line in summary(results, env, rounds):
            print(line)
        out = {"env": env, "results": results}
        if args.plot:
            plot(results, args.plot)
    if args.json:
        atomic_write_bytes(args.json, json.dumps(out, indent=1).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
