"""``python -m lenet_torch.train``: train a spec'd LeNet with PyTorch. The flags are read
before torch is imported, so that a mistyped flag is refused at once."""

from __future__ import annotations

if __name__ == "__main__":  # a Ctrl-C from the first moment is one line (lenet_train.errors)
    from lenet_train.errors import stop_on_signals

    stop_on_signals()

import argparse  # noqa: E402

from lenet_torch import flags  # noqa: E402
from lenet_train import program  # noqa: E402


def make_backend(args: argparse.Namespace) -> program.Backend:
    """The torch backend (imports torch): a population's with --seeds."""
    # imported once the flags are read: importing torch takes seconds
    if args.seeds is not None:
        from lenet_torch.population import PopulationBackend

        return PopulationBackend()
    from lenet_torch.trainer import TorchBackend

    return TorchBackend()


def main(argv: list[str] | None = None) -> int:
    """Run the program with ``argv`` (default: the command line's); its exit status."""
    return program.main("torch", "PyTorch", flags, make_backend, argv)


if __name__ == "__main__":
    raise SystemExit(main())
