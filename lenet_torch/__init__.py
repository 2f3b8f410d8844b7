"""The torch.nn port of a :class:`lenet_spec.Spec`, and :func:`to_spec`, its way back from a
torch module."""

from typing import Any

from lenet_torch.model import LeNet, build, get_weights, set_weights

__all__ = ["LeNet", "PortError", "build", "get_weights", "set_weights", "to_spec"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that ``python -m lenet_torch.port`` runs the module once.
    if name in ("to_spec", "PortError"):
        from lenet_torch import port

        return getattr(port, name)
    raise AttributeError(f"module 'lenet_torch' has no attribute {name!r}")
