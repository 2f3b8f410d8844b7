"""``python -m lenet_torch.train``: train a spec'd LeNet with PyTorch, and :func:`fit`, the same
run from Python. The flags are read before torch is imported, so that a mistyped flag is refused
at once."""

from __future__ import annotations

if __name__ == "__main__":  # a Ctrl-C from the first moment is one line (lenet_train.errors)
    from lenet_train.errors import stop_on_signals

    stop_on_signals()

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from lenet_spec import Spec  # noqa: E402
from lenet_torch import flags  # noqa: E402
from lenet_train import program  # noqa: E402
from lenet_train.api import Backend, Result, train  # noqa: E402
from lenet_train.config import Config  # noqa: E402


def make_backend(config: Config) -> Backend:
    """The torch backend (imports torch): a population's with seeds."""
    # imported once the flags are read: importing torch takes seconds
    if config.seeds is not None:
        from lenet_torch.population import PopulationBackend

        return PopulationBackend()
    from lenet_torch.trainer import TorchBackend

    return TorchBackend()


def fit(spec: str | Path | Spec = "lenet5", config: Config | None = None,
        **settings: Any) -> Result:
    """Train ``spec`` (a preset's name, a JSON file or a :class:`~lenet_spec.Spec`) with
    PyTorch in this process, as ``python -m lenet_torch.train`` would with the same settings:
    ``config`` (default :class:`~lenet_train.Config``()``) with ``settings`` replaced
    (``fit("lenet5", epochs=1)``). Returns the :class:`~lenet_train.api.Result`: the trained
    model (evaluation mode), its canonical weights, the metrics history and the workdir (a new
    temporary folder unless ``workdir`` is set). Raises a
    :class:`~lenet_util.errors.LenetError` (a ``ValueError`` for a bad setting) with the line
    the program would print."""
    config = (config or Config()).replace(**settings)
    flags.check(config)
    return train(spec, config, make_backend(config))


def main(argv: list[str] | None = None) -> int:
    """Run the program with ``argv`` (default: the command line's); its exit status."""
    return program.main("torch", "PyTorch", flags, make_backend, argv)


if __name__ == "__main__":
    raise SystemExit(main())
