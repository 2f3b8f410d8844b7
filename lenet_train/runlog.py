"""What both trainers show and write: progress bar, per-epoch line, metrics.jsonl, steps.jsonl."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from tqdm.autonotebook import tqdm as _chosen

from lenet_util import OutputError

NOTEBOOK = _chosen.__module__ == "tqdm.notebook"
"""Whether this process is a notebook's kernel (tqdm then draws its bars as widgets)."""


def log_to_stderr(quiet: bool = False) -> None:
    """Show our own log records (``lenet.*``: where the data came from) on stderr, as bare
    lines, warnings only when ``quiet``; the frameworks' loggers are left at Python's default,
    so their informational records (JAX's probe for a TPU, say) stay out of the terminal."""
    logger = logging.getLogger("lenet")
    if not logger.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted (a notebook's
    or a test's capture, not the stream of the first run)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class RunLog:
    """Console output and JSON-lines metrics of one training run in ``workdir``."""

    def __init__(self, workdir: Path, quiet: bool = False, write: bool = True) -> None:
        self.workdir = Path(workdir)
        self.quiet = quiet
        self.write = write
        """False in every process of a run but the one that writes its files."""
        if write:
            self.workdir.mkdir(parents=True, exist_ok=True)

    def say(self, text: str) -> None:
        """One line for the user (suppressed by --quiet)."""
        if not self.quiet:
            print(text, flush=True)

    def bar(self, total: int, epoch: int, initial: int = 0):
        """A progress bar over ``total`` steps of ``epoch``: tqdm's, a widget in a notebook;
        none with --quiet, or when stderr is not a terminal (a log file would keep every
        redraw; the epoch's line says what it did)."""
        shown = not self.quiet and (NOTEBOOK or sys.stderr.isatty())
        return tqdm(total=total, initial=initial, desc=f"epoch {epoch}", unit="step",
                    disable=not shown, leave=False, file=sys.stderr, dynamic_ncols=True)

    def append(self, name: str, lines: list[str]) -> None:
        """Append ``lines`` to WORKDIR/``name``; :class:`OutputError` naming the file when the
        disk refuses (a file this call created is removed; a line cut short is dropped on
        resume)."""
        path = self.workdir / name
        existed = path.exists()
        try:
            with open(path, "a") as f:
                f.writelines(lines)
        except OSError as e:
            if not existed:
                path.unlink(missing_ok=True)
            raise OutputError(f"{path}: cannot write it ({e.strerror or e}); the last "
                              "checkpoint is kept") from None

    def epoch(self, record: dict[str, Any]) -> None:
        """Append ``record`` to metrics.jsonl and print the epoch's summary line."""
        if self.write:
            self.append("metrics.jsonl", [json.dumps(record) + "\n"])
        self.say(
            f"epoch {record['epoch']:3d}  step {record['step']:6d}  "
            f"train loss {record['train_loss']:.4f} acc {100 * record['train_accuracy']:6.2f}%  "
            f"test loss {record['test_loss']:.4f} acc {100 * record['test_accuracy']:6.2f}%  "
            f"{record['epoch_s']:6.1f} s  {record['images_per_sec']:8,.0f} img/s"
        )

    def population_epoch(self, members: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        """Append the members' records and the summary to metrics.jsonl and print the
        epoch's line: the members' mean ± sample s.d."""
        if self.write:
            self.append("metrics.jsonl", [json.dumps(r) + "\n" for r in (*members, summary)])
        r = summary

        def pm(name: str, scale: float = 1.0, digits: int = 4) -> str:
            return f"{scale * r[name]:.{digits}f} ± {scale * r[name + '_sd']:.{digits}f}"

        self.say(
            f"epoch {r['epoch']:3d}  step {r['step']:6d}  "
            f"train loss {pm('train_loss')} acc {pm('train_accuracy', 100, 2)}%  "
            f"test loss {pm('test_loss')} acc {pm('test_accuracy', 100, 2)}%  "
            f"{r['epoch_s']:6.1f} s  {r['images_per_sec']:8,.0f} img/s  "
            f"({r['members']} seeds)"
        )

    def member_steps(self, first_step: int, seeds: list[int], losses: Any) -> None:
        """Append one {"step", "seed", "loss"} line per step and member to steps.jsonl."""
        if not self.write:
            return
        self.append("steps.jsonl", [json.dumps({"step": first_step + i, "seed": seed,
                                                "loss": loss}) + "\n"
                                    for i, row in enumerate(losses.tolist())
                                    for seed, loss in zip(seeds, row, strict=True)])

    def steps(self, first_step: int, losses: list[float]) -> None:
        """Append one {"step", "loss"} line per step to steps.jsonl."""
        if not self.write:
            return
        self.append("steps.jsonl", [json.dumps({"step": first_step + i, "loss": loss}) + "\n"
                                    for i, loss in enumerate(losses)])


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
