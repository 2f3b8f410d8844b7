"""Weight files: safetensors with the spec inside, bit-exact, loadable by either port."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import busy_batch_norms, fast_only, jax_logits, random_batch, torch_logits

import lenet_jax
import lenet_torch
from lenet_spec import PRESETS, WeightsError, load_weights, save_weights

PORTS = {"torch": lenet_torch, "jax": lenet_jax}


@pytest.mark.parametrize("source", PORTS)
@pytest.mark.parametrize("name", fast_only(PRESETS, "lenet5_bn"))
def test_round_trip_bit_exact_and_across_frameworks(tmp_path, source: str, name: str) -> None:
    """Parameters and buffers (batch_norm's running statistics, made non-trivial, and batch
    counts, int64) through a file into both ports, bit for bit; the same logits in eval mode."""
    spec = PRESETS[name]
    donor = lenet_torch.build(spec, seed=3)
    busy_batch_norms(donor, 3)
    net = PORTS[source].build(spec, seed=3)
    PORTS[source].set_weights(net, lenet_torch.get_weights(donor))
    weights = PORTS[source].get_weights(net)
    path = tmp_path / "w.safetensors"
    save_weights(path, weights, spec)
    loaded, loaded_spec = load_weights(path)
    assert loaded_spec == spec
    assert list(loaded) == list(spec.state_shapes)
    for k in weights:
        assert loaded[k].dtype == (np.int64 if k.endswith("num_batches_tracked") else np.float32)
        assert loaded[k].tobytes() == weights[k].tobytes()
    # into the other framework (and back into the same one): same weights, same logits
    t = lenet_torch.build(loaded_spec, seed=99)
    j = lenet_jax.build(loaded_spec, seed=99)
    lenet_torch.set_weights(t, loaded)
    lenet_jax.set_weights(j, loaded)
    for k in weights:
        assert lenet_torch.get_weights(t)[k].tobytes() == weights[k].tobytes()
        assert lenet_jax.get_weights(j)[k].tobytes() == weights[k].tobytes()
    t.eval()
    j.eval()
    x, _ = random_batch(spec, 4)
    assert np.abs(torch_logits(t, x) - jax_logits(j, x)).max() <= 1e-5


def test_a_missing_buffer_is_named(tmp_path) -> None:
    spec = PRESETS["lenet5_bn"]
    weights = lenet_torch.get_weights(lenet_torch.build(spec))
    del weights["bn2.running_var"]
    for port in PORTS.values():
        with pytest.raises(WeightsError, match=r"lenet5_bn: missing buffer 'bn2.running_var' of "
                                               r"shape \(16,\)"):
            port.set_weights(port.build(spec), weights)
    with pytest.raises(WeightsError, match="missing buffer 'bn2.running_var'"):
        save_weights(tmp_path / "w.safetensors", weights, spec)
    weights["bn2.running_var"] = np.ones(16, np.float32)
    weights["bn2.num_batches_tracked"] = np.float32(3)
    with pytest.raises(WeightsError, match="'bn2.num_batches_tracked' has dtype float32, "
                                           "expected an integer count"):
        save_weights(tmp_path / "w.safetensors", weights, spec)


def test_file_holds_spec_and_no_pickle(tmp_path) -> None:
    spec = PRESETS["lenet5"]
    path = tmp_path / "w.safetensors"
    save_weights(path, lenet_torch.get_weights(lenet_torch.build(spec)), spec)
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert json.loads(header["__metadata__"]["spec"]) == spec.to_dict()
    assert header["conv1.weight"]["shape"] == [6, 1, 5, 5]
    assert not [f for f in os.listdir(tmp_path) if f != "w.safetensors"]  # no temporary left


def test_save_rejects_weights_of_another_spec(tmp_path) -> None:
    weights = lenet_torch.get_weights(lenet_torch.build("lenet5_3x3"))
    path = tmp_path / "w.safetensors"
    with pytest.raises(WeightsError, match=r"'conv1.weight' has shape \(6, 1, 3, 3\)"):
        save_weights(path, weights, PRESETS["lenet5"])
    assert not path.exists() and not os.listdir(tmp_path)


def test_load_errors_name_the_file(tmp_path) -> None:
    spec = PRESETS["lenet5"]
    good = tmp_path / "good.safetensors"
    save_weights(good, lenet_torch.get_weights(lenet_torch.build(spec)), spec)
    raw = good.read_bytes()

    with pytest.raises(WeightsError, match="missing.safetensors: no such weights file"):
        load_weights(tmp_path / "missing.safetensors")

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(WeightsError, match="truncated.safetensors: not a readable safetensors"):
        load_weights(truncated)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(WeightsError, match="garbage.safetensors: not a readable safetensors"):
        load_weights(garbage)

    from safetensors.numpy import save

    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(save({"conv1.weight": np.zeros((6, 1, 5, 5), np.float32)}))
    with pytest.raises(WeightsError, match="plain.safetensors: not a lenet weights file"):
        load_weights(plain)

    lying = tmp_path / "lying.safetensors"
    other = lenet_torch.get_weights(lenet_torch.build("lenet5_3x3"))
    lying.write_bytes(save(other, metadata={"format": "lenet-weights",
                                            "spec": json.dumps(spec.to_dict())}))
    with pytest.raises(WeightsError, match=r"lying.safetensors: lenet5: tensor 'conv1.weight' "
                                           r"has shape \(6, 1, 3, 3\), the spec expects"):
        load_weights(lying)

    badspec = tmp_path / "badspec.safetensors"
    badspec.write_bytes(save(other, metadata={"format": "lenet-weights", "spec": "{"}))
    with pytest.raises(WeightsError, match="badspec.safetensors: the spec in its metadata"):
        load_weights(badspec)
