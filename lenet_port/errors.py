"""What the porter refuses, and how it says so."""

from __future__ import annotations

from lenet_util.errors import LenetError

SUPPORTED = (
    "supported: nn.Conv2d, nn.Linear, nn.BatchNorm1d/2d, nn.Dropout, nn.Dropout2d, "
    "nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, "
    "nn.Identity, nn.ReLU/Tanh/Sigmoid/GELU/LeakyReLU/ELU/SiLU, a final nn.LogSoftmax or "
    "nn.Softmax over dim 1, and their functional forms (F.relu, torch.relu, x.relu(), "
    "F.max_pool2d, F.adaptive_avg_pool2d, F.dropout, F.log_softmax, …); flattening to "
    "(N, C·H·W) by torch.flatten(x, 1), x.flatten(1), x.view(…) or x.reshape(…); a reshape "
    "or squeeze that only adds or removes axes of size 1; x * a, x / a, x + a, x - a with a "
    "number or one constant per channel; x.to(…), x.float() that change nothing; "
    "x.mean((2, 3)) (a global average); nn.Sequential, nested modules "
    "— one chain of layers from the input to the output"
)


def batch_shape(shape: tuple[int, ...], batch: int) -> str:
    """A tensor's shape, seen on a batch of ``batch`` images, as the user's batch of N would have
    it: (N, C, H, W), a first size that is k times the batch as kN."""
    first = shape[0] if shape else None
    if first == batch:
        head = "N"
    elif first and first % batch == 0:
        head = f"{first // batch}N"
    else:
        head = str(first)
    return "(" + ", ".join([head, *map(str, shape[1:])]) + ")"


class PortError(LenetError, ValueError):
    """A module that cannot be expressed as a spec; the message names the module or graph node
    and the operation, and lists what is supported."""


def first_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
