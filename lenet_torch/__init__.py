"""The torch.nn port of a :class:`lenet_spec.Spec`."""

from lenet_torch.model import LeNet, build, get_weights, set_weights

__all__ = ["LeNet", "build", "get_weights", "set_weights"]
