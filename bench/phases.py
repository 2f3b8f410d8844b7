"""``python -m bench.phases FRAMEWORK [training flags]``: the training program's first step,
phase by phase, in one process: the real ``lenet_train.program.main`` and ``fit``, with the
backend wrapped in a stopwatch. Phases: imports; data (flags, workdir, files, pipeline, up to
the model's build); build (model, optimizer, data on the device); first step (compile and run,
its results fetched); evaluate (compile and run); files (the checkpoint and the weights file,
to the program's end). Prints one JSON line of seconds."""

from __future__ import annotations

import importlib
import json
import sys
import time
from typing import Any


class Stopwatch:
    """A backend that is ``backend``, noting the time around the calls that end a phase."""

    def __init__(self, backend: Any, marks: dict[str, float]) -> None:
        self._backend, self._marks = backend, marks

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def _mark(self, name: str) -> None:
        self._marks.setdefault(name, time.perf_counter())

    def start(self, *args: Any) -> None:
        self._mark("data")
        self._backend.start(*args)
        self._mark("build")

    def fetch(self, pending: list[Any]) -> Any:
        out = self._backend.fetch(pending)
        self._mark("first_step")
        return out

    def evaluate(self) -> Any:
        out = self._backend.evaluate()
        self._mark("evaluate")
        return out


def main(argv: list[str]) -> int:
    framework, flags = argv[0], argv[1:]
    t0 = time.perf_counter()
    # imported here: the first phase times the program's own imports
    train = importlib.import_module(f"lenet_{framework}.train")
    from lenet_train.program import main as program

    marks: dict[str, float] = {}

    def backend(config) -> Stopwatch:
        made = train.make_backend(config)
        marks["imports"] = time.perf_counter()
        return Stopwatch(made, marks)

    program(framework, "bench.phases", importlib.import_module(f"lenet_{framework}.flags"),
            backend, flags)
    marks["files"] = time.perf_counter()
    names = ("imports", "data", "build", "first_step", "evaluate", "files")
    ends = [t0, *(marks[n] for n in names)]
    print(json.dumps({n: b - a for n, a, b in zip(names, ends[:-1], ends[1:], strict=True)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
