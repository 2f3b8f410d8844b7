"""``python -m lenet_jax [SPEC]``: build the spec in Flax and print its summary table."""

from __future__ import annotations

import sys

import flax
import jax.numpy as jnp

from lenet_jax.model import build, layer_param_counts
from lenet_spec import SpecError, load_spec
from lenet_util.cli import Parser


def main(argv: list[str] | None = None) -> int:
    parser = Parser("python -m lenet_jax", __doc__)
    parser.add_argument("spec", nargs="?", default="lenet5", help="preset name or JSON path")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
    except SpecError as e:
        parser.exit(2, f"error: {e}\n")
    net = build(spec)
    c, h, w = spec.input_shape
    out = net(jnp.zeros((1, h, w, c)))
    counted = sum(layer_param_counts(net).values())
    assert counted == spec.param_count, (counted, spec.param_count)
    print(spec.summary())
    print(f"flax {flax.__version__}: {counted:,} parameters counted by flax, "
          f"logits {tuple(out.shape)} for input (1, {h}, {w}, {c})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
