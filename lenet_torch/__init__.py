"""The torch.nn port of a :class:`lenet_spec.Spec` (the way back, a torch module to a spec, is
:mod:`lenet_port`)."""

from lenet_torch.model import LeNet, build, get_weights, set_weights

__all__ = ["LeNet", "build", "get_weights", "set_weights"]
