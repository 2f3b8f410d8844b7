"""Hostile inputs: the spec parser, the IDX reader and the weights and checkpoint loaders meet
random and mutated bytes. Each must answer with its own clear error (or a valid result), never
another exception, never hang (hypothesis's per-example deadline), and never allocate more than
the input's size justifies (tracemalloc's peak, which sees numpy's and Python's allocations)."""

from __future__ import annotations

import gzip
import json
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lenet_spec import (
    LAYER_TYPES,
    PRESETS,
    SpecError,
    WeightsError,
    load_weights,
    parse_spec_json,
    save_weights,
)
from lenet_train import CheckpointError, Config
from lenet_train.checkpoints import (
    Checkpoints,
    check_position,
    load_checkpoint,
    save_checkpoint,
)
from lenet_train.checkpoints import settings as run_settings
from lenet_train.data import DataError, get, idx_bytes, parse_idx
from lenet_train.data.store import read_idx_split
from lenet_train.state import Position, State

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
"""No deadline: how long an example takes depends on the machine's load (a fixture's one-time
setup counted against the first example's deadline failed a loaded machine's run); a hang is
what the suite's own end would show."""
SLACK = 1 << 20
"""Allocation allowed beyond the input's own size: parser and exception bookkeeping."""


def peak_bytes(fn, *args) -> tuple[object, int]:
    """``fn(*args)``'s result (or the exception it raised) and its peak traced allocation."""
    tracemalloc.start()
    try:
        try:
            result: object = fn(*args)
        except Exception as e:  # noqa: BLE001 - the caller checks the type
            result = e
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ----------------------------------------------------------------------------- the spec parser

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=4),
    max_leaves=20,
)
field_values = st.one_of(
    st.integers(-3, 40), st.integers(-(2**64), 2**64), st.booleans(), st.none(),
    st.floats(allow_nan=True), st.text(max_size=6),
    st.lists(st.integers(-3, 40), max_size=3), json_values,
)
layer_dicts = st.builds(
    lambda kind, fields, name: {"type": kind, **fields, **name},
    st.sampled_from([*LAYER_TYPES, "dense", 3]),
    st.dictionaries(st.sampled_from(["out_channels", "kernel_size", "stride", "padding",
                                     "out_features", "bias", "name"]), field_values, max_size=4),
    st.sampled_from([{}, {"name": "x"}, {"name": "1bad"}, {"name": None}]),
)
spec_dicts = st.fixed_dictionaries(
    {"name": st.one_of(st.text(max_size=8), field_values),
     "input_shape": st.one_of(st.lists(st.integers(-2, 64), min_size=0, max_size=4),
                              field_values),
     "layers": st.one_of(st.lists(layer_dicts, max_size=8), field_values)},
    optional={"extra": json_values},
)


@st.composite
def mutated_presets(draw) -> dict:
    """A preset with one layer field (or the input shape) replaced by a random value."""
    d = PRESETS[draw(st.sampled_from(sorted(PRESETS)))].to_dict()
    if draw(st.booleans()):
        d["input_shape"][draw(st.integers(0, 2))] = draw(st.integers(-1, 80))
    layer = d["layers"][draw(st.integers(0, len(d["layers"]) - 1))]
    key = draw(st.sampled_from(sorted(layer)))
    layer[key] = draw(st.one_of(st.integers(-1, 64), field_values)) if key != "type" else draw(
        st.sampled_from([*LAYER_TYPES, "dense"]))
    return d


@FUZZ
@given(st.one_of(mutated_presets().map(json.dumps), spec_dicts.map(json.dumps),
                 json_values.map(json.dumps), st.text(max_size=200)))
def test_spec_parser_only_raises_spec_error(text: str) -> None:
    result, peak = peak_bytes(parse_spec_json, text, "fuzz.json")
    event(type(result).__name__)
    assert isinstance(result, (SpecError, type(PRESETS["lenet5"]))), repr(result)
    if isinstance(result, SpecError):
        assert str(result).startswith("fuzz.json: ")
    assert peak <= 64 * len(text) + SLACK


def test_spec_parser_deep_nesting_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="nested too deeply"):
        parse_spec_json("[" * 100_000 + "]" * 100_000, "deep.json")


def test_spec_parser_refuses_an_integer_too_long_to_read() -> None:
    text = '{"name": "x", "input_shape": [1, ' + "9" * 5000 + ', 2], "layers": []}'
    with pytest.raises(SpecError, match="big.json: invalid JSON: a number too long to read"):
        parse_spec_json(text, "big.json")


def test_spec_parser_refuses_a_network_too_large_to_build() -> None:
    text = json.dumps({"name": "huge", "input_shape": [1, 32, 32], "layers": [
        {"type": "flatten"}, {"type": "linear", "out_features": 10**12}]})
    with pytest.raises(SpecError, match="parameters"):
        parse_spec_json(text, "huge.json")


# ----------------------------------------------------------------------------- the IDX reader

def _valid_idx(draw) -> bytes:
    shape = draw(st.lists(st.integers(0, 6), min_size=1, max_size=3))
    return idx_bytes(np.zeros(shape, np.uint8)), len(shape)


@st.composite
def idx_inputs(draw) -> tuple[bytes, int]:
    raw, ndim = _valid_idx(draw)
    how = draw(st.sampled_from(["valid", "truncate", "extend", "flip", "lie", "random"]))
    if how == "truncate":
        raw = raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    elif how == "extend":
        raw += draw(st.binary(min_size=1, max_size=8))
    elif how == "flip" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
    elif how == "lie":  # a header claiming up to 2^32-1 items per dimension
        dims = draw(st.lists(st.integers(0, 2**32 - 1), min_size=ndim, max_size=ndim))
        code = draw(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x07]))
        header = struct.pack(">HBB", 0, code, ndim) + struct.pack(f">{ndim}I", *dims)
        raw = header + raw[4 + 4 * ndim:]
    elif how == "random":
        raw = draw(st.binary(max_size=64))
    return raw, draw(st.sampled_from([ndim, 1, 3]))


@FUZZ
@given(idx_inputs())
def test_idx_reader_only_raises_data_error(case: tuple[bytes, int]) -> None:
    raw, ndim = case
    result, peak = peak_bytes(parse_idx, raw, "fuzz-idx", ndim)
    event(type(result).__name__)
    if isinstance(result, np.ndarray):
        assert result.ndim == ndim and result.nbytes <= len(raw)
    else:
        assert isinstance(result, DataError), repr(result)
        assert str(result).startswith("fuzz-idx: ")
    assert peak <= 2 * len(raw) + SLACK


def test_idx_gzip_bomb_is_refused_without_inflating_it(tmp_path: Path) -> None:
    """A .gz whose content would be far larger than MNIST: refused while streaming."""
    bomb = gzip.compress(b"\0" * (300 << 20), compresslevel=9)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(bomb)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    result, peak = peak_bytes(read_idx_split, get("mnist"), tmp_path, "test")
    assert isinstance(result, DataError), repr(result)
    assert "t10k-images-idx3-ubyte.gz" in str(result) and "larger than" in str(result)
    assert peak <= 200 << 20  # the limit (MNIST's largest file, 47 MB, with room) plus a chunk


# ----------------------------------------------------------------------------- weight files

@pytest.fixture(scope="module")
def weights_bytes(tmp_path_factory) -> bytes:
    spec = PRESETS["lenet5"]
    rng = np.random.default_rng(0)
    weights = {k: rng.standard_normal(s).astype(np.float32) for k, s in spec.param_shapes.items()}
    path = tmp_path_factory.mktemp("w") / "w.safetensors"
    save_weights(path, weights, spec)
    return path.read_bytes()


@st.composite
def mutations(draw, size: int) -> list[tuple[str, int, int]]:
    return draw(st.lists(st.tuples(st.sampled_from(["flip", "cut", "header_len", "random"]),
                                   st.integers(0, size - 1), st.integers(1, 255)),
                         min_size=1, max_size=3))


def _mutate(raw: bytes, ops) -> bytes:
    for how, at, value in ops:
        at %= max(len(raw), 1)
        if how == "flip" and raw:
            raw = raw[:at] + bytes([raw[at] ^ value]) + raw[at + 1:]
        elif how == "cut":
            raw = raw[:at]
        elif how == "header_len":  # the first 8 bytes say how long the JSON header is
            raw = struct.pack("<Q", (value << 56) | at if value > 128 else at) + raw[8:]
        else:
            raw = bytes([value]) * (at % 97)
    return raw


def _flip_in_header(raw: bytes, at: int, value: int) -> bytes:
    """A flipped byte inside the JSON header (shapes, offsets, dtype, metadata)."""
    n = struct.unpack("<Q", raw[:8])[0]
    i = 8 + at % n
    return raw[:i] + bytes([raw[i] ^ value]) + raw[i + 1:]


@FUZZ
@given(data=st.data())
def test_weights_loader_only_raises_weights_error(tmp_path_factory, weights_bytes, data) -> None:
    raw = weights_bytes
    if data.draw(st.booleans()):
        raw = _flip_in_header(raw, data.draw(st.integers(0, 10**6)), data.draw(st.integers(1, 255)))
    raw = _mutate(raw, data.draw(mutations(len(raw))))
    path = tmp_path_factory.mktemp("fuzz") / "w.safetensors"
    path.write_bytes(raw)
    result, peak = peak_bytes(load_weights, path)
    event(type(result).__name__)
    if isinstance(result, tuple):
        weights, spec = result
        assert set(weights) == set(spec.param_shapes)
    else:
        assert isinstance(result, WeightsError), repr(result)
        assert str(result).startswith(str(path))
    assert peak <= 2 * len(raw) + SLACK


@FUZZ
@given(data=st.data())
def test_checkpoint_loader_only_raises_checkpoint_error(tmp_path_factory, data) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "c.safetensors"
    save_checkpoint(path, {"model.w": np.ones((4, 4), np.float32),
                           "optim.count": np.array(3, np.int32)}, {"step": 3, "epoch": 0})
    raw = path.read_bytes()
    if data.draw(st.booleans()):
        raw = _flip_in_header(raw, data.draw(st.integers(0, 10**6)), data.draw(st.integers(1, 255)))
    raw = _mutate(raw, data.draw(mutations(len(raw))))
    path.write_bytes(raw)
    result, peak = peak_bytes(load_checkpoint, path)
    event(type(result).__name__)
    if not isinstance(result, tuple):
        assert isinstance(result, CheckpointError), repr(result)
        assert str(result).startswith(str(path))
    assert peak <= 2 * len(raw) + SLACK


JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)


@pytest.fixture(scope="module")
def a_checkpoint(tmp_path_factory):
    """A real torch run's checkpoint on a small spec: its tensors and metadata, and the run's
    settings (as the program would have them)."""
    import lenet_torch

    spec = PRESETS["lenet5"]
    config = Config(max_steps=4, optimizer="sgd", momentum=0.9)
    data = {"content": {"train": "0" * 16, "test": "1" * 16}}
    workdir = tmp_path_factory.mktemp("ckpt")
    net = lenet_torch.build(spec)
    ckpt = Checkpoints(workdir, "torch", spec, config, 4, True, run_settings(config, spec, data))
    ckpt.save(State(lenet_torch.get_weights(net), {}, {}),
              Position(0, 2, 2, np.ones((2, 1), np.float32)), 1.0)
    tensors, meta = load_checkpoint(ckpt.path)
    return workdir, spec, config, data, tensors, meta


@pytest.fixture(scope="module")
def a_population_checkpoint(tmp_path_factory):
    """A torch population's checkpoint (seeds 0,3) on a small spec, as :func:`a_checkpoint`:
    every tensor stacked along a leading member axis, a correct count per member."""

    from lenet_torch.population import Population

    spec = PRESETS["lenet5"]
    config = Config(max_steps=4, optimizer="sgd", momentum=0.9, seeds=(0, 3))
    data = {"content": {"train": "0" * 16, "test": "1" * 16}}
    workdir = tmp_path_factory.mktemp("population")
    pop = Population(spec, [0, 3], optimizer="sgd", momentum=0.9)
    ckpt = Checkpoints(workdir, "torch", spec, config, 4, True, run_settings(config, spec, data))
    ckpt.save(State(pop.stacked_weights(), pop.optimizer_tensors(), {}),
              Position(0, 2, 2, np.ones((2, 2), np.float32), np.array([3, 4])), 1.0)
    tensors, meta = load_checkpoint(ckpt.path)
    return workdir, spec, config, data, tensors, meta


@pytest.fixture(params=["a_checkpoint", "a_population_checkpoint"])
def hostile(request):
    """Each of the two checkpoints, made before the property test's examples run."""
    return request.getfixturevalue(request.param)


@FUZZ
@given(data=st.data())
def test_hostile_checkpoint_metadata_is_one_clear_error(hostile, data) -> None:
    """Any metadata field replaced by any JSON value, or dropped, or the saved losses of
    another length, dtype or value, or (a population's) a weight of another member count: the
    checkpoint's one load raises one CheckpointError naming the file or accepts a position a
    run can stand at, never another exception."""
    workdir, spec, config, run_data, tensors, meta = hostile
    members = config.members
    meta = json.loads(json.dumps(meta))
    for key in data.draw(st.lists(st.sampled_from(sorted(meta)), max_size=3, unique=True)):
        if data.draw(st.booleans()):
            meta.pop(key)
        else:
            meta[key] = data.draw(JSONISH)
    tensors = dict(tensors)
    if data.draw(st.booleans()):
        tensors["progress.losses"] = data.draw(st.sampled_from([
            np.array([np.nan, 1.0], np.float32), np.zeros(5, np.float32),
            np.zeros(2, np.int64), np.zeros((1, 2), np.float32), np.zeros((2, 3), np.float32)]))
    if members and data.draw(st.booleans()):
        name = data.draw(st.sampled_from(sorted(k for k in tensors if k.startswith("model."))))
        tensors[name] = tensors[name][: data.draw(st.sampled_from([0, 1]))]
    path = workdir / "checkpoint.safetensors"
    try:
        save_checkpoint(path, tensors, meta)
    except (TypeError, ValueError):
        return  # not writable as JSON (a NaN key, a huge int): no file to resume from
    ckpt = Checkpoints(workdir, "torch", spec, config, 4, False,
                       run_settings(config, spec, run_data))
    try:
        _, pos, _ = ckpt.load(4, lambda: False)
    except CheckpointError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e), str(e)
        return
    assert check_position(pos, 4) is None
    assert pos.losses.shape == (pos.done, members or 1) and pos.correct.shape == (members or 1,)
