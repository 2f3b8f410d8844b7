"""``python -m bench`` as a smoke test: it runs, and its outputs have what they promise.
No timing is asserted (performance is reported by the benchmark, not tested)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import SLOW

from bench.__main__ import QUICK, SPECS

FIELDS = ("spec", "framework", "kernels", "mode", "variant", "batch_size", "train_images_per_sec",
          "infer_images_per_sec", "latency_ms", "compile_s", "peak_rss_mb", "threads", "repeats")
ENV = ("cpu", "cores", "python", "jax", "jaxlib", "flax", "optax", "torch", "gemm_gflops",
       "env_vars")


def _bench(*args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@SLOW
def test_bench_quick_covers_both_tiers(tmp_path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    specs = SPECS[:1]  # one spec: the others take the same paths
    res = _bench("--quick", "--spec", ",".join(specs), "--json", str(out), "--plot", str(png))
    data = json.loads(out.read_text())
    assert all(data["env"].get(k) is not None for k in ENV), data["env"]
    assert [(r["spec"], r["variant"]) for r in data["results"]] == [
        (spec, v) for spec in specs for v in QUICK]
    for r in data["results"]:
        assert "error" not in r, r
        assert all(k in r for k in FIELDS), r
        assert r["batch_size"] == 128 and r["repeats"] >= 5
        assert r["train_images_per_sec_min"] <= r["train_images_per_sec"] \
            <= r["train_images_per_sec_max"]
        assert r["train_images_per_sec"] > 0 and r["latency_ms"] > 0
        assert r["shape_bound_images_per_sec"] > 0
        framework, kernels, mode = r["variant"].split("-", 2)
        row = f"| {r['spec']} | {framework} | {kernels} | {mode} | float32 | 1 | 128 |"
        assert row in res.stdout
    for spec in specs:
        assert f"\n{spec}, width 1, batch 128, same-math tier: JAX (stock, jit)" in res.stdout
        assert f"\n{spec}, width 1, batch 128, tuned tier: JAX (" in res.stdout
    assert "vs torch (stock, eager)" in res.stdout
    assert "of the GEMM bound" in res.stdout and "of the shape bound (" in res.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shape_bound_lists_every_product_of_the_step() -> None:
    """The shape bound's products: forward and weight gradient of every conv and linear, the
    input gradient of all but the first, at their real shapes (convs as patches × kernel, one
    product per group); their FLOPs are 6 × MACs per image less the first layer's input
    gradient; each product is timed (a positive time)."""
    from bench.bound import bound, products
    from lenet_spec import PRESETS, Conv, Flatten, Linear, Spec

    spec = PRESETS["lenet5"]
    rows = products(spec, 8)
    assert len(rows) == 5 * 3 - 1
    assert rows[0] == ("conv1 forward", (1, 8 * 28 * 28, 25, 6))
    assert rows[1] == ("conv1 weight gradient", (1, 25, 8 * 28 * 28, 6))
    assert ("conv2 input gradient", (1, 8 * 10 * 10, 16, 150)) in rows
    first = spec.infos[0].macs
    flops = sum(2 * g * m * k * n for _, (g, m, k, n) in rows)
    assert flops == 8 * (6 * spec.macs - 2 * first)
    grouped = Spec("g", (4, 6, 6), (Conv(6, 3, groups=2), Flatten(), Linear(2)))
    assert products(grouped, 2)[0] == ("conv1 forward", (2, 2 * 16, 18, 3))
    small = bound(grouped, 2)
    assert small["step_s"] > 0 and all(r["seconds"] > 0 for r in small["products"])
    assert small["images_per_sec"] == pytest.approx(2 / small["step_s"])


def test_bench_rejects_bad_flags() -> None:
    for args, message in ((["--variants", "jax-pmap"], "unknown variant(s) ['jax-pmap']"),
                          (["--kernels", "fast"], "expected stock and/or fused, got 'fast'"),
                          (["--repeats", "2"], "--repeats must be at least 5")):
        res = subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True,
                             text=True)
        assert res.returncode == 2 and message in res.stderr, res.stderr


@SLOW
def test_time_to_accuracy_mlperf_style(tmp_path, mnist_dir) -> None:
    """Three seeds per program: the fastest and slowest dropped, mean and range of the rest,
    whole command and training-only."""
    out = tmp_path / "tta.json"
    res = _bench("--time-to-accuracy", "0.5", "--seeds", "3", "--train-args",
                 f"--train-size 2560 --epochs 2 --data-dir {mnist_dir}", "--json", str(out))
    tta = json.loads(out.read_text())["time_to_accuracy"]
    assert [(r["framework"], r["seed"]) for r in tta["runs"]] == [
        ("jax", 0), ("torch", 0), ("torch", 1), ("jax", 1), ("jax", 2), ("torch", 2)]
    for r in tta["runs"]:  # 2,560 images reach 50% test accuracy in an epoch or two
        assert r["seconds"] is not None and 0 < r["train_seconds"] < r["seconds"], r
        assert r["best_accuracy"] >= 0.5 and 1 <= r["epochs"] <= 2
    for framework, s in tta["summary"].items():
        assert s["runs"] == s["reached"] == 3 and len(s["kept_seeds"]) == 1
        kept = [r for r in tta["runs"] if r["framework"] == framework]
        times = sorted(r["seconds"] for r in kept)
        assert s["seconds"]["mean"] == times[1]  # the middle of three
        assert f"{framework}: test accuracy ≥ 0.5 reached in 3 of 3 runs" in res.stdout


def test_time_to_accuracy_stops_at_a_programs_error(tmp_path) -> None:
    """A program that fails (here: no data) ends the benchmark with its error, not with
    "not reached" lines and exit status 0."""
    res = subprocess.run([sys.executable, "-m", "bench", "--time-to-accuracy", "0.9",
                          "--train-args", f"--data-dir {tmp_path}"], capture_output=True,
                         text=True)
    assert res.returncode == 1, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: python -m lenet_") and "no MNIST train files" in last, last
    assert "not reached" not in res.stderr + res.stdout


def test_a_killed_benchmark_takes_its_workers_with_it(tmp_path) -> None:
    """The benchmark's children are killed with it (PR_SET_PDEATHSIG on Linux)."""
    import os
    import signal
    import time

    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    code = ("import subprocess, sys, time\n"
            "from bench.programs import die_with_parent\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
            "preexec_fn=die_with_parent)\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(3000):  # the kernel signals it as the parent exits; allow for a busy machine
        try:
            state = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":  # dead, not yet reaped by its new parent
            break
        time.sleep(0.01)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the worker outlived the benchmark")


def test_mlperf_summary_counts_a_missed_target_as_slowest() -> None:
    from bench.programs import mlperf_summary

    runs = [{"seed": s, "seconds": t, "train_seconds": t and t / 2, "accuracy": 0.99}
            for s, t in enumerate([5.0, None, 3.0, 4.0, 9.0])]
    s = mlperf_summary(runs)
    assert s["reached"] == 4 and s["kept_seeds"] == [3, 0, 4]
    assert s["seconds"] == {"mean": 6.0, "min": 4.0, "max": 9.0}


@SLOW
def test_startup_measures_whole_commands_and_phases(tmp_path, mnist_dir) -> None:
    out = tmp_path / "startup.json"
    res = _bench("--startup", "1", "--train-args", f"--data-dir {mnist_dir}", "--json", str(out))
    s = json.loads(out.read_text())["startup"]
    assert {k: len(v) for k, v in s["whole_s"].items()} == {"jax-cold": 1, "jax": 1, "torch": 1}
    for phases in s["phases_s"].values():
        assert list(phases) == ["imports", "data", "build", "first_step", "evaluate",
                                "files"]
        assert all(v > 0 for v in phases.values())
    assert "one-step command, median of 1: JAX" in res.stdout


def test_rounds_merge_to_medians_and_report_each_rounds_ratio() -> None:
    """Interleaved rounds: each (variant, batch) keeps the round with the median throughput,
    min/max over all rounds, and the summary gives both tiers with the range of ratios within
    rounds."""
    from bench.report import merge_rounds, summary

    def result(variant: str, rate: float) -> dict:
        framework, kernels, mode = variant.split("-", 2)
        return {"spec": "lenet5", "framework": framework, "kernels": kernels, "mode": mode,
                "variant": variant, "width": 1.0, "batch_size": 128, "train_images_per_sec": rate,
                "train_images_per_sec_min": rate - 1, "train_images_per_sec_max": rate + 1,
                "train_flops_per_image": 2.5e6}

    names = ["jax-stock-jit", "jax-fused-scan", "torch-stock-eager"]
    rounds = [[result(n, v) for n, v in zip(names, values, strict=True)]
              for values in ((10.0, 20.0, 10.0), (12.0, 30.0, 10.0), (11.0, 25.0, 20.0))]
    merged = merge_rounds(rounds, names)
    assert [(r["variant"], r["train_images_per_sec"]) for r in merged] == \
        [("jax-stock-jit", 11.0), ("jax-fused-scan", 25.0), ("torch-stock-eager", 10.0)]
    assert merged[1]["rounds"] == [20.0, 30.0, 25.0]
    assert (merged[1]["train_images_per_sec_min"], merged[1]["train_images_per_sec_max"]) == \
        (19.0, 31.0)
    same, tuned = summary(merged, {"gemm_gflops": 1.0}, rounds)
    assert "same-math tier: JAX (stock, jit) 11 img/s vs torch (stock, eager) 10 img/s = 1.10×" \
        in same and "within each of 3 rounds: 0.55–1.20×, median 1.00×" in same
    assert "tuned tier: JAX (fused, scan) 25 img/s" in tuned and "= 2.50×" in tuned
    assert "within each of 3 rounds: 1.25–3.00×, median 2.00×" in tuned


def test_the_mixed_precision_tier_stands_beside_the_float32_tiers() -> None:
    """--precision float32,bfloat16: each (variant, precision) merged on its own; the third tier
    compares the fastest bfloat16 variants and each against its framework's fastest float32;
    torch's fused kernels are left out below float32."""
    from bench.__main__ import _at_precisions
    from bench.report import merge_rounds, summary, table

    def result(variant: str, precision: str, rate: float) -> dict:
        framework, kernels, mode = variant.split("-", 2)
        return {"spec": "lenet5", "framework": framework, "kernels": kernels, "mode": mode,
                "variant": variant, "precision": precision, "width": 1.0, "batch_size": 128,
                "train_images_per_sec": rate, "train_images_per_sec_min": rate,
                "train_images_per_sec_max": rate, "train_flops_per_image": 2.5e6,
                "infer_images_per_sec": rate, "latency_ms": 1.0, "compile_s": 1.0,
                "threads": 2, "peak_rss_mb": 1.0}

    names = ["jax-fused-jit", "torch-stock-eager", "torch-fused-eager"]
    assert _at_precisions(names, ["float32", "bfloat16"]) == [
        ("jax-fused-jit", "float32"), ("jax-fused-jit", "bfloat16"),
        ("torch-stock-eager", "float32"), ("torch-stock-eager", "bfloat16"),
        ("torch-fused-eager", "float32")]
    rates = {("jax-fused-jit", "float32"): 100.0, ("jax-fused-jit", "bfloat16"): 80.0,
             ("torch-stock-eager", "float32"): 50.0, ("torch-stock-eager", "bfloat16"): 100.0,
             ("torch-fused-eager", "float32"): 40.0}
    rounds = [[result(v, p, rate * k) for (v, p), rate in rates.items()] for k in (1, 2, 3)]
    merged = merge_rounds(rounds, names, ["float32", "bfloat16"])
    assert [(r["variant"], r["precision"], r["train_images_per_sec"]) for r in merged] == [
        (v, p, 2 * rate) for (v, p), rate in rates.items()]
    lines = summary(merged, {"gemm_gflops": 1.0}, rounds)
    mixed = [line for line in lines if "mixed-precision tier (bfloat16)" in line]
    assert len(mixed) == 1
    assert "JAX (fused, jit) 160 img/s vs torch (stock, eager) 200 img/s = 0.80×" in mixed[0]
    assert mixed[0].endswith("bfloat16 against each one's fastest float32: JAX 0.80×, "
                             "torch 2.00×")
    assert any("tuned tier: JAX (fused, jit) 200 img/s" in line and "= 2.00×" in line
               for line in lines)
    assert "| jax | fused | jit | bfloat16 | 1 | 128 |" in table(merged)


@SLOW
def test_bench_population_mode(tmp_path) -> None:
    out = tmp_path / "population.json"
    res = _bench("--population", "1,2", "--spec", "lenet5", "--images", "640", "--variants",
                 "jax-fused-scan,torch-stock-eager", "--json", str(out))
    records = json.loads(out.read_text())["population"]
    assert {(r["variant"], r["population"]) for r in records} == {
        (v, p) for v in ("jax-fused-scan", "torch-stock-eager") for p in (1, 2)}
    assert all(r["train_images_per_sec"] > 0 for r in records)
    assert "P = 2" in res.stdout and "×)" in res.stdout


def test_population_command_times_one_population_against_separate_commands(
        monkeypatch) -> None:
    """``--population-command P``: per framework and round one ``--seeds P`` command and the P
    ``--seed S`` commands, the frameworks and the two ways alternating between rounds; the
    lines give the medians and each round's ratio."""
    from bench import programs
    from bench.__main__ import _population_command_lines

    calls: list[tuple[str, list[str]]] = []
    took = {"jax": {"--seeds": 30.0, "--seed": 5.0}, "torch": {"--seeds": 50.0, "--seed": 7.0}}

    def fake(framework: str, flags: list[str], extra: list[str], timeout: float) -> float:
        assert extra == ["--epochs", "1"]
        calls.append((framework, flags))
        return took[framework][flags[0]] + len(calls) / 1000

    monkeypatch.setattr(programs, "_timed_command", fake)
    out = programs.population_commands(3, 2, ["--epochs", "1"], 60.0)
    assert calls[:4] == [("jax", ["--seeds", "3"]), *(("jax", ["--seed", str(s)])
                                                      for s in range(3))]
    assert [c for c in calls if c[0] == "torch"][0] == ("torch", ["--seeds", "3"])
    assert calls[8] == ("torch", ["--seed", "0"])  # round 2: torch first, separate first
    assert len(calls) == 2 * 2 * (1 + 3)
    jax = out["seconds"]["jax"]
    assert len(jax["population"]) == 2 and jax["separate"][0] == pytest.approx(15.0, abs=0.1)
    lines = _population_command_lines(out)
    assert lines[0].startswith("jax: --seeds 3 30.0 s, 3 separate commands 15.0 s")
    assert "population / separate 2.00" in lines[0]
    assert lines[1].startswith("torch: --seeds 3 50.0 s, 3 separate commands 21.0 s")
