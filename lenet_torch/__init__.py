"""The torch.nn port of a :class:`lenet_spec.Spec` (the way back, a torch module to a spec, is
:mod:`lenet_port`)."""

from typing import Any

__all__ = ["LeNet", "build", "fit", "get_weights", "set_weights"]


def __getattr__(name: str) -> Any:
    # imported on first use: ``python -m lenet_torch.train`` reads its flags before torch loads
    if name == "fit":  # the training run from Python (lenet_torch.train.fit)
        from lenet_torch.train import fit

        return fit
    if name in __all__:
        from lenet_torch import model

        return getattr(model, name)
    raise AttributeError(f"module 'lenet_torch' has no attribute {name!r}")
