"""One benchmark measurement in its own process: ``python -m bench.worker '<json config>'``.

Imports only the framework of its variant, builds the spec's model with the variant's kernels
at the configured precision,
runs the training programs' own step (``lenet_jax.train.make_steps`` /
``lenet_torch.train.make_step``) in the variant's execution mode on random data in memory (on
the device), and prints one JSON result line. Clocks stop only after ``block_until_ready`` /
``torch.cuda.synchronize``; warm-up (compilation) is timed separately.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from lenet_kernels import KERNELS as ALL_KERNELS
from lenet_spec import Spec, load_spec, widen

POOL = 4096
"""Random training images held in memory; batches are drawn from them by index."""

MODES = {
    "jax": ("jit", "scan"),
    "torch": ("eager", "channels-last", "compile", "compile-reduce-overhead",
              "compile-max-autotune", "compile-step"),
}
"""Execution modes. JAX: one jitted step per call, or ``lax.scan`` over the repeat's batches.
torch: eager; eager with channels_last tensors; ``torch.compile`` of the model in its three
modes; ``compile-step``: the whole step (forward, backward through compiled autograd, the
optimizer) as one compiled function."""
KERNELS = tuple(k for k in ALL_KERNELS if k != "auto")
"""The kernels the benchmark times (auto is one of them on each framework)."""


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _time_blocks(run_block: Callable[[], None], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_block()
        times.append(time.perf_counter() - t0)
    return times


def _indices(batch: int, steps: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, POOL, size=(steps, batch)).astype(np.int32)


def measure_jax(spec: Spec, kernels: str, mode: str, batch: int, steps: int, repeats: int,
                latency_calls: int, precision: str = "float32") -> dict[str, Any]:
    # a worker imports only the framework it measures
    import jax
    from flax import nnx

    from lenet_jax.loss import loss_fn
    from lenet_jax.model import build
    from lenet_jax.optim import make_tx
    from lenet_jax.trainer import make_steps, split_for_training

    rng = np.random.default_rng(0)
    c, h, w = spec.input_shape
    images = jax.device_put(rng.standard_normal((POOL, h, w, c)).astype(np.float32))
    labels = jax.device_put(rng.integers(0, spec.num_classes, POOL).astype(np.int32))
    graphdef, eval_graphdef, params, stats, rest = split_for_training(
        build(spec, seed=0, kernels=kernels, precision=precision))
    tx = make_tx("adam", 1e-3)
    train_step, train_steps, _ = make_steps(graphdef, eval_graphdef, tx, loss_fn("ce"))
    idx = _indices(batch, steps)
    carry = [(params, stats, tx.init(params))]
    first = np.int32(0)

    if mode == "jit":
        def block() -> None:
            state = carry[0]
            for i in range(steps):
                state, _, _ = train_step(state, rest, images, labels, idx[i], first)
            jax.block_until_ready(state)
            carry[0] = state
    else:  # scan: the whole block of steps in one dispatch
        def block() -> None:
            state, _, _ = train_steps(carry[0], rest, images, labels, idx, first)
            jax.block_until_ready(state)
            carry[0] = state

    t0 = time.perf_counter()
    block()  # compiles
    compile_s = time.perf_counter() - t0
    block()  # one more warm block, untimed
    train = _time_blocks(block, repeats)

    @jax.jit
    def predict(params, stats, x):
        return nnx.merge(eval_graphdef, params, stats, rest)(x)

    params, stats, _ = carry[0]
    x = images[:batch]
    t0 = time.perf_counter()
    jax.block_until_ready(predict(params, stats, x))
    compile_s += time.perf_counter() - t0

    def infer_block() -> None:
        for _ in range(steps):
            out = predict(params, stats, x)
        jax.block_until_ready(out)

    infer_block()
    infer = _time_blocks(infer_block, repeats)
    one = images[:1]
    jax.block_until_ready(predict(params, stats, one))
    latency = []
    for _ in range(latency_calls):
        t0 = time.perf_counter()
        jax.block_until_ready(predict(params, stats, one))
        latency.append(time.perf_counter() - t0)
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    return {
        "train_s": train, "infer_s": infer, "latency_s": latency, "compile_s": compile_s,
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "peak_device_mb": stats["peak_bytes_in_use"] / 2**20 if stats else None,
        "threads": len(os.sched_getaffinity(0)),  # XLA:CPU's pool uses every core
    }


def measure_torch(spec: Spec, kernels: str, mode: str, batch: int, steps: int, repeats: int,
                  latency_calls: int, threads: int | None,
                  precision: str = "float32") -> dict[str, Any]:
    # a worker imports only the framework it measures
    import torch

    from lenet_torch.loss import loss_fn
    from lenet_torch.model import build, pin_precision
    from lenet_torch.optim import make_optimizer
    from lenet_torch.trainer import make_step

    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.standard_normal((POOL, *spec.input_shape))
                              .astype(np.float32)).to(device)
    labels = torch.from_numpy(rng.integers(0, spec.num_classes, POOL)).to(device)
    pin_precision(precision)
    net = build(spec, seed=0, kernels=kernels, precision=precision).to(device)
    if mode == "channels-last":
        net = net.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    compile_mode = {"compile": "default", "compile-reduce-overhead": "reduce-overhead",
                    "compile-max-autotune": "max-autotune", "compile-step": "default"}.get(mode)
    model = torch.compile(net, mode=compile_mode) if compile_mode else net
    opt = make_optimizer(net, "adam", 1e-3)
    step = make_step(net if mode == "compile-step" else model, opt, loss_fn("ce"))
    if mode == "compile-step":
        torch._dynamo.config.compiled_autograd = True
        step = torch.compile(step)
    idx = torch.from_numpy(_indices(batch, steps).astype(np.int64)).to(device)

    def block() -> None:
        for i in range(steps):
            step(images[idx[i]], labels[idx[i]], 1e-3)
        sync()

    t0 = time.perf_counter()
    block()  # compiles (torch.compile modes) / warms the allocator
    compile_s = time.perf_counter() - t0
    block()
    train = _time_blocks(block, repeats)

    model.eval()
    x = images[:batch]

    def infer_block() -> None:
        with torch.inference_mode():
            for _ in range(steps):
                model(x)
        sync()

    t0 = time.perf_counter()
    infer_block()
    compile_s += time.perf_counter() - t0
    infer = _time_blocks(infer_block, repeats)
    one = images[:1]
    latency = []
    with torch.inference_mode():
        model(one)
        sync()
        for _ in range(latency_calls):
            t0 = time.perf_counter()
            model(one)
            sync()
            latency.append(time.perf_counter() - t0)
    return {
        "train_s": train, "infer_s": infer, "latency_s": latency, "compile_s": compile_s,
        "device": (f"cuda:{torch.cuda.get_device_name()}" if device.type == "cuda" else "cpu"),
        "peak_device_mb": (torch.cuda.max_memory_allocated() / 2**20
                           if device.type == "cuda" else None),
        "threads": torch.get_num_threads(),
    }


def measure_population(framework: str, spec: Spec, kernels: str, mode: str, batch: int,
                       steps: int, repeats: int, members: int,
                       threads: int | None) -> dict[str, Any]:
    """Training time of a population of ``members`` seeds (``lenet_jax.population`` /
    ``lenet_torch.population``), each member on its own batches of ``batch``."""
    seeds = list(range(members))
    rng = np.random.default_rng(0)
    c, h, w = spec.input_shape
    x = rng.standard_normal((POOL, h, w, c) if framework == "jax" else (POOL, c, h, w))
    y = rng.integers(0, spec.num_classes, POOL)
    idx = rng.integers(0, POOL, size=(steps, members, batch))
    if framework == "jax":
        import jax  # a worker imports only the framework it measures

        from lenet_jax.population import Population

        pop = Population(spec, seeds, optimizer="adam", lr=1e-3, kernels=kernels)
        images, labels = (jax.device_put(a) for a in (x.astype(np.float32),
                                                      y.astype(np.int32)))
        idx = jax.device_put(idx.astype(np.int32))
        if mode == "jit":
            def block() -> None:
                for i in range(steps):
                    pop.train_step(images, labels, idx[i], 0)
                jax.block_until_ready(pop.state)
        else:
            def block() -> None:
                pop.train_steps(images, labels, idx, 0)
                jax.block_until_ready(pop.state)
        device = f"{jax.devices()[0].platform}"
        used = len(os.sched_getaffinity(0))
    else:
        import torch  # a worker imports only the framework it measures

        from lenet_torch.population import Population as TorchPopulation

        if threads:
            torch.set_num_threads(threads)
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        pop = TorchPopulation(spec, seeds, optimizer="adam", lr=1e-3, device=dev)
        images = torch.from_numpy(x.astype(np.float32)).to(dev)
        labels = torch.from_numpy(y).to(dev)
        idx = torch.from_numpy(idx).to(dev)

        def block() -> None:
            for i in range(steps):
                pop.train_step(images, labels, idx[i], i)
            sync()
        device, used = dev.type, torch.get_num_threads()
    t0 = time.perf_counter()
    block()  # compiles / warms the allocator
    compile_s = time.perf_counter() - t0
    block()
    return {"train_s": _time_blocks(block, repeats), "compile_s": compile_s, "device": device,
            "threads": used}


def _population_result(config: dict[str, Any], spec: Spec) -> dict[str, Any]:
    framework, kernels, mode = config["framework"], config["kernels"], config["mode"]
    batch, steps, members = config["batch_size"], config["steps"], config["population"]
    if (framework, mode) not in (("jax", "jit"), ("jax", "scan"), ("torch", "eager")) or (
            framework == "torch" and kernels != "stock"):
        raise SystemExit(f"a population runs as jax-*-jit, jax-*-scan or torch-stock-eager, "
                         f"not {framework}-{kernels}-{mode}")
    raw = measure_population(framework, spec, kernels, mode, batch, steps, config["repeats"],
                             members, config.get("threads"))
    train = _stats([members * steps * batch / t for t in raw["train_s"]])
    return {
        "framework": framework, "kernels": kernels, "mode": mode,
        "variant": f"{framework}-{kernels}-{mode}", "spec": config["spec"],
        "network": spec.name, "population": members, "batch_size": batch,
        "steps_per_repeat": steps, "train_images_per_sec": train["median"],
        "train_images_per_sec_min": train["min"], "train_images_per_sec_max": train["max"],
        "compile_s": raw["compile_s"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": raw["device"], "threads": raw["threads"], "repeats": config["repeats"],
    }


def run(config: dict[str, Any]) -> dict[str, Any]:
    """Measure one (variant, spec, width, batch size); the result record of ``python -m bench``."""
    spec = load_spec(config["spec"])
    if config.get("width", 1) != 1:
        spec = widen(spec, config["width"])
    if config.get("population"):
        return _population_result(config, spec)
    framework, kernels, mode = config["framework"], config["kernels"], config["mode"]
    batch, steps = config["batch_size"], config["steps"]
    repeats, latency_calls = config["repeats"], config["latency_calls"]
    precision = config.get("precision", "float32")
    if framework == "jax":
        raw = measure_jax(spec, kernels, mode, batch, steps, repeats, latency_calls, precision)
    else:
        raw = measure_torch(spec, kernels, mode, batch, steps, repeats, latency_calls,
                            config.get("threads"), precision)
    if precision == "tf32" and not raw["device"].startswith(("gpu", "cuda")):
        raise SystemExit(f"precision tf32 needs an NVIDIA GPU; {framework} ran on "
                         f"{raw['device']}")
    images = steps * batch
    train = _stats([images / t for t in raw["train_s"]])
    infer = _stats([images / t for t in raw["infer_s"]])
    latency = _stats([1000 * t for t in raw["latency_s"]])
    return {
        "framework": framework, "kernels": kernels, "mode": mode,
        "variant": f"{framework}-{kernels}-{mode}", "spec": config["spec"],
        "network": spec.name, "precision": precision,
        "width": config.get("width", 1), "batch_size": batch, "steps_per_repeat": steps,
        "train_images_per_sec": train["median"], "train_images_per_sec_min": train["min"],
        "train_images_per_sec_max": train["max"],
        "infer_images_per_sec": infer["median"], "infer_images_per_sec_min": infer["min"],
        "infer_images_per_sec_max": infer["max"],
        "latency_ms": latency["median"], "latency_ms_min": latency["min"],
        "latency_ms_max": latency["max"],
        "compile_s": raw["compile_s"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_mb": raw["peak_device_mb"], "device": raw["device"],
        "threads": raw["threads"], "repeats": repeats,
        "train_flops_per_image": 6 * spec.macs,
    }


def main() -> int:
    print(json.dumps(run(json.loads(sys.argv[1]))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
