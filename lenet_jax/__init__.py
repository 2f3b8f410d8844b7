"""The Flax NNX port of a :class:`lenet_spec.Spec`."""

from typing import Any

__all__ = ["LeNet", "build", "fit", "get_weights", "set_weights"]


def __getattr__(name: str) -> Any:
    # imported on first use: ``python -m lenet_jax.train`` reads its flags before jax loads
    if name == "fit":  # the training run from Python (lenet_jax.train.fit)
        from lenet_jax.train import fit

        return fit
    if name in __all__:
        from lenet_jax import model

        return getattr(model, name)
    raise AttributeError(f"module 'lenet_jax' has no attribute {name!r}")
