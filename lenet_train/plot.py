"""Loss and accuracy curves of training runs, from their metrics: ``python -m lenet_train.plot
RUN_DIR [RUN_DIR ...] -o curves.png`` (say a JAX run and a torch run), or from Python
:func:`figure` of ``fit`` results' histories. A population (``seeds``) is drawn as its members'
mean with a band of ± one standard deviation."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lenet_util import LenetError, atomic_write_bytes
from lenet_util.cli import Parser

FRAMEWORK_NAMES = {"jax": "JAX", "torch": "torch"}
CURVES = ("train_loss", "test_loss", "train_accuracy", "test_accuracy")
"""The metrics the chart draws."""


def curve(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float],
                                                           list[float] | None]:
    """The epochs (numbered as the programs number them, from 0) and values of ``key`` in a
    run's metrics records, and for a population (whose summaries carry ``seeds``) the members'
    standard deviations (else None); its members' own records are left out."""
    summaries = [r for r in records if "seeds" in r]
    rows = summaries or [r for r in records if "seed" not in r]
    sds = [r[f"{key}_sd"] for r in rows] if summaries else None
    return [r["epoch"] for r in rows], [r[key] for r in rows], sds


def figure(runs: Mapping[str, Sequence[dict[str, Any]]], title: str | None = None):
    """A matplotlib figure of train and test loss and accuracy per epoch, one pair of curves
    per run of ``runs`` (legend label → its metrics records, e.g. ``fit(...).history``)."""
    # matplotlib takes a second to import: only when a chart is drawn
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    epochs_seen: list[int] = []
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, records) in enumerate(runs.items()):
        records = list(records)
        seeds = next((r["seeds"] for r in records if "seeds" in r), None)
        label = name if seeds is None else f"{name} ({len(seeds)} seeds, mean ± s.d.)"
        colour = colours[k % len(colours)]  # one colour a run; train dashed, test solid
        for split, style in (("train", "--"), ("test", "-")):
            for ax, what, scale in ((ax_loss, "loss", 1), (ax_acc, "accuracy", 100)):
                epochs, values, sds = curve(records, f"{split}_{what}")
                epochs_seen += epochs
                line, = ax.plot(epochs, [scale * v for v in values], style, color=colour,
                                marker="o" if split == "test" else "s",
                                label=f"{label}, {split}")
                if sds is not None:
                    pairs = list(zip(values, sds, strict=True))
                    if len(pairs) == 1:  # a band needs two epochs
                        ax.errorbar(epochs, [scale * values[0]], [scale * sds[0]],
                                    color=line.get_color(), capsize=4)
                    ax.fill_between(epochs, [scale * (v - d) for v, d in pairs],
                                    [scale * (v + d) for v, d in pairs],
                                    color=line.get_color(), alpha=0.2, linewidth=0)
    ax_loss.set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if epochs_seen:
            ax.set_xlim(min(epochs_seen) - 0.5, max(epochs_seen) + 0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def describe(run: Path) -> tuple[str, str, str]:
    """A run folder's framework (JAX, torch), spec and dataset, from its config.json (the
    folder's name where that says nothing)."""
    try:
        config = json.loads((run / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        config = {}
    config = config if isinstance(config, dict) else {}
    framework = config.get("framework") or next(
        (fw for fw in FRAMEWORK_NAMES if run.name.endswith(f"-{fw}")), None)
    spec = config.get("spec")
    return (FRAMEWORK_NAMES.get(framework, framework or run.name),
            str(spec.get("name", "")) if isinstance(spec, dict) else "",
            str(config.get("dataset") or ""))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; :class:`LenetError` naming the file and line that is
    not one."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LenetError(f"{path}: cannot read it ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            raise LenetError(f"{path}: line {n} is not a JSON record") from None
        if not isinstance(record, dict):
            raise LenetError(f"{path}: line {n} is not a JSON object")
        if "seed" not in record:  # what the curves read: a run's records, a population's summary
            for key in ("epoch", *CURVES):
                value = record.get(key)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise LenetError(f"{path}: line {n}: {key} is {value!r}, not a number")
        records.append(record)
    if not any("seed" not in r for r in records):
        raise LenetError(f"{path}: no epoch's record (the run ended before its first epoch)")
    return records


def plot_runs(run_dirs: list[Path], out: Path) -> None:
    """Write a PNG of train/test loss and accuracy per epoch for each run folder, labelled by
    framework and spec, titled by spec and dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    described = [(run, *describe(run)) for run in run_dirs]
    specs = {spec for _, _, spec, _ in described}
    datasets = {dataset for _, _, _, dataset in described}
    runs: dict[str, list[dict[str, Any]]] = {}
    for run, framework, spec, _ in described:
        label = framework if len(specs) == 1 else f"{framework} {spec}".strip()
        if label in runs:  # two runs of one framework (and spec): tell them apart
            label = f"{label} ({run.name})"
        runs[label] = read_metrics(run / "metrics.jsonl")
    spec_part = next(iter(specs)) if len(specs) == 1 else ""
    data_part = next(iter(datasets)) if len(datasets) == 1 else ""
    title = " on ".join(p for p in (spec_part, data_part) if p) or None
    fig = figure(runs, title)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, png.getvalue())


def main(argv: list[str] | None = None) -> int:
    p = Parser("python -m lenet_train.plot", __doc__)
    p.add_argument("runs", nargs="+", type=Path, help="run folders holding metrics.jsonl")
    p.add_argument("-o", "--output", type=Path, default=Path("curves.png"), metavar="PNG",
                   help="where to write the chart")
    args = p.parse_args(argv)
    runs = [r for r in args.runs if (r / "metrics.jsonl").is_file()]
    skipped = [str(r) for r in args.runs if r not in runs]
    if skipped:
        print(f"skipped (no metrics.jsonl: a run refused or stopped before its first epoch): "
              f"{', '.join(skipped)}", file=sys.stderr)
    if not runs:
        p.exit(2, "error: none of the folders holds a metrics.jsonl\n")
    try:
        plot_runs(runs, args.output)
    except LenetError as e:
        p.exit(2, f"error: {e}\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
