"""``python -m lenet_spec show NAME_OR_PATH``: print a spec's summary table."""

from __future__ import annotations

import sys

from lenet_spec import SpecError, load_spec
from lenet_spec.presets import PRESETS
from lenet_util.cli import Parser


def main(argv: list[str] | None = None) -> int:
    parser = Parser("python -m lenet_spec", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print the summary table of a preset or spec file")
    show.add_argument("spec", help=f"preset ({', '.join(PRESETS)}) or path to a JSON spec")
    show.add_argument("--json", action="store_true", help="print the spec's JSON instead")
    sub.add_parser("list", help="list the presets")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, spec in PRESETS.items():
            print(f"{name:16s} {spec.param_count:>9,} parameters  input {spec.input_shape}")
        return 0
    try:
        spec = load_spec(args.spec)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(spec.to_json() if args.json else spec.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
