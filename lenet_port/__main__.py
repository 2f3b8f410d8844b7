"""``python -m lenet_port FILE.py:CLASS --input-shape C,H,W -o SPEC.json``: the porter's
command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lenet_port.assemble import port
from lenet_port.errors import PortError, first_line
from lenet_port.files import load_class, load_state_dict
from lenet_spec import save_weights
from lenet_util import atomic_write_bytes
from lenet_util.cli import Parser


def input_shape_arg(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W (three positive ints), got {text!r}")
    return shape  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    """``python -m lenet_port FILE.py:CLASS --input-shape C,H,W -o SPEC.json``."""
    parser = Parser(
        prog="python -m lenet_port",
        description="Write the spec (and the canonical weights) of a torch module, checked to "
                    "give the module's logits, and print its summary table.")
    parser.add_argument("target", metavar="FILE.py:CLASS",
                        help="the module's class, built with no arguments")
    parser.add_argument("--input-shape", type=input_shape_arg, required=True, metavar="C,H,W",
                        help="one input image's shape, e.g. 1,32,32")
    parser.add_argument("--state-dict", type=Path, metavar="FILE",
                        help="weights to load first (read with torch.load(weights_only=True))")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="SPEC.json",
                        help="where to write the spec")
    parser.add_argument("--weights", type=Path, metavar="OUT.safetensors",
                        help="where to write the canonical weights (with their spec)")
    parser.add_argument("--name", help="the spec's name (default: the class's name)")
    parser.add_argument("--output-index", type=int, default=None, metavar="I",
                        help="for a forward that returns a tuple: the index of the logits in it")
    args = parser.parse_args(argv)
    try:
        cls = load_class(args.target)
        try:
            module = cls()
        except Exception as e:
            raise PortError(f"{args.target}: {cls.__name__}() failed: {first_line(e)} (the "
                            "class must build with no arguments)") from None
        if args.state_dict is not None:
            load_state_dict(module, args.state_dict)
        result = port(module, args.input_shape, args.name, args.output_index)
        atomic_write_bytes(args.output, (result.spec.to_json() + "\n").encode())
        if args.weights is not None:
            save_weights(args.weights, result.weights, result.spec)
    except (PortError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.spec.summary())
    wrote = f"{args.output}" + (f" and {args.weights}" if args.weights is not None else "")
    print(f"ported {args.target} via {result.tracer}: the spec's torch network gives the "
          f"module's logits (max |Δ| {result.gap:.2g}); wrote {wrote}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
