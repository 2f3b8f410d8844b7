"""``python -m bench``: JAX and PyTorch training and inference of a spec'd LeNet, side by side, in
two tiers: same math (each framework's own layers in its usual execution mode: a jitted JAX
step, eager torch) and tuned (each framework's fastest variant: kernels × execution mode);
with ``--precision float32,bfloat16`` a third, mixed precision (each framework's fastest
bfloat16 variant), measured beside the float32 ones.

Every (variant, batch size, width) is measured in its own subprocess (``bench.worker``) so
thread pools and allocators do not interfere; same spec, batch, precision, optimizer and
thread count for every variant; data already in memory / on the device; warm-up reported
apart; at least 5 timed repeats, reported as median, min and max; ``--rounds R`` repeats it all
interleaved. ``--time-to-accuracy`` and ``--startup`` measure the real training programs;
``--population`` a population of seeds trained as one program against separate runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from bench import programs, report
from bench.worker import KERNELS, MODES
from lenet_kernels.precision import PRECISIONS
from lenet_spec import SHAPES
from lenet_util import OutputError, atomic_write_bytes, check_output
from lenet_util.cli import Parser

VARIANTS = tuple(f"{fw}-{k}-{m}" for fw, modes in MODES.items() for k in KERNELS for m in modes)
"""Every variant, ``framework-kernels-mode``."""
QUICK = ("jax-stock-jit", "jax-fused-jit", "jax-fused-scan", "torch-stock-eager",
         "torch-fused-eager", "torch-stock-channels-last")
"""``--quick``: both tiers' candidates, without torch.compile's warm-up."""
POPULATION = ("jax-fused-jit", "jax-fused-scan", "torch-stock-eager")
"""``--population``'s default variants: JAX's (one step per call, ``lax.scan``) and torch eager
(``torch.func.vmap``)."""
SPECS = ("lenet5", "lenet5_bn")
"""The specs measured by default: the tutorial's LeNet-5, and with batch norm and dropout."""
ENV_PREFIXES = ("XLA_", "JAX_", "OMP_", "MKL_", "TORCH", "CUDA_VISIBLE", "NVIDIA_TF32")


def _list(kind: type, what: str, ok=lambda v: True):
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not values or not all(ok(v) for v in values):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values

    return parse


def _variants(text: str) -> list[str]:
    names = [v for v in text.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown}; choose from "
                                         f"{', '.join(VARIANTS)}")
    return names


def parser() -> argparse.ArgumentParser:
    p = Parser("python -m bench", __doc__.split("\n\n")[0])
    p.add_argument("--spec", type=_list(str, "preset names or JSON spec paths"),
                   default=list(SPECS), metavar="SPECS",
                   help="preset names or paths to JSON specs, comma-separated")
    p.add_argument("--batch-sizes", type=_list(int, "positive integers", lambda v: v > 0),
                   default=None, metavar="SIZES",
                   help="batch sizes to measure, comma-separated (default: 1,32,128,512; "
                        "with --population: 128)")
    p.add_argument("--widths", type=_list(float, "positive numbers", lambda v: v > 0),
                   default=[1.0], help="width multipliers of the spec's channels and features")
    p.add_argument("--variants", type=_variants, default=None,
                   help="framework-kernels-mode names, comma-separated (default: every one; "
                        f"with --population: {','.join(POPULATION)})")
    p.add_argument("--precision", type=_list(str, "float32, bfloat16 and/or tf32",
                                             lambda v: v in PRECISIONS),
                   default=["float32"], metavar="PRECISIONS",
                   help="precisions to measure each variant at, comma-separated; "
                        "float32,bfloat16: the third tier, mixed precision (torch's fused "
                        "kernels compute in float32 only and are left out at bfloat16); the "
                        "throughput tiers only (--population and the programs' modes: float32 "
                        "unless --train-args says otherwise)")
    p.add_argument("--kernels", type=_list(str, "stock and/or fused", lambda v: v in KERNELS),
                   default=list(KERNELS), help="keep only the variants with these kernels")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (at least 5)")
    p.add_argument("--images", type=int, default=12_800,
                   help="images per timed repeat (steps = images / batch, 5 to 2,000)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="threads for torch (torch.set_num_threads; XLA uses all cores)")
    p.add_argument("--quick", action="store_true",
                   help=f"batch 128 only, fewer images, variants {', '.join(QUICK)}: both "
                        "tiers in a few minutes per spec")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure everything this many times, interleaved (each round in a "
                        "rotated variant order), and report medians over the rounds and the "
                        "ratios of each round: this machine's speed drifts over minutes")
    p.add_argument("--json", type=Path, default=None, help="write {env, results} here")
    p.add_argument("--plot", type=Path, default=None, help="bar chart of throughput (PNG)")
    p.add_argument("--time-to-accuracy", type=float, default=None, metavar="ACC",
                   help="instead: time of the real training programs to test accuracy ACC")
    p.add_argument("--seeds", type=int, default=5,
                   help="with --time-to-accuracy: runs per program (seeds 0 … N-1); of 3 or "
                        "more the fastest and slowest are dropped, as MLPerf does")
    p.add_argument("--startup", type=int, default=None, metavar="R",
                   help="instead: the one-step command of each program R times, and its phases")
    p.add_argument("--population", type=_list(int, "positive integers", lambda v: v > 0),
                   default=None, metavar="SIZES",
                   help="instead: populations of P seeds (each size given) trained as one "
                        "program, in member-images/s, against P separate runs (P = 1); "
                        "e.g. 1,4,16,64")
    p.add_argument("--population-command", type=int, default=None, metavar="P",
                   help="instead: each program training seeds 0 … P-1 with --seeds against P "
                        "separate commands (--seed S), whole commands, --rounds times")
    p.add_argument("--dataset", choices=tuple(SHAPES), default="mnist",
                   help="with --time-to-accuracy or --startup: what the programs train on "
                        "(pass a spec that takes it in --train-args, e.g. \"--spec cifar10_cnn\")")
    p.add_argument("--train-args", default="",
                   help="extra flags for the training programs (--time-to-accuracy, --startup, "
                        "--population-command)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
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
    """CPU, cores, library versions, the environment variables that steer XLA, OpenMP, MKL and
    torch, and the measured GEMM rate."""
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
    variables = {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "load": os.getloadavg()[0],
            "python": platform.python_version(),
            "platform": platform.platform(), **versions, "env_vars": variables,
            "gemm_gflops": gemm_gflops()}


def measure(config: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One worker subprocess's result, or a record of its failure."""
    env = dict(os.environ, OMP_NUM_THREADS=str(config["threads"]))
    try:
        res = subprocess.run([sys.executable, "-m", "bench.worker", json.dumps(config)],
                             capture_output=True, text=True, timeout=timeout, env=env,
                             preexec_fn=programs.die_with_parent)
    except subprocess.TimeoutExpired:
        return {**config, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    if res.returncode != 0 or not lines:
        return {**config, "error": res.stderr.strip().splitlines()[-1] if res.stderr.strip()
                else f"exit status {res.returncode}"}
    return json.loads(lines[-1])


def shape_bound(config: dict[str, Any], timeout: float) -> float | None:
    """The shape bound in images per second (``bench.bound``), or None if it failed."""
    try:
        res = subprocess.run([sys.executable, "-m", "bench.bound", json.dumps(config)],
                             capture_output=True, text=True, timeout=timeout,
                             env=dict(os.environ, OMP_NUM_THREADS=str(config["threads"])),
                             preexec_fn=programs.die_with_parent)
    except subprocess.TimeoutExpired:
        return None
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])["images_per_sec"] if res.returncode == 0 and lines else None


def _variant_config(args: argparse.Namespace, variant: str, **fields: Any) -> dict[str, Any]:
    framework, kernels, mode = variant.split("-", 2)
    return {"framework": framework, "kernels": kernels, "mode": mode, "variant": variant,
            "repeats": args.repeats, "threads": args.threads, **fields}


def _measured(config: dict[str, Any], args: argparse.Namespace, round_k: int, what: str,
              unit: str) -> dict[str, Any]:
    """One measurement, its progress line printed."""
    r = measure(config, args.timeout)
    rate = ("failed: " + r["error"]) if "error" in r else (
        f"{r['train_images_per_sec']:,.0f} {unit} train")
    print(f"  round {round_k + 1}/{args.rounds} {what}: {rate}", file=sys.stderr, flush=True)
    return r


def throughput(args: argparse.Namespace, variants: list[str]) -> dict[str, Any]:
    """Every (width, batch, variant) and the shape bound of each (width, batch), ``--rounds``
    times interleaved; the merged results, each with the median of its shape bounds."""
    batches = [128] if args.quick else (args.batch_sizes or [1, 32, 128, 512])
    images = 2_560 if args.quick else args.images
    rounds: list[list[dict[str, Any]]] = []
    bounds: dict[tuple, list[float]] = {}
    for k in range(args.rounds):
        order = variants[k % len(variants):] + variants[:k % len(variants)]
        results = []
        for spec in args.spec:
            for width in args.widths:
                for batch in batches:
                    b = shape_bound({"spec": spec, "width": width, "batch_size": batch,
                                     "threads": args.threads}, args.timeout)
                    if b:
                        bounds.setdefault((spec, width, batch), []).append(b)
                    for variant, precision in _at_precisions(order, args.precision):
                        config = _variant_config(
                            args, variant, spec=spec, batch_size=batch, width=width,
                            precision=precision, steps=min(2_000, max(5, images // batch)),
                            latency_calls=50 if args.quick else 200)
                        results.append(_measured(
                            config, args, k, f"{spec} {variant:30s} {precision:8s} width "
                            f"{width:g} batch {batch:5d}", "img/s"))
        rounds.append(results)
    _some_measured(rounds)
    merged = report.merge_rounds(rounds, variants, args.precision)
    for r in [*merged, *(r for rs in rounds for r in rs)]:
        measured = bounds.get((r["spec"], r["width"], r["batch_size"]))
        r["shape_bound_images_per_sec"] = float(np.median(measured)) if measured else None
    return {"results": merged, "rounds": rounds}


def _at_precisions(variants: list[str], precisions: list[str]) -> list[tuple[str, str]]:
    """Each variant at each precision, one after the other (the precisions of a variant side by
    side), leaving out torch's fused kernels below float32 (they compute in float32 only)."""
    return [(v, p) for v in variants for p in precisions
            if not (p == "bfloat16" and v.startswith("torch-fused"))]


def populations(args: argparse.Namespace, variants: list[str]) -> list[dict[str, Any]]:
    """Every (spec, batch, population size, variant), ``--rounds`` times interleaved; the
    medians over the rounds."""
    rounds: list[list[dict[str, Any]]] = []
    for k in range(args.rounds):
        order = variants[k % len(variants):] + variants[:k % len(variants)]
        results = []
        for spec in args.spec:
            for batch in args.batch_sizes or [128]:
                for members in args.population:
                    for variant in order:
                        config = _variant_config(
                            args, variant, spec=spec, batch_size=batch, population=members,
                            steps=min(2_000, max(5, args.images // batch // members)))
                        results.append(_measured(
                            config, args, k, f"{spec} {variant:24s} batch {batch} population "
                            f"{members:3d}", "member-img/s"))
        rounds.append(results)
    _some_measured(rounds)
    return report.merge_populations(rounds)


def _some_measured(rounds: list[list[dict[str, Any]]]) -> None:
    """:class:`programs.ProgramFailed` (exit 1) when not one measurement succeeded."""
    records = [r for results in rounds for r in results]
    if records and all("error" in r for r in records):
        raise programs.ProgramFailed(f"every measurement failed ({len(records)}); the first: "
                                     f"{records[0]['variant']}: {records[0]['error']}")


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.repeats < 5:
        p.error("--repeats must be at least 5")
    if args.rounds < 1 or args.seeds < 1:
        p.error("--rounds and --seeds must be at least 1")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        try:
            if path is not None:
                check_output(path)  # before the measurements, not after them
        except OutputError as e:
            p.error(f"{flag}: {e}")
    env = environment()
    print(f"{env['cpu']}, {env['cores']} cores; jax {env['jax']}, flax {env['flax']}, "
          f"torch {env['torch']}; float32 GEMM {env['gemm_gflops']:.0f} GFLOP/s", flush=True)
    if env["load"] >= 0.5 * env["cores"]:
        print(f"warning: the machine is busy (load {env['load']:.1f} on {env['cores']} cores "
              "before the benchmark started): the measurements will be low and noisy, and "
              "torch's default threads collapse when others compete for the cores; measure "
              "on an idle machine", file=sys.stderr, flush=True)
    extra = ["--dataset", args.dataset, *args.train_args.split()]
    try:
        out = _run(args, env, extra, p)
    except programs.ProgramFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        atomic_write_bytes(args.json, json.dumps(out, indent=1).encode())
    return 0


def _run(args: argparse.Namespace, env: dict[str, Any], extra: list[str],
         p: argparse.ArgumentParser) -> dict[str, Any]:
    """What the flags ask for, printed, and its results."""
    if args.time_to_accuracy is not None:
        out = {"env": env, "time_to_accuracy": programs.time_to_accuracy(
            args.time_to_accuracy, args.seeds, extra, args.timeout)}
        for framework, s in out["time_to_accuracy"]["summary"].items():
            print(_tta_line(framework, args.time_to_accuracy, s))
    elif args.population is not None:
        names = args.variants or list(POPULATION)
        out = {"env": env, "population": populations(args, names)}
        print(report.population_table(out["population"], env))
    elif args.population_command is not None:
        if args.population_command < 1:
            p.error("--population-command must be at least 1")
        out = {"env": env, "population_command": programs.population_commands(
            args.population_command, args.rounds, extra, args.timeout)}
        for line in _population_command_lines(out["population_command"]):
            print(line)
    elif args.startup is not None:
        out = {"env": env, "startup": programs.startup(args.startup, extra, args.timeout)}
        for line in _startup_lines(out["startup"]):
            print(line)
    else:
        variants = [v for v in (QUICK if args.quick else args.variants or VARIANTS)
                    if v.split("-")[1] in args.kernels]
        if not variants:
            p.error("no variant left with those --kernels")
        measured = throughput(args, variants)
        print(report.table(measured["results"], env))
        for line in report.summary(measured["results"], env, measured["rounds"]):
            print(line)
        out = {"env": env, "results": measured["results"]}
        if args.plot:
            report.plot(measured["results"], args.plot)
    return out


def _tta_line(framework: str, target: float, s: dict[str, Any]) -> str:
    head = f"{framework}: test accuracy ≥ {target} reached in {s['reached']} of {s['runs']} runs"
    if "seconds" not in s:
        return head + "; too few to summarise"
    w, t = s["seconds"], s["train_seconds"]
    return (f"{head}; seeds {s['kept_seeds']} (fastest and slowest dropped): whole command "
            f"{w['mean']:.1f} s [{w['min']:.1f}, {w['max']:.1f}], training-only {t['mean']:.1f} s "
            f"[{t['min']:.1f}, {t['max']:.1f}], accuracy {100 * s['accuracy_mean']:.2f}%")


def _population_command_lines(s: dict[str, Any]) -> list[str]:
    p = s["members"]
    lines = []
    for framework, ways in s["seconds"].items():
        pop, sep = (float(np.median(ways[w])) for w in ("population", "separate"))
        ratios = [a / b for a, b in zip(ways["population"], ways["separate"], strict=True)]
        lines.append(f"{framework}: --seeds {p} {pop:.1f} s, {p} separate commands {sep:.1f} s "
                     f"(medians of {len(ratios)}); population / separate "
                     f"{float(np.median(ratios)):.2f} (rounds {min(ratios):.2f}–"
                     f"{max(ratios):.2f})")
    return lines


def _startup_lines(s: dict[str, Any]) -> list[str]:
    med = {k: float(np.median(v)) for k, v in s["whole_s"].items() if v}
    lines = [f"one-step command, median of {len(s['whole_s']['torch'])}: JAX {med['jax']:.2f} s "
             f"(first run, empty compilation cache: {med['jax-cold']:.2f} s), torch "
             f"{med['torch']:.2f} s; JAX / torch {med['jax'] / med['torch']:.2f}; "
             f"python itself {s['python_s']:.2f} s"]
    for framework, phases in s["phases_s"].items():
        lines.append(f"  {framework}: " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
