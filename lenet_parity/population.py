"""``python -m lenet_parity SPEC --train``: do the two training programs train the same?

Each program runs N seeds (0 … N−1, the frameworks alternating) with the same flags, one
process per run; the final test accuracy, the final test loss and the test accuracy of every
epoch are compared by Welch's TOST (:mod:`lenet_parity.stats`) with margins stated before the
runs. Per-step parity cannot answer this beyond ~50 steps (the trajectories of two correct
float32 ports separate); populations can.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lenet_parity.stats import Equivalence, tost

PROGRAMS = {"jax": "lenet_jax.train", "torch": "lenet_torch.train"}


class ProgramFailed(RuntimeError):
    """A training run that ended with an error; the message is its command and last line."""


def run_seed(framework: str, seed: int, flags: list[str], workdir: Path) -> list[dict[str, Any]]:
    """One run of ``framework``'s program at ``seed``: its per-epoch metrics records."""
    cmd = [sys.executable, "-m", PROGRAMS[framework], "--quiet", "--seed", str(seed),
           "--workdir", str(workdir), *flags]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
        raise ProgramFailed(f"python -m {PROGRAMS[framework]} --seed {seed} "
                            f"{' '.join(flags)}: {last}")
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def run_populations(seeds: int, flags: dict[str, list[str]],
                    progress: Callable[[str], None] = lambda line: None
                    ) -> dict[str, list[list[dict[str, Any]]]]:
    """Each group's program at seeds 0 … ``seeds``−1 with its ``flags``; a group is named by
    its framework (``jax``, ``torch``), or framework and a qualifier (``jax float32``). The
    groups alternate, which goes first rotating every seed, so that a drift of the machine does
    not favour one. Per group, per seed, the metrics records."""
    runs: dict[str, list[list[dict[str, Any]]]] = {group: [] for group in flags}
    groups = list(flags)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            shift = seed % len(groups)
            for group in groups[shift:] + groups[:shift]:
                records = run_seed(group.split()[0], seed, flags[group],
                                   Path(tmp) / f"{group.replace(' ', '-')}-{seed}")
                runs[group].append(records)
                last = records[-1]
                progress(f"{group} seed {seed}: test accuracy "
                         f"{100 * last['test_accuracy']:.2f}%, loss {last['test_loss']:.4f}")
    return runs


def compare(runs: dict[str, list[list[dict[str, Any]]]], margin: float, loss_margin: float,
            alpha: float = 0.05, pair: tuple[str, str] = ("jax", "torch")) -> dict[str, Any]:
    """The TOSTs of group ``pair[0]`` against ``pair[1]`` (default JAX against torch): final
    test accuracy (``margin`` as a fraction), final test loss (``loss_margin``), and test
    accuracy at every epoch; equivalent when all are (an intersection–union test: level α
    without correction)."""
    first, second = pair

    def final(group: str, key: str) -> list[float]:
        return [records[-1][key] for records in runs[group]]

    epochs = min(len(records) for group in pair for records in runs[group])
    tests: dict[str, Equivalence] = {
        "final test accuracy": tost(final(first, "test_accuracy"),
                                    final(second, "test_accuracy"), margin, alpha),
        "final test loss": tost(final(first, "test_loss"), final(second, "test_loss"),
                                loss_margin, alpha),
    }
    for e in range(epochs - 1):  # the last epoch is the final one above
        tests[f"epoch {e + 1} test accuracy"] = tost(
            [records[e]["test_accuracy"] for records in runs[first]],
            [records[e]["test_accuracy"] for records in runs[second]], margin, alpha)
    return {"tests": tests, "equivalent": all(t.equivalent for t in tests.values()),
            "pair": list(pair)}


def shown(group: str) -> str:
    """A group's name as the report shows it (``JAX``, ``torch float32``)."""
    return group.replace("jax", "JAX", 1)


def report(result: dict[str, Any]) -> list[str]:
    """The verdict's lines: one per test, then the overall verdict."""
    names = tuple(shown(g) for g in result.get("pair", ("jax", "torch")))
    lines = []
    for name, t in result["tests"].items():
        if "accuracy" in name:
            lines.append(f"{name}: {t.describe(names, 100, ' points')}")
        else:
            lines.append(f"{name}: {t.describe(names)}")
    both = ("the two programs" if names == ("JAX", "torch")
            else f"{names[0]} and {names[1]}")
    verdict = (f"{both} train the same within the margins" if result["equivalent"]
               else "equivalence not shown (a real difference, or too few seeds to tell)")
    lines.append(f"verdict: {verdict}")
    return lines
