"""Measurements of the real training programs: time to accuracy over several seeds
(MLPerf-style), the one-step command's start-up, whole and phase by phase, and a population
of seeds (``--seeds``) against as many separate runs."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lenet_train.runlog import read_jsonl

PROGRAMS = {"jax": "lenet_jax.train", "torch": "lenet_torch.train"}
_PR_SET_PDEATHSIG = 1


class ProgramFailed(RuntimeError):
    """A training program that ended with an error; the message is its command and error."""


def die_with_parent() -> None:
    """In a child, before it runs: be killed when the benchmark dies (Linux), so that a
    killed benchmark leaves no worker running."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _records(path: Path) -> list[dict[str, Any]]:
    try:
        return read_jsonl(path)
    except (OSError, json.JSONDecodeError):
        return []  # not there yet, or a line being written


def run_to_accuracy(framework: str, target: float, seed: int, extra: list[str],
                    timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One run of ``framework``'s program until the first epoch at test accuracy ≥ ``target``:
    whole-command seconds (launch to that epoch's metrics line, polled every 10 ms) and
    training-only seconds (the record's ``wall_s``: from the program's first touch of the data
    to that epoch's end)."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", PROGRAMS[framework], "--quiet", "--seed", str(seed),
               "--workdir", str(workdir), *extra]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=env, preexec_fn=die_with_parent)
        hit, best, epochs = None, 0.0, 0
        while hit is None and time.perf_counter() - t0 < timeout:
            records = _records(workdir / "metrics.jsonl")
            epochs = len(records)
            best = max([best, *(r["test_accuracy"] for r in records)])
            reached = [r for r in records if r["test_accuracy"] >= target]
            if reached:
                hit = (time.perf_counter() - t0, reached[0])
            elif proc.poll() is not None:
                break
            time.sleep(0.01)
        proc.kill()
        _, err = proc.communicate()
    result = {"framework": framework, "seed": seed, "target": target,
              "command": " ".join(["python", *cmd[1:3], "--seed", str(seed), *extra]),
              "seconds": None, "train_seconds": None, "epochs": epochs, "best_accuracy": best}
    if hit:
        result.update(seconds=hit[0], train_seconds=hit[1]["wall_s"], epochs=hit[1]["epoch"] + 1,
                      accuracy=hit[1]["test_accuracy"])
    elif proc.returncode not in (0, -9):
        raise ProgramFailed(f"{result['command']}: {_last_line(err, proc.returncode)}")
    return result


def _last_line(stderr: str, status: int) -> str:
    """A program's error: the last line it printed, else its exit status."""
    return (stderr.strip().splitlines() or [f"exit status {status}"])[-1]


def mlperf_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """MLPerf's rule: of N ≥ 3 runs drop the fastest and the slowest (by whole-command time),
    report the mean and range of the rest; a run that did not reach the target counts as the
    slowest."""
    ordered = sorted(runs, key=lambda r: float("inf") if r["seconds"] is None else r["seconds"])
    kept = ordered[1:-1] if len(ordered) >= 3 else ordered
    summary: dict[str, Any] = {"runs": len(runs),
                               "reached": sum(r["seconds"] is not None for r in runs),
                               "kept_seeds": [r["seed"] for r in kept]}
    if any(r["seconds"] is None for r in kept):
        return summary
    for key in ("seconds", "train_seconds"):
        values = [r[key] for r in kept]
        summary[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
    summary["accuracy_mean"] = statistics.fmean(r["accuracy"] for r in kept)
    return summary


def time_to_accuracy(target: float, seeds: int, extra: list[str],
                     timeout: float) -> dict[str, Any]:
    """Each program ``seeds`` times (seeds 0 … N−1, the frameworks alternating), and per
    framework the MLPerf summary of its runs; :class:`ProgramFailed` at the first run that
    ends with an error."""
    runs: list[dict[str, Any]] = []
    for seed in range(seeds):
        order = list(PROGRAMS) if seed % 2 == 0 else list(PROGRAMS)[::-1]
        for framework in order:
            runs.append(run_to_accuracy(framework, target, seed, extra, timeout))
            r = runs[-1]
            took = "not reached" if r["seconds"] is None else (
                f"{r['seconds']:.1f} s whole, {r['train_seconds']:.1f} s training-only")
            print(f"  {framework} seed {seed}: {took} ({r['epochs']} epochs; best "
                  f"{r['best_accuracy']:.4f})", file=sys.stderr, flush=True)
    summaries = {fw: mlperf_summary([r for r in runs if r["framework"] == fw])
                 for fw in PROGRAMS}
    return {"target": target, "runs": runs, "summary": summaries}


STEP_FLAGS = ["--max-steps", "1", "--epochs", "1", "--quiet", "--checkpoint-every", "0"]


def startup(repeats: int, extra: list[str], timeout: float) -> dict[str, Any]:
    """The one-step command of each program as a whole (``repeats`` times, the frameworks
    alternating; JAX's first run with an empty compilation cache, the others with the cache
    that run filled), and each program's phases timed inside one process."""
    whole: dict[str, list[float]] = {"jax-cold": [], "jax": [], "torch": []}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache)
        for k in range(repeats + 1):
            for framework in (["jax", "torch"] if k % 2 == 0 else ["torch", "jax"]):
                if k == 0 and framework == "torch":
                    continue
                with tempfile.TemporaryDirectory() as tmp:
                    cmd = [sys.executable, "-m", PROGRAMS[framework], *STEP_FLAGS,
                           "--workdir", str(Path(tmp) / "run"), *extra]
                    t0 = time.perf_counter()
                    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                         env=env, preexec_fn=die_with_parent)
                    if res.returncode != 0:
                        raise ProgramFailed(f"{' '.join(['python', *cmd[1:]])}: "
                                            f"{_last_line(res.stderr, res.returncode)}")
                    key = "jax-cold" if k == 0 else framework
                    whole[key].append(time.perf_counter() - t0)
        phases = {fw: _phases(fw, extra, timeout, env) for fw in ("jax", "torch")}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return {"whole_s": whole, "python_s": time.perf_counter() - t0, "phases_s": phases}


def _phases(framework: str, extra: list[str], timeout: float,
            env: dict[str, str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run([sys.executable, "-m", "bench.phases", framework, *STEP_FLAGS,
                              "--workdir", str(Path(tmp) / "run"), *extra],
                             capture_output=True, text=True, timeout=timeout, env=env,
                             preexec_fn=die_with_parent)
    if res.returncode != 0:
        raise ProgramFailed(f"bench.phases {framework}: "
                            f"{_last_line(res.stderr, res.returncode)}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _timed_command(framework: str, flags: list[str], extra: list[str], timeout: float) -> float:
    """Seconds of one whole command of ``framework``'s program (in a fresh workdir)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", PROGRAMS[framework], "--quiet", *flags,
               "--workdir", str(Path(tmp) / "run"), *extra]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             preexec_fn=die_with_parent)
        took = time.perf_counter() - t0
    if res.returncode != 0:
        raise ProgramFailed(f"{' '.join(['python', *cmd[1:]])}: "
                            f"{_last_line(res.stderr, res.returncode)}")
    return took


def population_commands(members: int, rounds: int, extra: list[str],
                        timeout: float) -> dict[str, Any]:
    """Per framework and round: one command training seeds 0 … P−1 as a population
    (``--seeds``) and P commands of one seed each (``--seed S``), whole commands from launch
    to exit; the frameworks and the two ways alternate within each round."""
    seconds: dict[str, dict[str, list[float]]] = {
        fw: {"population": [], "separate": []} for fw in PROGRAMS}
    for k in range(rounds):
        for framework in list(PROGRAMS)[:: 1 if k % 2 == 0 else -1]:
            for way in ("population", "separate")[:: 1 if k % 2 == 0 else -1]:
                if way == "population":
                    took = _timed_command(framework, ["--seeds", str(members)], extra, timeout)
                else:
                    took = sum(_timed_command(framework, ["--seed", str(seed)], extra, timeout)
                               for seed in range(members))
                seconds[framework][way].append(took)
                print(f"  round {k + 1} {framework} {way}: {took:.1f} s", file=sys.stderr,
                      flush=True)
    return {"members": members, "flags": extra, "seconds": seconds}
