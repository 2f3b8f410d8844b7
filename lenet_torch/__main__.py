"""``python -m lenet_torch [SPEC]``: build the spec in torch and print its summary table."""

from __future__ import annotations

import sys

import torch

from lenet_spec import SpecError, load_spec
from lenet_torch.model import build, layer_param_counts
from lenet_util.cli import Parser


def main(argv: list[str] | None = None) -> int:
    parser = Parser("python -m lenet_torch", __doc__)
    parser.add_argument("spec", nargs="?", default="lenet5", help="preset name or JSON path")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
    except SpecError as e:
        parser.exit(2, f"error: {e}\n")
    net = build(spec)
    out = net(torch.zeros(1, *spec.input_shape))
    counted = sum(layer_param_counts(net).values())
    assert counted == spec.param_count, (counted, spec.param_count)
    print(spec.summary())
    print(f"torch {torch.__version__}: {counted:,} parameters counted by torch, "
          f"logits {tuple(out.shape)} for input (1, {', '.join(map(str, spec.input_shape))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
