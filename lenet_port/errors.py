"""What the porter refuses, and how it says so."""

from __future__ import annotations

SUPPORTED = (
    "supported: nn.Conv2d, nn.Linear, nn.BatchNorm1d/2d, nn.Dropout, nn.Dropout2d, "
    "nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Identity, nn.ReLU/Tanh/Sigmoid/GELU/LeakyReLU/"
    "ELU/SiLU and their functional forms (F.relu, torch.relu, x.relu(), F.max_pool2d, "
    "F.avg_pool2d, F.dropout, F.dropout2d, …); flattening to (N, C·H·W) by torch.flatten(x, 1), "
    "x.flatten(1), x.view(…) or x.reshape(…); nn.Sequential, nested modules — one chain of "
    "layers from the input to the logits"
)


class PortError(ValueError):
    """A module that cannot be expressed as a spec; the message names the module or graph node
    and the operation, and lists what is supported."""


def first_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
