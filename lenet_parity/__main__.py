"""``python -m lenet_parity SPEC_OR_FILE``: the parity battery on one spec — every layer's
output, every gradient, an SGD trajectory and batch_norm statistics, torch port against JAX
port — as a table; exit status 0 when all are within the tests' tolerances, 1 otherwise.
With ``--precision bfloat16`` (or tf32): both ports at that precision against the float64
reference, within bounds derived from its unit roundoff and the network's depth.
With ``--train``: the two training programs over N seeds each, and whether they train the
same (an equivalence test); exit status 0 when equivalence is shown, 1 otherwise."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from lenet_kernels import KERNELS
from lenet_kernels.precision import PRECISIONS
from lenet_spec import (
    Spec,
    SpecError,
    WeightsError,
    canonical_dtype,
    check_weights,
    load_spec,
    load_weights,
)
from lenet_train.cli import (
    int_at_least,
    non_negative_int,
    positive_float,
    positive_int,
    seed_type,
)
from lenet_util import OutputError, atomic_write_bytes, check_output
from lenet_util.cli import Parser, stopping_on_interrupt


class UsageError(ValueError):
    """A file or flag that cannot be used; the message names it."""


OWNED_FLAGS = ("--seed", "--seeds", "--workdir", "--resume", "--overwrite", "--quiet")
"""The training flags ``--train`` sets for each run itself."""


def _state_tensor(path: Path, name: str, v: Any) -> np.ndarray:
    """A state dict's tensor as a canonical numpy array; :class:`UsageError` for a tensor that
    is not a dense real tensor of the kind its name says (floats; batch counts integers)."""
    import torch

    if v.layout != torch.strided:
        raise UsageError(f"{path}: tensor {name!r} is {v.layout} (sparse); parity reads "
                         "dense tensors (save state_dict() of the dense module)")
    if v.is_quantized:
        raise UsageError(f"{path}: tensor {name!r} is quantized ({v.dtype}); parity reads "
                         "float tensors (dequantize the module first)")
    if v.is_complex():
        raise UsageError(f"{path}: tensor {name!r} is complex ({v.dtype}); a LeNet's weights "
                         "are real")
    want = canonical_dtype(name)
    if want.kind == "f" and not v.is_floating_point():
        raise UsageError(f"{path}: tensor {name!r} has dtype {v.dtype}, expected floating point")
    if want.kind == "i" and (v.is_floating_point() or v.dtype == torch.bool):
        raise UsageError(f"{path}: tensor {name!r} has dtype {v.dtype}, expected an integer "
                         "count")
    # float32 first: numpy has no bfloat16, and float16/bfloat16 widen exactly
    return (v.detach().float() if v.is_floating_point() else v.detach()).numpy().astype(want)


def _read_weights(path: Path) -> tuple[dict[str, np.ndarray], Spec | None]:
    """Canonical weights from a lenet weights file (safetensors, with its spec) or a torch
    state dict (``.pt`` / ``.pth``, read with ``weights_only=True``; no spec)."""
    if path.suffix in (".pt", ".pth"):
        from lenet_port import PortError, read_state_dict  # imports torch: only for .pt files

        try:
            state = read_state_dict(path)
        except PortError as e:
            raise UsageError(str(e)) from None
        weights = {k: _state_tensor(path, k, v) for k, v in state.items()}
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
    parser.add_argument("--seed", type=seed_type, default=0,
                        help="batches, and the weights when none are given")
    parser.add_argument("--single-step", action="store_true",
                        help="feed every layer the torch port's input (and output gradient), "
                             "so that each row measures its layer alone")
    parser.add_argument("--no-float64", action="store_true",
                        help="skip the float64 reference (it repeats every computation): "
                             "fixed bounds only, with the gradients' absolute floor of 1.2e-7")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="float32: the ports against each other (the battery above); "
                             "bfloat16 or tf32: each port at that precision against the "
                             "float64 reference, within derived bounds (lenet_parity.rounding); "
                             "with --train: both programs at that precision, each also against "
                             "its own float32")
    parser.add_argument("--torch-kernels", choices=KERNELS, default="auto",
                        help="the torch side's kernels (stock: its own layers; fused: the "
                             "tuned formulations; auto: the faster here)")
    parser.add_argument("--jax-kernels", choices=KERNELS, default="auto",
                        help="the JAX side's kernels (as --torch-kernels)")
    train = parser.add_argument_group(
        "--train: do the two programs train the same? (Welch's TOST on N seeds each)")
    train.add_argument("--train", action="store_true",
                       help="run each training program on SPEC at seeds 0 … N−1 and test the "
                            "final test accuracy, test loss and every epoch's accuracy for "
                            "equivalence")
    train.add_argument("--seeds", type=int_at_least(2), default=16, metavar="N",
                       help="runs per program")
    train.add_argument("--epochs", type=positive_int, default=1, help="epochs per run")
    train.add_argument("--margin", type=positive_float, default=0.15, metavar="POINTS",
                       help="equivalence margin of the test accuracy, in percentage points")
    train.add_argument("--loss-margin", type=positive_float, default=0.01, metavar="NATS",
                       help="equivalence margin of the mean test loss")
    train.add_argument("--alpha", type=_alpha, default=0.05,
                       help="level of the test (the confidence interval is 1 − 2α)")
    train.add_argument("--train-args", default="", metavar="FLAGS",
                       help="more flags for both programs, e.g. \"--train-size 6000\"")
    train.add_argument("--jax-args", default="", metavar="FLAGS",
                       help="flags for the JAX program only (e.g. a planted difference)")
    train.add_argument("--torch-args", default="", metavar="FLAGS",
                       help="flags for the torch program only")
    train.add_argument("--json", type=Path, default=None, metavar="F",
                       help="write the runs' records and the tests here")
    args = parser.parse_args(argv)
    with stopping_on_interrupt():
        return _main(parser, args)


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    for flag in ("train_args", "jax_args", "torch_args"):
        try:
            given = shlex.split(getattr(args, flag))
        except ValueError as e:  # an unbalanced quote
            parser.error(f"--{flag.replace('_', '-')}: {e}")
        owned = [a for a in given if a.split("=")[0] in OWNED_FLAGS]
        if owned:
            parser.error(f"--{flag.replace('_', '-')}: {owned[0].split('=')[0]} is set by "
                         "--train itself for every run (seeds 0 … N−1, a temporary workdir "
                         "each, quiet)")
    if args.json is not None:
        try:
            check_output(args.json)  # before the runs, not after them
        except OutputError as e:
            parser.error(f"--json: {e}")
    if args.train:
        return _train(args)
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
    if args.precision != "float32":
        return _precision(spec, sides, args)
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


def _precision(spec: Spec, sides: dict[str, Any], args: argparse.Namespace) -> int:
    """``--precision``: both ports at it against float64 (lenet_parity.rounding)."""
    if args.torch_kernels == "fused":
        print(f"error: --torch-kernels fused: torch's fused kernels compute in float32 only; "
              f"--precision {args.precision} measures torch's own layers", file=sys.stderr)
        return 2
    if args.precision == "tf32":
        print("error: --precision tf32: tf32 exists on NVIDIA GPUs only, and the float64 "
              "reference runs on the CPU; run the programs with --precision tf32 there",
              file=sys.stderr)
        return 2
    torch_w, jax_w = sides["torch"], sides["jax"]
    if torch_w is not None and jax_w is not None and any(
            not np.array_equal(torch_w[k], jax_w[k]) for k in torch_w):
        print(f"error: --precision {args.precision} compares each port with the float64 "
              "reference on the same weights; give one weights file", file=sys.stderr)
        return 2
    import lenet_torch
    from lenet_parity.rounding import precision_battery

    weights = torch_w if torch_w is not None else jax_w
    if weights is None:
        weights = lenet_torch.get_weights(lenet_torch.build(spec, seed=args.seed))
    rows = precision_battery(spec, weights, args.precision, batch=args.batch, seed=args.seed,
                             steps=args.steps, jax_kernels=args.jax_kernels,
                             progress=lambda what: print(f"  {what}…", file=sys.stderr,
                                                         end="\r"))
    print(" " * 40, file=sys.stderr, end="\r")
    print(f"{spec.name} at {args.precision} against float64 (share: the error as a fraction "
          "of its bound; ≤ 1 passes)")
    width = max(len(r.check) for r in rows)
    for r in rows:
        where = f"  ({r.where})" if r.where else ""
        print(f"  {r.check:<{width}}  {r.side:<5}  share {r.share:6.3f}  error "
              f"{r.error:.3g}{where}{'' if r.ok else '  FAIL'}")
    bad = next((r for r in rows if not r.ok), None)
    if bad is None:
        print(f"parity at {args.precision}: ok (largest share "
              f"{max(r.share for r in rows):.2f})")
        return 0
    print(f"parity at {args.precision}: {bad.side} exceeds its bound: {bad.check}"
          f"{f' at {bad.where}' if bad.where else ''} (share {bad.share:.3g})")
    return 1


def _alpha(text: str) -> float:
    value = positive_float(text)
    if value >= 0.5:
        raise argparse.ArgumentTypeError(f"must be below 0.5, got {text}")
    return value


def _train(args: argparse.Namespace) -> int:
    """``--train``: both programs on N seeds, the equivalence tests, the verdict."""
    from lenet_parity.population import ProgramFailed, compare, report, run_populations, shown

    common = ["--spec", args.spec, "--epochs", str(args.epochs), *shlex.split(args.train_args)]
    own = {"jax": shlex.split(args.jax_args), "torch": shlex.split(args.torch_args)}
    lower = args.precision != "float32"
    at = ["--precision", args.precision] if lower else []
    flags = {fw: [*common, *at, *own[fw]] for fw in ("jax", "torch")}
    pairs = [("jax", "torch")]
    if lower:  # each program at the lower precision against itself at float32
        flags.update({f"{fw} float32": [*common, *own[fw]] for fw in ("jax", "torch")})
        pairs += [("jax", "jax float32"), ("torch", "torch float32")]
    print(f"{args.seeds} seeds per program{f' at {args.precision} and float32' if lower else ''}"
          f", {args.epochs} epoch(s), margins ±{args.margin:g} points (accuracy) and "
          f"±{args.loss_margin:g} (loss), α = {args.alpha:g}", file=sys.stderr, flush=True)
    try:
        runs = run_populations(args.seeds, flags,
                               lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    except ProgramFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = [compare(runs, args.margin / 100, args.loss_margin, args.alpha, pair)
               for pair in pairs]
    for result in results:
        if lower:
            print(f"{shown(result['pair'][0])} against {shown(result['pair'][1])}:")
        for line in report(result):
            print(f"  {line}" if lower else line)
    equivalent = all(r["equivalent"] for r in results)
    if lower:
        print("verdict: " + ("all three pairs train the same within the margins" if equivalent
                             else "equivalence not shown for every pair"))
    if args.json:
        comparisons = [{"pair": r["pair"], "tests": {k: {**vars(t), "equivalent": t.equivalent}
                                                     for k, t in r["tests"].items()},
                        "equivalent": r["equivalent"]} for r in results]
        record = {"flags": flags, "seeds": args.seeds, "runs": runs,
                  **({"comparisons": comparisons} if lower else
                     {"tests": comparisons[0]["tests"]}),
                  "equivalent": equivalent}
        atomic_write_bytes(args.json, json.dumps(record, indent=1).encode())
    return 0 if equivalent else 1


if __name__ == "__main__":
    sys.exit(main())
