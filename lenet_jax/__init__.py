"""The Flax NNX port of a :class:`lenet_spec.Spec`."""

from lenet_jax.model import LeNet, build, get_weights, set_weights

__all__ = ["LeNet", "build", "get_weights", "set_weights"]
