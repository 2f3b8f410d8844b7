"""``python -m lenet_<framework>.train``: the program both ports run around :func:`fit`."""

from __future__ import annotations

import sys

from lenet_train.cli import parser
from lenet_train.distributed import peers_guard
from lenet_train.errors import interruptible
from lenet_train.loop import Backend, fit
from lenet_train.setup import setup


def main(backend: Backend, title: str, argv: list[str] | None = None) -> int:
    """Parse the shared and the framework's flags, join the other processes, prepare the run
    (workdir, data, checkpoint) and train it; errors end the program with one line."""
    p = parser(f"python -m lenet_{backend.framework}.train", title)
    backend.add_flags(p)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    backend.configure(p, args)
    try:
        with interruptible():
            layout = backend.connect(args)
            run = setup(args, backend.framework, argv, layout)
            run.any_process = backend.any_process
            run.log.say(f"{backend.describe()}; {run.spec.name}, {run.total_steps} steps; "
                        f"workdir {run.workdir}")
            with peers_guard(layout, backend.transport_errors):
                fit(run, backend)
    finally:
        backend.disconnect()
    return 0
