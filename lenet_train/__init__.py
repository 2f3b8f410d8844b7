"""The shared training runtime, framework-free: the settings (:class:`Config`), the data, the
one training loop, checkpoints, run logs, distributed bookkeeping and plots that both ports'
programs and ``fit`` functions use, and the errors they raise (:mod:`lenet_train.errors`).

Train from Python with ``lenet_jax.fit(spec, config)`` or ``lenet_torch.fit(spec, config)``.
"""

from typing import Any

_ERRORS = ("CheckpointError", "ConfigError", "Diverged", "Interrupted", "LenetError", "LostPeer",
           "StateError", "WorkdirError")

__all__ = ["Config", "Result", *_ERRORS]


def __getattr__(name: str) -> Any:
    # imported on first use: a program installs its signal handlers (lenet_train.errors)
    # before numpy and the data layer load
    if name == "Config":
        from lenet_train.config import Config

        return Config
    if name == "Result":
        from lenet_train.api import Result

        return Result
    if name in _ERRORS:
        from lenet_train import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'lenet_train' has no attribute {name!r}")
