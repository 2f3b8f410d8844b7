"""The choices the training programs offer, named once for the flags, the data pipeline and both
ports' optimizers, losses and evaluation."""

from __future__ import annotations

from lenet_kernels import KERNELS
from lenet_kernels.precision import PRECISIONS
from lenet_spec import INITS, SHAPES

OPTIMIZERS = ("sgd", "adam", "adamw")
"""torch.optim's SGD, Adam (L2 weight decay) and AdamW (decoupled), in both frameworks."""

SCHEDULES = ("constant", "cosine", "onecycle")
"""The learning rate per step (lenet_train.schedule)."""

LOSSES = ("ce", "mse")
"""Softmax cross-entropy on the logits; mean squared error of the network's output to one-hot
labels. A network ending in log_softmax or softmax trains ce on the logits before that layer:
the NLL of the log-probabilities it returns, never a softmax of probabilities."""


def loss_on_logits(loss: str) -> bool:
    """Whether ``loss`` is computed on the logits before a final log_softmax or softmax (ce),
    rather than on what the network returns (mse)."""
    return loss == "ce"

AUGMENTS = ("crop", "flip")
"""Training-image augmentations: random crop of the image padded by 4 pixels; horizontal flip."""

DATASET_NAMES = tuple(SHAPES)
"""The datasets the programs read, named as TensorFlow Datasets names them."""

EVAL_BATCH = 1000
"""Images per forward pass when evaluating (memory only: the sums do not depend on it)."""

__all__ = ["AUGMENTS", "DATASET_NAMES", "EVAL_BATCH", "INITS", "KERNELS", "LOSSES", "OPTIMIZERS",
           "PRECISIONS", "SCHEDULES", "loss_on_logits"]
