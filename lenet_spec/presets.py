"""The named specs: the networks of the PyTorch "Neural Networks" tutorial and friends."""

from __future__ import annotations

from lenet_spec.layers import (
    AvgPool,
    BatchNorm,
    Conv,
    Dropout,
    Flatten,
    Linear,
    MaxPool,
    ReLU,
    Tanh,
)
from lenet_spec.spec import Spec


def _lenet(name: str, kernel: int, act: type, pool: type) -> Spec:
    return Spec(
        name,
        (1, 32, 32),
        (
            Conv(6, kernel), act(), pool(2),
            Conv(16, kernel), act(), pool(2),
            Flatten(),
            Linear(120), act(),
            Linear(84), act(),
            Linear(10),
        ),
    )


LENET5 = _lenet("lenet5", 5, ReLU, MaxPool)
"""The tutorial's LeNet-5: 61,706 parameters."""

LENET5_3X3 = _lenet("lenet5_3x3", 3, ReLU, MaxPool)
"""LeNet-5 with 3×3 kernels (flatten 16×6×6 = 576): 81,194 parameters."""

LENET5_CLASSIC = _lenet("lenet5_classic", 5, Tanh, AvgPool)
"""LeCun et al. 1998 flavour, tanh and average pooling (full C3, linear head): 61,706."""

CIFAR10_CNN = Spec(
    "cifar10_cnn",
    (3, 32, 32),
    (
        Conv(32, 5, padding=2), MaxPool(2),
        Conv(32, 5, padding=2), MaxPool(2),
        Conv(64, 5, padding=2), MaxPool(2),
        Flatten(),
        Linear(64, name="linear1"),
        Linear(10, name="linear2"),
    ),
)
"""The CIFAR-10 sequential model (no activations, as the original): 145,578 parameters."""

LENET5_BN = Spec(
    "lenet5_bn",
    (1, 32, 32),
    (
        Conv(6, 5, bias=False), BatchNorm(), ReLU(), MaxPool(2),
        Conv(16, 5, bias=False), BatchNorm(), ReLU(), MaxPool(2),
        Flatten(),
        Linear(120), ReLU(), Dropout(0.5),
        Linear(84), ReLU(), Dropout(0.5),
        Linear(10),
    ),
)
"""LeNet-5 with batch normalisation after each conv and dropout 0.5 after each hidden fully
connected layer: 61,728 parameters (LeNet-5's 61,706 without the convs' 22 biases, which a
batch_norm after them makes redundant, as in torchvision's models; bn1's 12 and bn2's 32) and
46 buffer values (running mean and variance per channel, and a batch count, per batch_norm)."""

PRESETS: dict[str, Spec] = {
    s.name: s for s in (LENET5, LENET5_3X3, LENET5_CLASSIC, CIFAR10_CNN, LENET5_BN)
}
