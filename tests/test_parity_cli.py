"""``python -m lenet_parity``: the parity battery on a user's spec, its table, its verdict and
exit status, and where it points when a port is wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import SLOW

import lenet_jax.model
import lenet_torch
from lenet_parity import check
from lenet_parity.__main__ import main
from lenet_parity.check import FORWARD, GRADIENTS, STATISTICS, TRAJECTORY
from lenet_spec import (
    GELU,
    PRESETS,
    BatchNorm,
    Conv,
    Flatten,
    Linear,
    MaxPool,
    ReLU,
    Spec,
    save_weights,
)


@SLOW
def test_presets_pass_with_every_section() -> None:
    """lenet5_bn, both modes: every row within its bound, and every section present."""
    for single in (False, True):  # the float64 reference once (it doubles the time)
        report = check(PRESETS["lenet5_bn"], steps=3, batch=8, single_step=single,
                       reference=not single)
        assert report.ok, report.table()
        sections = {row.section for row in report.rows}
        assert sections == {FORWARD, GRADIENTS, TRAJECTORY, STATISTICS}
        names = [row.name for row in report.rows if row.section == FORWARD]
        assert names[:2] == ["conv1", "bn1"] and names[-1] == "logits (whole network)"
        assert report.verdict().startswith("parity: ok (forward: 17 checks")


def _perturbed(spec: Spec, name: str, by: float) -> tuple[dict, dict]:
    weights = lenet_torch.get_weights(lenet_torch.build(spec))
    other = {k: v.copy() for k, v in weights.items()}
    other[name] = other[name] + by
    return weights, other


@SLOW
def test_weights_that_differ_diverge_at_their_layer() -> None:
    """conv2's weights 1e-3 apart: the first divergence is conv2; without --single-step every
    later layer diverges too, with it only conv2 does (its input is torch's)."""
    spec = PRESETS["lenet5"]
    a, b = _perturbed(spec, "conv2.weight", 1e-3)
    report = check(spec, a, b, steps=0, batch=4, reference=False)
    assert not report.ok
    assert report.verdict().startswith(
        "parity: first divergence at conv2 (forward, evaluation mode: conv2 max |Δ|")
    bad = [row.layer for row in report.rows if row.section == FORWARD and not row.ok]
    assert bad[0] == "conv2" and "fc3" in bad and "logits" in bad
    single = check(spec, a, b, steps=0, batch=4, single_step=True, reference=False)
    bad = [row.layer for row in single.rows if row.section == FORWARD and not row.ok]
    assert bad == ["conv2", "logits"]
    assert single.notes[1].endswith("the two sides differ by up to 0.001 (conv2.weight)")


@SLOW
def test_a_wrong_layer_in_a_port_is_found(monkeypatch) -> None:
    """A JAX port whose exact GELU is the tanh approximation (Flax's default, a real porting
    pitfall): --single-step points at the gelu alone, forward and backward."""
    spec = Spec("gelu_net", (1, 8, 8), (Conv(4, 3), GELU(), MaxPool(2), Flatten(), Linear(5),
                                        ReLU(), Linear(3)))
    assert check(spec, steps=0, batch=8, single_step=True).ok
    import jax

    monkeypatch.setitem(lenet_jax.model.ACTIVATIONS, GELU,
                        lambda layer, x: jax.nn.gelu(x, approximate=True))
    report = check(spec, steps=0, batch=8, single_step=True, kernels=("stock", "stock"))
    assert report.verdict().startswith("parity: first divergence at gelu (1) (forward")
    bad = {(row.section, row.layer) for row in report.rows if not row.ok}
    assert bad <= {(FORWARD, "gelu (1)"), (FORWARD, "logits"), (GRADIENTS, "gelu (1)")}
    assert (GRADIENTS, "gelu (1)") in bad


@SLOW
def test_command_line(tmp_path, capsys) -> None:
    spec = PRESETS["lenet5"]
    a, b = _perturbed(spec, "fc2.bias", 1e-3)
    save_weights(tmp_path / "a.safetensors", a, spec)
    save_weights(tmp_path / "b.safetensors", b, spec)
    torch.save({k: torch.from_numpy(v) for k, v in a.items()}, tmp_path / "a.pt")
    assert main(["lenet5", "--steps", "2", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("parity: ok (forward: 13 checks")
    assert "optimizer trajectory" in out and "DIVERGES" not in out
    assert main([str(tmp_path / "a.safetensors"), "--jax-weights", str(tmp_path / "b.safetensors"),
                 "--steps", "0", "--batch", "4"]) == 1
    out = capsys.readouterr().out
    assert "fc2 " in out and "DIVERGES" in out
    assert out.rstrip().splitlines()[-1].startswith("parity: first divergence at fc2 (forward")
    assert main(["lenet5", "--torch-weights", str(tmp_path / "a.pt"), "--jax-weights",
                 str(tmp_path / "a.safetensors"), "--steps", "1", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "torch err" in out and "bound: the larger of the fixed bound" in out
    assert main(["lenet5", "--steps", "1", "--batch", "4", "--no-float64"]) == 0
    out = capsys.readouterr().out
    assert "bound: the larger" not in out and "DIVERGES" not in out


@pytest.mark.parametrize("args, message", [
    (["nope.json"], "nope.json: no such spec file"),
    (["{dir}/a.pt"], "a.pt: a state dict holds no spec"),
    (["lenet5_3x3", "--torch-weights", "{dir}/a.safetensors"],
     "a.safetensors: holds weights of spec 'lenet5', which differs from 'lenet5_3x3'"),
    (["lenet5_3x3", "--jax-weights", "{dir}/a.pt"],
     "a.pt: lenet5_3x3: tensor 'conv1.weight' has shape \\(6, 1, 5, 5\\), the spec expects "
     "\\(6, 1, 3, 3\\)"),
    (["lenet5", "--jax-weights", "{dir}/junk.pt"], "junk.pt: not a state dict torch.load"),
    (["lenet5", "--jax-weights", "{dir}/missing.safetensors"], "no such weights file"),
    (["lenet5_bn", "--batch", "1"], "--batch 1: lenet5_bn has batch_norm"),
    (["lenet5", "--torch-weights", "{dir}/nan.pt"],
     "nan.pt: tensor 'conv1.weight' holds NaN or infinite values"),
])
def test_command_line_errors(tmp_path, capsys, args: list[str], message: str) -> None:
    spec = PRESETS["lenet5"]
    weights = lenet_torch.get_weights(lenet_torch.build(spec))
    save_weights(tmp_path / "a.safetensors", weights, spec)
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, tmp_path / "a.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    bad = {k: torch.from_numpy(v) for k, v in weights.items()}
    bad["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(bad, tmp_path / "nan.pt")
    assert main([a.format(dir=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert __import__("re").search(message, err), err


@SLOW
def test_a_bfloat16_state_dict_is_read(tmp_path, capsys) -> None:
    """A state dict saved in bfloat16 (numpy has no such type) widens to float32 exactly; its
    parity with itself holds."""
    spec = PRESETS["lenet5"]
    weights = lenet_torch.get_weights(lenet_torch.build(spec))
    state = {k: torch.from_numpy(v).to(torch.bfloat16) if v.dtype == np.float32
             else torch.from_numpy(v) for k, v in weights.items()}
    torch.save(state, tmp_path / "bf16.pt")
    assert main(["lenet5", "--torch-weights", str(tmp_path / "bf16.pt"), "--steps", "0",
                 "--batch", "4", "--no-float64"]) == 0
    assert "bfloat16" not in capsys.readouterr().err


def test_layouts_round_trip() -> None:
    """The JAX port's flat H·W·C activations and NHWC maps go to torch's layout and back."""
    from lenet_parity.check import to_jax_layout, to_torch_layout

    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    assert np.array_equal(to_torch_layout(to_jax_layout(x, None), None), x)
    flat = x.reshape(2, -1)
    assert np.array_equal(to_jax_layout(flat, (3, 4, 5)), x.transpose(0, 2, 3, 1).reshape(2, -1))
    assert np.array_equal(to_torch_layout(to_jax_layout(flat, (3, 4, 5)), (3, 4, 5)), flat)


CONV_BIAS_BN = Spec("conv_bias_bn", (1, 14, 14), (
    Conv(8, 5, padding=2, name="layer1_0"), BatchNorm(name="layer1_1"), ReLU(), MaxPool(2),
    Conv(16, 5, padding=2, name="layer2_0"), BatchNorm(name="layer2_1"), ReLU(), MaxPool(2),
    Flatten(), Linear(10, name="fc")))
"""yunjey's ConvNet, smaller: a conv with a bias feeding a training-mode batch_norm, whose
bias gradient is zero in exact arithmetic, so both ports report float32 noise there."""


@SLOW
def test_rounding_noise_is_not_a_divergence() -> None:
    """On a correct conv-bias → batch_norm port the bias gradients' gap exceeds any fixed
    relative bound (their scale is noise), and the float64 reference shows each side's own
    float32 error explains it: the run passes, through that explanation."""
    report = check(CONV_BIAS_BN, steps=5, batch=8, seed=1)
    assert report.ok, report.table()
    bias = next(r for r in report.rows if r.section == GRADIENTS and r.name == "layer1_0.bias")
    assert bias.gap > bias.bound  # a fixed relative bound alone would call it a divergence
    assert bias.gap <= bias.rounding
    assert "torch err" in report.table() and report.notes[-1].startswith("bound: the larger")


@SLOW
def test_planted_bugs_are_named_at_their_layer(monkeypatch) -> None:
    """A JAX conv weight loaded × 1.001, and a batch_norm given Flax's momentum convention
    (the running statistics keep 0.1 of the batch's instead of 0.9): each is the first
    divergence, at its layer, with the float64 reference on."""
    spec = CONV_BIAS_BN
    original = lenet_jax.model._from_canonical

    def scaled(info, weight):
        kernel = original(info, weight)
        return kernel * 1.001 if info.label == "layer2_0" else kernel

    with monkeypatch.context() as m:
        m.setattr(lenet_jax.model, "_from_canonical", scaled)
        report = check(spec, steps=0, batch=8, seed=1)
    assert report.verdict().startswith("parity: first divergence at layer2_0 (forward"), \
        report.verdict()
    from lenet_jax.batchnorm import CanonicalBatchNorm

    init = CanonicalBatchNorm.__init__

    def flipped(self, num_features, layer, *, rngs):
        init(self, num_features, layer, rngs=rngs)
        self.momentum = layer.momentum  # Flax's convention, left unconverted

    monkeypatch.setattr(CanonicalBatchNorm, "__init__", flipped)
    lenet_jax.model._constructor.cache_clear()  # builds compiled with the correct one
    try:
        report = check(spec, steps=3, batch=8, seed=1)
    finally:
        monkeypatch.undo()
        lenet_jax.model._constructor.cache_clear()
    assert report.verdict().startswith(
        "parity: first divergence at layer1_1 (batch_norm running statistics"), report.verdict()
