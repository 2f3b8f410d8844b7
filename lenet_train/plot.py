"""``python -m lenet_train.plot RUN_DIR [RUN_DIR ...] -o curves.png``: overlay the loss and
accuracy curves of several runs (say a JAX run and a torch run) from their metrics.jsonl."""

from __future__ import annotations

import io
import sys
from pathlib import Path

from lenet_spec import atomic_write_bytes
from lenet_spec.cli import Parser
from lenet_train.runlog import read_jsonl


def plot_runs(run_dirs: list[Path], out: Path) -> None:
    """Write a PNG of train/test loss and accuracy per epoch for each run."""
    # matplotlib takes a second to import: only when a chart is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for run in run_dirs:
        records = read_jsonl(run / "metrics.jsonl")
        epochs = [r["epoch"] + 1 for r in records]
        for key, style in (("train", "--"), ("test", "-")):
            ax_loss.plot(epochs, [r[f"{key}_loss"] for r in records], style, marker="o",
                         label=f"{run.name} {key}")
            ax_acc.plot(epochs, [100 * r[f"{key}_accuracy"] for r in records], style, marker="o",
                        label=f"{run.name} {key}")
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
