"""``python -m bench`` as a smoke test: it runs, and its outputs have what they promise.
No timing is asserted (performance is reported by the benchmark, not tested)."""

from __future__ import annotations

import json
import subprocess
import sys

from bench.__main__ import VARIANTS

FIELDS = ("framework", "variant", "batch_size", "train_images_per_sec", "infer_images_per_sec",
          "latency_ms", "compile_s", "peak_rss_mb", "repeats")
ENV = ("cpu", "cores", "python", "jax", "jaxlib", "flax", "optax", "torch", "gemm_gflops")


def test_bench_quick(tmp_path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    res = subprocess.run([sys.executable, "-m", "bench", "--quick", "--json", str(out),
                          "--plot", str(png)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert all(data["env"].get(k) is not None for k in ENV), data["env"]
    assert [r["variant"] for r in data["results"]] == list(VARIANTS)
    for r in data["results"]:
        assert "error" not in r, r
        assert all(k in r for k in FIELDS), r
        assert r["batch_size"] == 128 and r["repeats"] >= 5
        assert r["train_images_per_sec_min"] <= r["train_images_per_sec"] \
            <= r["train_images_per_sec_max"]
        assert r["train_images_per_sec"] > 0 and r["latency_ms"] > 0
    for variant in VARIANTS:
        assert f"| {variant} | 1 | 128 |" in res.stdout
    assert "width 1, batch 128: best JAX" in res.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_bad_flags() -> None:
    res = subprocess.run([sys.executable, "-m", "bench", "--variants", "jax-pmap"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "unknown variant(s) ['jax-pmap']" in res.stderr


def test_time_to_accuracy(tmp_path, mnist_dir) -> None:
    out = tmp_path / "tta.json"
    res = subprocess.run([sys.executable, "-m", "bench", "--time-to-accuracy", "0.5",
                          "--train-args", f"--train-size 2560 --epochs 2 --data-dir {mnist_dir}",
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(out.read_text())["time_to_accuracy"]
    assert [r["framework"] for r in results] == ["jax", "torch"]
    for r in results:  # 2,560 images reach 50% test accuracy in an epoch or two
        assert r["seconds"] is not None and r["seconds"] > 0, r
        assert r["best_accuracy"] >= 0.5 and 1 <= r["epochs"] <= 2


def test_rounds_merge_to_medians_and_report_each_rounds_ratio() -> None:
    """Interleaved rounds: each (variant, batch) keeps the round with the median throughput,
    min/max over all rounds, and the summary gives the range of ratios within rounds."""
    from bench.__main__ import merge_rounds, summary

    def result(variant: str, rate: float) -> dict:
        return {"framework": variant.split("-")[0], "variant": variant, "width": 1.0,
                "batch_size": 128, "train_images_per_sec": rate,
                "train_images_per_sec_min": rate - 1, "train_images_per_sec_max": rate + 1,
                "train_flops_per_image": 2.5e6}

    rounds = [[result("jax-jit", j), result("torch-eager", t)]
              for j, t in ((20.0, 10.0), (30.0, 10.0), (25.0, 20.0))]
    merged = merge_rounds(rounds, ["jax-jit", "torch-eager"])
    assert [(r["variant"], r["train_images_per_sec"]) for r in merged] == \
        [("jax-jit", 25.0), ("torch-eager", 10.0)]
    assert merged[0]["rounds"] == [20.0, 30.0, 25.0]
    assert (merged[0]["train_images_per_sec_min"], merged[0]["train_images_per_sec_max"]) == \
        (19.0, 31.0)
    (line,) = summary(merged, {"gemm_gflops": 1.0}, rounds)
    assert "= 2.50×" in line and "within each of 3 rounds: 1.25–3.00×, median 2.00×" in line
