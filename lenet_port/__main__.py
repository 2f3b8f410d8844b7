"""``python -m lenet_port FILE.py:CLASS --input-shape C,H,W -o SPEC.json``: the porter's
command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lenet_port.assemble import port
from lenet_port.files import build_module, load_class, load_state_dict
from lenet_spec import save_weights
from lenet_util import LenetError, atomic_write_bytes, check_output
from lenet_util.cli import Parser, stopping_on_interrupt


def input_shape_arg(text: str) -> tuple[int, ...]:
    """An argparse type: C,H,W, or H,W for images without a channel axis."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W (three positive ints; H,W for images "
                                         f"without a channel axis), got {text!r}")
    return shape


def kwargs_arg(text: str) -> dict:
    """An argparse type: a JSON object of keyword arguments."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of keyword arguments, got "
                                         f"{type(value).__name__}")
    return value


def main(argv: list[str] | None = None) -> int:
    """``python -m lenet_port FILE.py:CLASS --input-shape C,H,W -o SPEC.json``."""
    parser = Parser(
        prog="python -m lenet_port",
        description="Write the spec (and the canonical weights) of a torch module, checked to "
                    "give the module's logits, and print its summary table.")
    parser.add_argument("target", metavar="FILE.py:NAME",
                        help="the module's class, or a function that returns the module "
                             "(built with --kwargs)")
    parser.add_argument("--kwargs", type=kwargs_arg, default={}, metavar="JSON",
                        help="keyword arguments for the class or function, as a JSON object, "
                             "e.g. '{\"num_classes\": 10}' (default: none)")
    parser.add_argument("--input-shape", type=input_shape_arg, required=True, metavar="C,H,W",
                        help="one input image's shape as the module takes it, e.g. 1,32,32 "
                             "(28,28: images without a channel axis, which the module adds; "
                             "84,84,4: channels last, which the module moves first)")
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
    with stopping_on_interrupt():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        for out in (args.output, args.weights):
            if out is not None:
                check_output(out)
        module = build_module(args.target, load_class(args.target), args.kwargs)
        if args.state_dict is not None:
            load_state_dict(module, args.state_dict)
        result = port(module, args.input_shape, args.name, args.output_index)
        atomic_write_bytes(args.output, (result.spec.to_json() + "\n").encode())
        if args.weights is not None:
            save_weights(args.weights, result.weights, result.spec)
    except (LenetError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.spec.summary())
    wrote = f"{args.output}" + (f" and {args.weights}" if args.weights is not None else "")
    print(f"ported {args.target} via {result.tracer}: the spec's torch network gives the "
          f"module's logits (max |Δ| {result.gap:.2g}); wrote {wrote}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
