"""``python -m bench.phases FRAMEWORK [training flags]``: the training program's first step,
phase by phase, in one process (the same calls as ``lenet_train.program.main`` and
``lenet_train.loop.fit``): imports, data (workdir, files, pipeline), build (model, optimizer,
data on the device), first step (compile and run), evaluation (compile and run), weights file.
Prints one JSON line of seconds."""

from __future__ import annotations

import importlib
import json
import sys
import time


def main(argv: list[str]) -> int:
    framework, flags = argv[0], argv[1:]
    t = [time.perf_counter()]
    train = importlib.import_module(f"lenet_{framework}.train")
    from lenet_spec import save_weights
    from lenet_train.cli import parser
    from lenet_train.run import WEIGHTS, Position, setup

    t.append(time.perf_counter())
    backend = train.JaxBackend() if framework == "jax" else train.TorchBackend()
    p = parser("bench.phases", framework)
    backend.add_flags(p)
    args = p.parse_args(flags)
    backend.configure(p, args)
    layout = backend.connect(args)
    run = setup(args, framework, flags, layout)
    t.append(time.perf_counter())
    backend.start(run, None)
    t.append(time.perf_counter())
    backend.begin_epoch(run.epoch_batches(Position()))
    backend.fetch([backend.train(0, 1, 0)])
    t.append(time.perf_counter())
    backend.evaluate()
    t.append(time.perf_counter())
    save_weights(run.workdir / WEIGHTS, backend.state().weights, run.spec)
    t.append(time.perf_counter())
    backend.disconnect()
    names = ("imports", "data", "build", "first_step", "evaluate", "weights_file")
    print(json.dumps({n: b - a for n, a, b in zip(names, t[:-1], t[1:], strict=True)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
