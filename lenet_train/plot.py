"""``python -m lenet_train.plot RUN_DIR [RUN_DIR ...] -o curves.png``: overlay the loss and
accuracy curves of several runs (say a JAX run and a torch run) from their metrics.jsonl; a
population's (``--seeds``) as its members' mean with a band of ± one standard deviation."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

from lenet_train.runlog import read_jsonl
from lenet_util import atomic_write_bytes
from lenet_util.cli import Parser


def curve(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float],
                                                           list[float] | None]:
    """The epochs (from 1) and values of ``key`` in a run's metrics records, and for a
    population (whose summaries carry ``seeds``) the members' standard deviations (else
    None); its members' own records are left out."""
    summaries = [r for r in records if "seeds" in r]
    rows = summaries or [r for r in records if "seed" not in r]
    sds = [r[f"{key}_sd"] for r in rows] if summaries else None
    return [r["epoch"] + 1 for r in rows], [r[key] for r in rows], sds


def plot_runs(run_dirs: list[Path], out: Path) -> None:
    """Write a PNG of train/test loss and accuracy per epoch for each run."""
    # matplotlib takes a second to import: only when a chart is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for run in run_dirs:
        records = read_jsonl(run / "metrics.jsonl")
        seeds = next((r["seeds"] for r in records if "seeds" in r), None)
        name = run.name if seeds is None else f"{run.name} ({len(seeds)} seeds, mean ± s.d.)"
        for split, style in (("train", "--"), ("test", "-")):
            for ax, what, scale in ((ax_loss, "loss", 1), (ax_acc, "accuracy", 100)):
                epochs, values, sds = curve(records, f"{split}_{what}")
                line, = ax.plot(epochs, [scale * v for v in values], style, marker="o",
                                label=f"{name} {split}")
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
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
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
    missing = [str(r) for r in args.runs if not (r / "metrics.jsonl").is_file()]
    if missing:
        p.exit(2, f"error: no metrics.jsonl in {', '.join(missing)}\n")
    plot_runs(args.runs, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
