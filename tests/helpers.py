"""The tests' shared helpers: random valid specs, the parity battery's adapters, twin nets in
both frameworks, and writers of the publishers' data formats."""

from __future__ import annotations

import gzip
import importlib
import io
import subprocess
import sys
import tarfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume
from hypothesis import strategies as st

from lenet_parity.battery import (  # noqa: F401  (the tests' helpers, shared with the CLI)
    NEAR_KINK,
    buffers_gap,
    busy_batch_norms,
    clear_batch,
    jax_canonical,
    jax_logits,
    jax_loss_and_grads,
    max_abs_diff,
    near_kinks,
    nhwc,
    random_batch,
    torch_logits,
    torch_loss_and_grads,
    without_dropout,
)
from lenet_spec import (
    ELU,
    GELU,
    AvgPool,
    BatchNorm,
    Conv,
    Flatten,
    LeakyReLU,
    Linear,
    MaxPool,
    ReLU,
    Scale,
    Sigmoid,
    SiLU,
    Spec,
    Tanh,
    pooled_size,
)
from lenet_train.data import cifar_bytes, idx_bytes, load
from lenet_train.data.catalog import CIFAR_FILES, IDX_FILES

REDUNDANT_BIAS = """A bias right before a batch_norm changes nothing (batch_norm subtracts the
channel's mean), so its exact gradient is 0 and its float32 gradient rounding noise, which Adam
divides by its own size into steps of ~lr: the bias, and the running mean with it, wander
differently in any two implementations (torch against itself with oneDNN off: 3.4e-5 in the
parameters, 9.6e-5 in the running statistics after 20 Adam steps). Random specs, like
lenet5_bn and torchvision's models, leave it out."""

SCALE_BEFORE_NORM = """A weight with few inputs per output feeding a batch_norm is nearly a pure
scale of its channel, which the normalisation undoes: its gradient is then mostly the remainder
of terms that cancel, resolved by float32 only to ~1e-8 of their sum, not to 1e-5 of the result.
Hypothesis found two: conv1 1×1 on one channel (weight −0.0075), a depthwise conv, a batch_norm
of channel variance 3.4e-5 — that weight's gradient 0.362 came out 3.9e-7 (torch) and 5.0e-6
(JAX, autodiff through the variance; 2.4e-7 with torch's closed form, which the JAX port now
uses) from float64; and a 2→2 linear layer before a batch_norm of 16 values, 9.1e-6 apart on
a gradient of 0.19. Random specs with a batch_norm draw conv and linear layers of fan-in ≥ 4."""

ACTIVATIONS = [ReLU, Tanh, Sigmoid, GELU, lambda: GELU("tanh"), lambda: LeakyReLU(0.1),
               lambda: ELU(0.5), SiLU]
"""Every activation of the spec, GELU in both forms, leaky_relu and elu off their defaults."""


@st.composite
def specs(draw: st.DrawFn, max_blocks: int = 2, batch_norm: bool = True) -> Spec:
    """Valid specs: an input scale sometimes (a number or per channel), conv blocks (any
    stride, padding, dilation, groups, bias or not, optionally batch_norm, any activation,
    pooling with or without padding and ceil_mode), flatten, an MLP head (bias or not,
    batch_norm)."""
    input_shape = c, h, w = (draw(st.integers(1, 3)), draw(st.integers(6, 20)),
                             draw(st.integers(6, 20)))
    layers: list = []
    if draw(st.booleans()):  # the input scaled: a number or one value per channel
        per = draw(st.booleans())
        value = st.floats(0.25, 4.0) if not per else st.tuples(*[st.floats(0.25, 4.0)] * c)
        layers.append(Scale(draw(value), draw(st.floats(-1.0, 1.0))))
    for _ in range(draw(st.integers(0, max_blocks))):
        dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        kh = draw(st.integers(1, max(1, min(5, (h - 1) // dh + 1))))
        kw = draw(st.integers(1, max(1, min(5, (w - 1) // dw + 1))))
        sh, sw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
        groups = draw(st.sampled_from([g for g in (1, 2, 3) if c % g == 0]))
        c = groups * draw(st.integers(1, 3))
        norm = batch_norm and draw(st.booleans())
        layers.append(Conv(c, (kh, kw), (sh, sw), (ph, pw), (dh, dw), groups,
                           not norm and draw(st.booleans())))
        h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if norm:  # after a bias-free layer: see REDUNDANT_BIAS
            layers.append(BatchNorm(draw(st.sampled_from([0.1, 0.3])), affine=draw(st.booleans())))
        act = draw(st.sampled_from([None, *ACTIVATIONS]))
        if act:
            layers.append(act())
        pool = draw(st.sampled_from([None, MaxPool, AvgPool]))
        if pool and h >= 2 and w >= 2:
            k = draw(st.integers(2, min(3, h, w)))
            s = draw(st.sampled_from([None, 1, 2]))
            pad = draw(st.integers(0, k // 2))
            ceil = draw(st.booleans())
            extra = {"count_include_pad": draw(st.booleans())} if pool is AvgPool else {}
            layers.append(pool(k, s, padding=pad, ceil_mode=ceil, **extra))
            s = s or k
            h, w = (pooled_size(h, k, s, pad, ceil), pooled_size(w, k, s, pad, ceil))
    layers.append(Flatten())
    for _ in range(draw(st.integers(0, 2))):
        norm = batch_norm and draw(st.booleans())
        layers.append(Linear(draw(st.integers(1, 24)), not norm and draw(st.booleans())))
        if norm:
            layers.append(BatchNorm())
        layers.append(draw(st.sampled_from(ACTIVATIONS))())
    layers.append(Linear(draw(st.integers(2, 10))))
    spec = Spec("random", input_shape, tuple(layers))
    assume(not any(isinstance(layer, BatchNorm) for layer in spec.layers) or all(
        info.fan_in >= 4 for info in spec.infos if isinstance(info.layer, (Conv, Linear))))
    return spec  # SCALE_BEFORE_NORM


SLOW = pytest.mark.slow
"""Left out of the fast tier (``pytest -m "not slow"``); the full suite runs everything."""


def fast_only(values, *fast) -> list:
    """``values`` as pytest parameters with all but ``fast`` marked slow: the fast tier runs
    one case of the test, the full suite all of them."""
    return [v if v in fast else pytest.param(v, marks=SLOW) for v in values]


# ----------------------------------------------------------------------------- the programs

PROGRAMS = {"jax": "lenet_jax.train", "torch": "lenet_torch.train"}
"""Each framework's training program."""

HANG = 3600
"""Seconds after which a test calls a process hung: a guard against a hang, never a speed
bound (the slowest process of the suite takes about a minute on an idle machine and a few on
a loaded one; CI's budget is 90 minutes). No test waits on the machine's speed otherwise."""


def run_program(program: str, *argv: str) -> subprocess.CompletedProcess:
    """A training program (a framework's name or the module, e.g. ``lenet_torch.train``) run
    in this process on ``argv`` as its command line would run it: its exit status and what it
    printed, as ``subprocess.run`` would return them. No interpreter start and no imports per
    run; the tests of the real command line (its first moments, its signals, what the
    frameworks print on import) start it as a process."""
    module = importlib.import_module(PROGRAMS.get(program, program))
    threads = _torch_threads()
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = module.main([str(a) for a in argv])
        except SystemExit as e:  # the parser's errors and --help
            code = e.code if isinstance(e.code, int) else 2
    if threads is not None:  # --threads sets torch's process-wide count: put it back
        import torch

        torch.set_num_threads(threads)
    return subprocess.CompletedProcess([program, *argv], code, out.getvalue(), err.getvalue())


def _torch_threads() -> int | None:
    if "torch" not in sys.modules:
        return None
    return sys.modules["torch"].get_num_threads()


def run_command(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    """``python -m argv...`` in a new process (the real command line), output captured."""
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          **kwargs)


def one_line_error(res: subprocess.CompletedProcess, *parts: str, status: int = 2) -> str:
    """The one ``error:`` line of a program that ended with ``status`` (no traceback), holding
    every one of ``parts``."""
    assert res.returncode == status, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if "error: " in line]
    assert len(lines) == 1, res.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- both ports
# Imported lazily so that the spec tests run without either framework.


KERNEL_PAIRS = [("stock", "stock"), ("fused", "fused"), ("stock", "fused"), ("fused", "stock")]
"""(torch, JAX) kernels: the parity battery holds for each pairing, across frameworks too."""


def twin_nets(spec: Spec, seed: int = 0, kernels: tuple[str, str] = ("auto", "auto")):
    """A torch net and a JAX net holding the same weights (torch's, copied into JAX), built
    with ``kernels`` (torch's, JAX's)."""
    import lenet_jax
    import lenet_torch

    t = lenet_torch.build(spec, seed, kernels=kernels[0])
    busy_batch_norms(t, seed)
    j = lenet_jax.build(spec, seed + 1, kernels=kernels[1])
    lenet_jax.set_weights(j, lenet_torch.get_weights(t))
    return t, j


PORT_TOL = 1e-5
"""max |Δ| of a port's outputs relative to max(1, max |output|): the porter's own check."""


def port_round_trip(module, shape: tuple[int, ...], x=None, tracer: str | None = None):
    """``module`` ported from ``shape`` (one input as it takes it); the Flax and torch models
    of its spec, given its weights, give its outputs within :data:`PORT_TOL` on ``x`` (a
    fresh batch of 5 if None; evaluation mode), the torch one also in its own NCHW layout.
    The port's result."""
    import jax.numpy as jnp
    import torch

    import lenet_jax
    import lenet_torch
    from lenet_port import port

    torch.manual_seed(2)
    result = port(module, shape)
    if tracer:
        assert result.tracer == tracer
    x = torch.randn(5, *shape) if x is None else x
    with torch.no_grad():
        want = module.eval()(x).reshape(len(x), -1).numpy()
    bound = PORT_TOL * max(1.0, float(np.abs(want).max()))
    spec = result.spec
    flax = lenet_jax.build(spec)
    lenet_jax.set_weights(flax, result.weights)
    flax.eval()
    as_given = spec.fed != "NCHW"  # NHW and NHWC batches: what JAX takes as they are
    got = np.asarray(flax(jnp.asarray(x.numpy() if as_given else x.numpy().transpose(0, 2, 3, 1))))
    assert np.abs(got - want).max() <= bound, np.abs(got - want).max()
    t = lenet_torch.build(spec)
    lenet_torch.set_weights(t, result.weights)
    nchw = (x.unsqueeze(1) if spec.fed == "NHW" else
            x.permute(0, 3, 1, 2) if spec.fed == "NHWC" else x)
    with torch.no_grad():
        for given in (x, nchw):
            assert np.abs(t.eval()(given).numpy() - want).max() <= bound
    return result


# ----------------------------------------------------------------------------- data files


def mnist(split: str, folder: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST's ``split`` as the resolver finds it: images uint8 (N, 28, 28), labels int64."""
    found = load("mnist", split, folder)
    return found.images[:, 0], found.labels


def idx_split(folder: Path, split: str, n: int, gz: bool = False, seed: int = 0,
              labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Write an MNIST-family split of ``n`` random images as IDX files (plain or .gz)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.uint8) if labels is None else labels
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in zip(IDX_FILES[split], (images, y), strict=True):
        data = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
        else:
            (folder / name).write_bytes(data)
    return images, y.astype(np.int64)

def cifar_images(n: int, seed: int = 0, learnable: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``n`` CIFAR-shaped images and labels; ``learnable``: each class a colour and a bright
    square at its own place over noise, so that a linear model can tell them apart."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    if not learnable:
        return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), labels
    images = rng.normal(100, 30, (n, 3, 32, 32))
    palette = np.random.default_rng(99).uniform(60, 200, (10, 3))  # the same in every file
    for i, c in enumerate(labels):
        row, col = divmod(int(c), 5)
        images[i] += (palette[c] - 100)[:, None, None]
        images[i, :, 4 + 12 * row : 12 + 12 * row, 2 + 6 * col : 6 + 6 * col] += 90
    return np.clip(images, 0, 255).astype(np.uint8), labels

def cifar_folder(folder: Path, per_file: int, seed: int = 0, learnable: bool = False,
                 test: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The six CIFAR-10 binary files, ``per_file`` records each (``test`` in the test file)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, names in CIFAR_FILES.items():
        count = per_file if split == "train" else (test or per_file)
        xs, ys = [], []
        for k, name in enumerate(names):
            x, y = cifar_images(count, seed * 100 + k + (50 if split == "test" else 0), learnable)
            (folder / name).write_bytes(cifar_bytes(x, y))
            xs.append(x)
            ys.append(y)
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    return out

def tar_gz(path: Path, members: dict[str, bytes], link: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return path
