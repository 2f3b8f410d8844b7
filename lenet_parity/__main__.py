"""``python -m lenet_parity SPEC_OR_FILE``: the parity battery on one spec — every layer's
output, every gradient, an SGD trajectory and batch_norm statistics, torch port against JAX
port — as a table; exit status 0 when all are within the tests' tolerances, 1 otherwise."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from lenet_kernels import KERNELS
from lenet_spec import (
    Spec,
    SpecError,
    WeightsError,
    canonical_dtype,
    check_weights,
    load_spec,
    load_weights,
)
from lenet_spec.cli import Parser
from lenet_train.cli import non_negative_int, positive_int


class UsageError(ValueError):
    """A file or flag that cannot be used; the message names it."""


def _read_weights(path: Path) -> tuple[dict[str, np.ndarray], Spec | None]:
    """Canonical weights from a lenet weights file (safetensors, with its spec) or a torch
    state dict (``.pt`` / ``.pth``, read with ``weights_only=True``; no spec)."""
    if path.suffix in (".pt", ".pth"):
        from lenet_port import PortError, read_state_dict  # imports torch: only for .pt files

        try:
            state = read_state_dict(path)
        except PortError as e:
            raise UsageError(str(e)) from None
        # float32 first: numpy has no bfloat16, and float16/bfloat16 widen exactly
        weights = {k: (v.detach().float() if v.is_floating_point() else v.detach()).numpy()
                   .astype(canonical_dtype(k)) for k, v in state.items()}
        spec = None
    else:
        try:
            weights, spec = load_weights(path)
        except WeightsError as e:
            raise UsageError(str(e)) from None
    bad = next((k for k, v in weights.items() if not np.all(np.isfinite(v))), None)
    if bad is not None:
        raise UsageError(f"{path}: tensor {bad!r} holds NaN or infinite values; parity needs "
                         "finite weights")
    return weights, spec


def main(argv: list[str] | None = None) -> int:
    parser = Parser("python -m lenet_parity", __doc__)
    parser.add_argument("spec", metavar="SPEC_OR_FILE",
                        help="a preset, a JSON spec, or a weights file (its spec, and the "
                             "weights for both sides)")
    parser.add_argument("--torch-weights", type=Path, metavar="F",
                        help="the torch side's weights: a weights file or a state dict (.pt)")
    parser.add_argument("--jax-weights", type=Path, metavar="F",
                        help="the JAX side's weights: a weights file or a state dict (.pt)")
    parser.add_argument("--steps", type=non_negative_int, default=20,
                        help="SGD steps of the trajectory (0: none)")
    parser.add_argument("--batch", type=positive_int, default=16, help="batch size")
    parser.add_argument("--seed", type=int, default=0,
                        help="batches, and the weights when none are given")
    parser.add_argument("--single-step", action="store_true",
                        help="feed every layer the torch port's input (and output gradient), "
                             "so that each row measures its layer alone")
    parser.add_argument("--no-float64", action="store_true",
                        help="skip the float64 reference (it repeats every computation): "
                             "fixed bounds only, with the gradients' absolute floor of 1.2e-7")
    parser.add_argument("--torch-kernels", choices=KERNELS, default="auto",
                        help="the torch side's kernels (stock: its own layers; fused: the "
                             "tuned formulations; auto: the faster here)")
    parser.add_argument("--jax-kernels", choices=KERNELS, default="auto",
                        help="the JAX side's kernels (as --torch-kernels)")
    args = parser.parse_args(argv)
    try:
        base: dict[str, np.ndarray] | None = None
        path = Path(args.spec)
        if path.suffix == ".safetensors" or (path.is_file() and path.suffix in (".pt", ".pth")):
            base, spec = _read_weights(path)
            if spec is None:
                raise UsageError(f"{path}: a state dict holds no spec; give the spec first and "
                                 "the state dict as --torch-weights")
        else:
            spec = load_spec(args.spec)
        sides = {}
        for side, file in (("torch", args.torch_weights), ("jax", args.jax_weights)):
            if file is None:
                sides[side] = base
                continue
            weights, own = _read_weights(file)
            if own is not None and own != spec:
                raise UsageError(f"{file}: holds weights of spec {own.name!r}, which differs "
                                 f"from {spec.name!r}")
            try:
                check_weights(spec, weights)
            except WeightsError as e:
                raise UsageError(f"{file}: {e}") from None
            sides[side] = weights
    except (SpecError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # both frameworks load here, once the flags and files are known to be good
    from lenet_parity.battery import NoClearBatch
    from lenet_parity.check import check

    if args.batch < 2 and spec.buffer_count:
        print(f"error: --batch {args.batch}: {spec.name} has batch_norm, whose training-mode "
              "statistics need at least 2 images", file=sys.stderr)
        return 2
    try:
        report = check(spec, sides["torch"], sides["jax"], steps=args.steps, batch=args.batch,
                       seed=args.seed, single_step=args.single_step,
                       kernels=(args.torch_kernels, args.jax_kernels),
                       reference=not args.no_float64,
                       progress=lambda what: print(f"  {what}…", file=sys.stderr, end="\r"))
    except NoClearBatch as e:
        print(f"\nerror: {e}: every random batch has an image within 1e-6 of a kink (a "
              "max-pool tie, an activation at 0); try another --seed or a smaller --batch",
              file=sys.stderr)
        return 2
    print(" " * 40, file=sys.stderr, end="\r")
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
