"""The second hostile audit: what a careless user or an attacker can hand the programs. Each
case ends in one clear line (or a correct result), destroys nothing that was not ours and
leaves nothing half-written."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import SLOW, fast_only, one_line_error, run_command, run_program
from hypothesis import given, settings
from hypothesis import strategies as st

import lenet_jax
import lenet_torch
from lenet_spec import PRESETS, RESERVED_NAMES, Spec, SpecError, save_weights
from lenet_train import CheckpointError, Config
from lenet_train.checkpoints import load_checkpoint, save_checkpoint
from lenet_util import OutputError, atomic_write_bytes

SHORT = ["--train-size", "256", "--batch-size", "64", "--epochs", "1", "--quiet"]
"""4 steps of lenet5."""

# ----------------------------------------------------------------------------- output paths

KINDS = ("missing", "file", "folder", "fifo", "socket", "link_to_file", "link_to_folder",
         "dangling_link")


def _make(kind: str, path: Path) -> None:
    """A thing of ``kind`` at ``path`` (a file's content: b"theirs")."""
    target = path.parent / f"{path.name}.target"
    if kind == "file":
        path.write_bytes(b"theirs")
    elif kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    elif kind == "link_to_file":
        target.write_bytes(b"theirs")
        path.symlink_to(target)
    elif kind == "link_to_folder":
        target.mkdir()
        path.symlink_to(target)
    elif kind == "dangling_link":
        path.symlink_to(target)


def _fingerprint(path: Path) -> tuple:
    """What ``path`` is and holds, not following a link (and what a link's target holds)."""
    if not os.path.lexists(path):
        return ("nothing",)
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        target = path.parent / os.readlink(path)
        held = target.read_bytes() if target.is_file() else None
        return ("link", os.readlink(path), held)
    return (stat.S_IFMT(mode), path.read_bytes() if stat.S_ISREG(mode) else None)


@given(st.sampled_from(KINDS), st.binary(max_size=64))
def test_an_output_path_is_written_only_where_a_file_belongs(tmp_path_factory, kind: str,
                                                            data: bytes) -> None:
    """The atomic writer replaces nothing but a regular file: a folder, a FIFO, a socket, a
    device, a symbolic link (to a file or anywhere) is refused with one OutputError naming the
    path, and left exactly as it was, with no temporary file beside it."""
    folder = tmp_path_factory.mktemp("out")
    path = folder / "out.json"
    _make(kind, path)
    before = _fingerprint(path)
    if kind in ("missing", "file"):
        atomic_write_bytes(path, data)
        assert path.read_bytes() == data and stat.S_ISREG(os.lstat(path).st_mode)
    else:
        with pytest.raises(OutputError) as e:
            atomic_write_bytes(path, data)
        assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
        assert _fingerprint(path) == before
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_a_device_is_never_replaced(tmp_path) -> None:
    """/dev/null's twin (a character device made here, as root can): refused, still a device;
    the real /dev/full is only looked at."""
    with pytest.raises(OutputError, match="a character device, not a regular file"):
        atomic_write_bytes("/dev/full", b"{}")
    assert stat.S_ISCHR(os.lstat("/dev/full").st_mode)
    try:
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        return
    with pytest.raises(OutputError):
        atomic_write_bytes(tmp_path / "null", b"{}")
    assert stat.S_ISCHR(os.lstat(tmp_path / "null").st_mode)


def test_the_porter_and_the_tools_check_their_outputs_first(tmp_path) -> None:
    """lenet_port -o FIFO (or --weights FIFO), bench --json in a folder that cannot exist, plot
    -o a folder: one line, exit 2, before any work, and the FIFO is still a FIFO."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    net = tmp_path / "net.py"
    net.write_text("import torch\nclass Net(torch.nn.Module):\n    def __init__(self):\n"
                   "        super().__init__()\n        self.fc = torch.nn.Linear(4, 2)\n"
                   "    def forward(self, x):\n        return self.fc(x.flatten(1))\n")
    for flags in (["-o", str(fifo)], ["-o", str(tmp_path / "s.json"), "--weights", str(fifo)]):
        res = run_program("lenet_port.__main__", f"{net}:Net", "--input-shape", "1,2,2", *flags)
        one_line_error(res, f"{fifo}: a FIFO (named pipe), not a regular file")
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    res = run_program("bench.__main__", "--quick", "--json", "/proc/nope/out.json")
    assert res.returncode == 2 and "--json: /proc/nope/out.json: cannot write there" in \
        res.stderr and "GEMM" not in res.stdout  # refused before measuring anything
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(
        {"epoch": 0, "train_loss": 1.0, "test_loss": 1.0, "train_accuracy": 0.5,
         "test_accuracy": 0.5}) + "\n")
    res = run_program("lenet_train.plot", str(run), "-o", str(tmp_path))
    one_line_error(res, f"{tmp_path}: a folder, not a regular file")


# ----------------------------------------------------------------------------- layer names


def test_layer_names_that_are_the_models_attributes_are_refused() -> None:
    """Every attribute of both ports' models (torch.nn.Module's, nnx.Module's, the LeNet
    classes') is a reserved name; a layer named so is one SpecError naming it."""
    spec = PRESETS["lenet5_bn"]
    ours = {layer.name for layer in spec.layers if getattr(layer, "name", None)}
    for net in (lenet_torch.build(spec), lenet_jax.build(spec)):
        attributes = {n for n in dir(net) if not n.startswith("_")} - ours
        assert attributes <= RESERVED_NAMES, sorted(attributes - RESERVED_NAMES)
    base = spec.to_dict()
    for name in ("forward", "train", "eval", "spec", "training", "kernels", "deterministic",
                 "apply_layer", "__class__", "_private"):
        layers = [dict(base["layers"][0], name=name), *base["layers"][1:]]
        with pytest.raises(SpecError, match=f"name {name!r} is reserved"):
            Spec.from_dict({**base, "layers": layers})


NAMES = st.one_of(st.sampled_from(sorted(RESERVED_NAMES)),
                  st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True))


@settings(max_examples=300)
@given(NAMES)
def test_any_layer_name_is_refused_or_builds(name: str) -> None:
    """A fuzzed identifier (or a model attribute) as a conv's name: refused (reserved, or a
    duplicate), or the torch port builds the spec with the layer under that name and computes
    its logits; the JAX port's side is held by test_layer_names_… above and the names below."""
    spec = PRESETS["lenet5"].to_dict()
    layers = [dict(spec["layers"][0], name=name), *spec["layers"][1:]]
    try:
        s = Spec.from_dict({**spec, "layers": layers})
    except SpecError as e:
        assert "reserved" in str(e) or "duplicate" in str(e), str(e)
        assert name in RESERVED_NAMES or name.startswith("_") or name in ("conv2", "fc1",
                                                                         "fc2", "fc3")
        return
    import torch

    t = lenet_torch.build(s)
    assert f"{name}.weight" in t.state_dict()
    assert tuple(t(torch.zeros(1, 1, 32, 32)).shape) == (1, 10)


@pytest.mark.parametrize("name", ["Forward", "layer", "x", "conv"])
def test_names_near_the_reserved_ones_build_in_jax(name: str) -> None:
    spec = PRESETS["lenet5"].to_dict()
    s = Spec.from_dict({**spec, "layers": [dict(spec["layers"][0], name=name),
                                           *spec["layers"][1:]]})
    assert f"{name}.weight" in lenet_jax.get_weights(lenet_jax.build(s))


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def a_torch_run(tmp_path_factory, mnist_dir) -> tuple[Path, list[str]]:
    """A torch run of 3 steps, SGD with momentum, checkpointed; its flags."""
    workdir = tmp_path_factory.mktemp("audit") / "run"
    flags = [*SHORT, "--optimizer", "sgd", "--max-steps", "3", "--data-dir", mnist_dir]
    res = run_program("torch", *flags, "--workdir", str(workdir))
    assert res.returncode == 0, res.stderr[-2000:]
    return workdir, flags


def _edited(run: tuple[Path, list[str]], tmp_path: Path, edit) -> subprocess.CompletedProcess:
    """``run``'s workdir copied, its checkpoint edited by ``edit(tensors, meta)``, resumed
    with a larger --max-steps."""
    source, flags = run
    workdir = tmp_path / "copy"
    workdir.mkdir(parents=True)
    for name in ("checkpoint.safetensors", "config.json"):
        (workdir / name).write_bytes((source / name).read_bytes())
    tensors, meta = load_checkpoint(workdir / "checkpoint.safetensors")
    edit(tensors, meta)
    save_checkpoint(workdir / "checkpoint.safetensors", tensors, meta)
    return run_program("torch", *flags, "--workdir", str(workdir), "--resume", "--max-steps", "4")


def _by_index(tensors: dict, meta: dict, spec=PRESETS["lenet5"], **group) -> None:
    """The checkpoint in the format before canonical names: optimizer tensors by parameter
    index, torch's param_groups in the metadata."""
    names = list(spec.param_shapes)
    for key in [k for k in tensors if k.startswith("optim.")]:
        param, slot = key[6:].rsplit(".", 1)
        tensors[f"optim.{names.index(param)}.{slot}"] = tensors.pop(key)
    meta["param_groups"] = [{"lr": 0.005, "momentum": 0.9, "dampening": 0, "nesterov": False,
                             "weight_decay": 0.0, "params": list(range(len(names))), **group}]


def test_an_old_checkpoints_stored_optimizer_settings_never_win(a_torch_run, tmp_path) -> None:
    """The older format carried torch's param_groups: their weight decay of 50 was applied
    while the run said 0. Now the run's own settings drive the resumed steps (the same weights
    as the canonical checkpoint's resume); a tensor of another shape in that format, a
    checkpoint without recorded settings, float16 or NaN weights: one line each."""
    canonical = _edited(a_torch_run, tmp_path / "a", lambda t, m: None)
    assert canonical.returncode == 0, canonical.stderr[-2000:]
    old = _edited(a_torch_run, tmp_path / "b", lambda t, m: _by_index(t, m, weight_decay=50.0))
    assert old.returncode == 0, old.stderr[-2000:]
    for name in ("weights.safetensors",):
        assert (tmp_path / "a" / "copy" / name).read_bytes() == \
            (tmp_path / "b" / "copy" / name).read_bytes()

    def wrong_shape(t, m):
        _by_index(t, m)
        t["optim.0.momentum_buffer"] = t["optim.0.momentum_buffer"][:1]

    cases = {
        "wrong shape": (wrong_shape, "optimizer state '0.momentum_buffer' has shape (1, 1, 5, 5)"),
        "no settings": (lambda t, m: m.pop("settings"), "did not record the settings"),
        "float16": (lambda t, m: t.update({"model.conv1.weight":
                                           t["model.conv1.weight"].astype(np.float16)}),
                    "tensor 'model.conv1.weight' is float16, expected float32"),
        "nan": (lambda t, m: t["model.fc1.bias"].__setitem__(0, np.nan),
                "tensor 'model.fc1.bias' holds NaN or infinite values; the checkpoint is damaged"),
    }
    for name, (edit, says) in cases.items():
        one_line_error(_edited(a_torch_run, tmp_path / name.replace(" ", "_"), edit), says)


def test_a_population_checkpoint_of_more_or_fewer_members_is_one_line(tmp_path) -> None:
    """JAX's population loads optimizer tensors of exactly one per member: more were silently
    cut, fewer an IndexError."""
    from lenet_jax.population import Population
    from lenet_spec import Flatten, Linear

    spec = Spec("tiny", (1, 8, 8), (Flatten(), Linear(10)))
    pop = Population(spec, [0, 1], optimizer="sgd", momentum=0.9)
    weights, optimizer = pop.stacked_weights(), pop.optimizer_tensors()
    for count in (1, 3):
        stacked = {k: np.repeat(v[:1], count, axis=0) for k, v in optimizer.items()}
        with pytest.raises(ValueError, match="not one per member"):
            pop.load(weights, stacked, step=1)


# ----------------------------------------------------------------------------- workdirs


def test_overwrite_checks_everything_before_deleting_anything(a_torch_run, tmp_path) -> None:
    """A run's folder whose checkpoint.safetensors is a folder: --overwrite deletes nothing
    (config.json and metrics.jsonl stay) and says which is not a run's file."""
    source, flags = a_torch_run
    workdir = tmp_path / "run"
    workdir.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        (workdir / name).write_bytes((source / name).read_bytes())
    (workdir / "checkpoint.safetensors").mkdir()
    res = run_program("torch", *flags, "--workdir", str(workdir), "--overwrite")
    one_line_error(res, "checkpoint.safetensors is not a file a run writes", "nothing was deleted")
    assert sorted(p.name for p in workdir.iterdir()) == [
        ".lenet.lock", "checkpoint.safetensors", "config.json", "metrics.jsonl"]


def test_a_full_disk_while_appending_metrics_is_one_line(tmp_path, monkeypatch) -> None:
    """ENOSPC on metrics.jsonl: OutputError naming the file, and no empty file left."""
    from lenet_train.runlog import RunLog

    log = RunLog(tmp_path, quiet=True)
    real_open = open

    def full(path, *args, **kwargs):
        if str(path).endswith("metrics.jsonl"):
            f = real_open(path, *args, **kwargs)
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full)
    record = {"epoch": 0, "step": 1, "train_loss": 1.0, "train_accuracy": 0.5, "test_loss": 1.0,
              "test_accuracy": 0.5, "epoch_s": 1.0, "images_per_sec": 1.0}
    with pytest.raises(OutputError, match="metrics.jsonl: cannot write it .No space left"):
        log.epoch(record)
    assert not (tmp_path / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- flags and files


@pytest.mark.parametrize("framework", fast_only(["jax", "torch"], "torch"))
def test_absurd_numbers_are_one_line_or_train(tmp_path, mnist_dir, framework: str) -> None:
    """--lr and --weight-decay past float32's range: one line before training; a run of ten
    million epochs starts at once (no table of every step's learning rate before step 1)."""
    for flag, value in (("--lr", "1e39"), ("--weight-decay", "1e308")):
        res = run_program(framework, *SHORT, "--data-dir", mnist_dir, "--workdir",
                          str(tmp_path / flag), flag, value)
        one_line_error(res, f"{flag}: must be at most 3.4e+38")
    res = run_program(framework, *SHORT, "--data-dir", mnist_dir, "--workdir",
                      str(tmp_path / "long"), "--epochs", "10000000", "--max-steps", "3")
    assert res.returncode == 0, res.stderr[-2000:]


def test_nan_init_weights_are_refused_up_front(tmp_path, mnist_dir) -> None:
    spec = PRESETS["lenet5"]
    weights = lenet_torch.get_weights(lenet_torch.build(spec))
    weights["fc3.bias"][2] = np.nan
    save_weights(tmp_path / "w.safetensors", weights, spec)
    res = run_program("torch", *SHORT, "--data-dir", mnist_dir, "--workdir", str(tmp_path / "r"),
                      "--init-weights", str(tmp_path / "w.safetensors"))
    one_line_error(res, "--init-weights:", "tensor 'fc3.bias' holds NaN or infinite values")
    assert not (tmp_path / "r").exists() or not (tmp_path / "r" / "config.json").exists()


def test_what_is_not_a_file_is_named_for_what_it_is(tmp_path, mnist_dir) -> None:
    """A folder or /dev/zero as --init-weights; a checkpoint that is a link to /dev/zero."""
    for path, says in ((tmp_path, "a folder, not a weights file"),
                       (Path("/dev/zero"), "a character device, not a weights file")):
        res = run_program("torch", *SHORT, "--data-dir", mnist_dir, "--workdir",
                          str(tmp_path / f"r{len(says)}"), "--init-weights", str(path))
        one_line_error(res, f"--init-weights: {path}: {says}")
    workdir = tmp_path / "linked"
    workdir.mkdir()
    (workdir / "checkpoint.safetensors").symlink_to("/dev/zero")
    res = run_program("torch", *SHORT, "--data-dir", mnist_dir, "--workdir", str(workdir),
                      "--resume")
    one_line_error(res, "checkpoint.safetensors is a character device, not a checkpoint")


def test_seed_lists_say_what_is_wrong_briefly() -> None:
    res = run_program("jax", "--seeds", "²")
    one_line_error(res, "--seeds: expected N, A-B or a comma-separated list", "ASCII digits")
    res = run_program("jax", "--seeds", ",".join(str(s) for s in range(5000)))
    line = one_line_error(res, "more than 4096 seeds")
    assert len(line) < 300, len(line)


def test_a_populations_first_seed_is_reported_as_seeds(tmp_path, mnist_dir) -> None:
    """--seeds 3,0 resuming a --seeds 0,3 run: the message names --seeds, not the --seed the
    first member's seed stands for."""
    from lenet_train.checkpoints import check_resume, settings

    spec, data = PRESETS["lenet5"], {"content": {}}
    before = {"framework": "jax", "settings": settings(Config(seeds=(0, 3)), spec, data)}
    with pytest.raises(CheckpointError, match="written with --seeds 0,3, now 3,0"):
        check_resume(Path("ck"), before, settings(Config(seeds=(3, 0)), spec, data))


def test_the_plot_refuses_what_it_cannot_draw(tmp_path) -> None:
    """A garbage line, a field that is not a number, an empty metrics.jsonl: one line each,
    no figure; a refused run's folder (no metrics.jsonl) is skipped, saying so."""
    good = {"epoch": 0, "train_loss": 1.0, "test_loss": 1.0, "train_accuracy": 0.5,
            "test_accuracy": 0.5}
    for name, text, says in (
            ("garbage", json.dumps(good) + "\n{not json\n", "line 2 is not a JSON record"),
            ("text", json.dumps({**good, "test_loss": "x"}) + "\n", "test_loss is 'x', not a"),
            ("empty", "", "no epoch's record")):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text(text)
        res = run_program("lenet_train.plot", str(run), "-o", str(tmp_path / f"{name}.png"))
        one_line_error(res, f"{run / 'metrics.jsonl'}: ", says)
        assert not (tmp_path / f"{name}.png").exists()
    refused = tmp_path / "refused"
    refused.mkdir()
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "metrics.jsonl").write_text(json.dumps(good) + "\n")
    res = run_program("lenet_train.plot", str(refused), str(tmp_path / "ok"), "-o",
                      str(tmp_path / "two.png"))
    assert res.returncode == 0 and "skipped (no metrics.jsonl" in res.stderr
    assert str(refused) in res.stderr and (tmp_path / "two.png").exists()


def test_lenet_parity_refuses_what_it_would_misread(tmp_path) -> None:
    """A complex, an integer, a sparse or a quantized tensor in a .pt (complex was read as its
    real part, int64 as floats: "parity: ok"); --seed out of range; --train-args with an
    unbalanced quote or a flag --train sets itself."""
    import torch

    spec = PRESETS["lenet5"]
    state = lenet_torch.build(spec).state_dict()
    cases = {
        "complex": (lambda s: s.update({"fc3.bias": s["fc3.bias"].to(torch.complex64)}),
                    "tensor 'fc3.bias' is complex"),
        "int": (lambda s: s.update({"fc3.bias": s["fc3.bias"].long()}),
                "tensor 'fc3.bias' has dtype torch.int64, expected floating point"),
        "sparse": (lambda s: s.update({"fc3.weight": s["fc3.weight"].to_sparse()}),
                   "tensor 'fc3.weight' is torch.sparse_coo (sparse)"),
        "quantized": (lambda s: s.update({"fc3.bias": torch.quantize_per_tensor(
            s["fc3.bias"], 0.1, 0, torch.qint8)}), "tensor 'fc3.bias' is quantized"),
    }
    for name, (edit, says) in cases.items():
        s = {k: v.clone() for k, v in state.items()}
        edit(s)
        torch.save(s, tmp_path / f"{name}.pt")
        res = run_program("lenet_parity.__main__", "lenet5", "--torch-weights",
                          str(tmp_path / f"{name}.pt"), "--steps", "0")
        one_line_error(res, says)
    for argv, says in ((["--seed", "-1"], "--seed: must be in [0, 4294967295], got -1"),
                       (["--seed", "1" * 20], "--seed: must be in [0, 4294967295]"),
                       (["--train", "--train-args", "--lr '1e-3"], "--train-args: No closing"),
                       (["--train", "--train-args", "--workdir /tmp/x"],
                        "--train-args: --workdir is set by --train itself")):
        res = run_program("lenet_parity.__main__", "lenet5", *argv)
        one_line_error(res, says)


def test_an_ascii_terminal_gets_escapes_not_a_traceback() -> None:
    res = run_command("lenet_spec", "show", "lenet5", env={**os.environ,
                                                          "PYTHONIOENCODING": "ascii"})
    assert res.returncode == 0 and "Traceback" not in res.stderr
    assert "1\\xd732\\xd732" in res.stdout


def test_the_porter_refuses_what_it_could_not_finish(tmp_path) -> None:
    """An input of 10^10 values an image, a module of 10^5 layers: refused at once, before the
    module runs; a data-dependent `if` that neither tracer follows: one line, and none of
    torch.export's graph or logs on the terminal (the real command line)."""
    from torch import nn

    from lenet_port import PortError, to_spec

    with pytest.raises(PortError, match="10,000,000,000 values an image, more than"):
        to_spec(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), (1, 100_000, 100_000))
    huge = nn.Sequential(*[nn.Identity() for _ in range(100_000)])
    with pytest.raises(PortError, match="100,001 modules, more than the 1,000 layers"):
        to_spec(huge, (1, 4, 4))
    net = tmp_path / "net.py"
    net.write_text("import torch\nclass Net(torch.nn.Module):\n    def __init__(self):\n"
                   "        super().__init__()\n        self.fc = torch.nn.Linear(4, 2)\n"
                   "    def forward(self, x):\n        x = x.flatten(1)\n"
                   "        if x.sum() > 0:\n            x = x * 2\n        return self.fc(x)\n")
    res = run_command("lenet_port", f"{net}:Net", "--input-shape", "1,2,2", "-o",
                      str(tmp_path / "s.json"))
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("error: Net: cannot "
                                                                         "trace it"), res.stderr


def test_a_benchmark_whose_every_measurement_failed_says_so(tmp_path) -> None:
    res = run_program("bench.__main__", "--quick", "--spec", "lenet5", "--timeout", "0.01",
                      "--rounds", "1")
    one_line_error(res, "every measurement failed", status=1)


def test_a_refused_run_leaves_no_folder_behind(tmp_path, mnist_dir) -> None:
    """A run refused after it made its workdir (a spec that does not fit the data) removes the
    folder (it held only the lock), so `runs/*-jax` never matches a folder without metrics;
    a folder that was there before stays."""
    workdir = tmp_path / "new"
    res = run_program("torch", "--spec", "cifar10_cnn", "--data-dir", mnist_dir, "--workdir",
                      str(workdir))
    one_line_error(res, "spec cifar10_cnn takes 3 input channels")
    assert not os.path.lexists(workdir)
    workdir.mkdir()
    res = run_program("torch", "--spec", "cifar10_cnn", "--data-dir", mnist_dir, "--workdir",
                      str(workdir))
    assert res.returncode == 2 and workdir.is_dir()


PEAK = """
import resource, subprocess, sys
res = subprocess.run([sys.executable, "-m", *sys.argv[1:]], capture_output=True, text=True)
assert res.returncode == 0, res.stderr[-2000:]
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""
"""Started by a small process of its own: a child forked from the test's worker would count
the worker's memory, which it shares until it execs, in its peak."""


def _peak_rss(argv: list[str]) -> int:
    """The peak resident bytes of ``python -m argv…``."""
    res = subprocess.run([sys.executable, "-c", PEAK, *argv], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stdout.split()[-1]) * 1024


@pytest.mark.parametrize("framework, seeds, width", [
    ("torch", None, 16384), pytest.param("jax", None, 16384, marks=SLOW),
    pytest.param("torch", "8", 120, marks=SLOW), pytest.param("jax", "8", 120, marks=SLOW)])
def test_the_memory_estimate_bounds_the_real_peak(tmp_path, mnist_dir, framework: str,
                                                  seeds: str | None, width: int) -> None:
    """The estimate the programs refuse a run by is above what a run really holds at its
    peak (resident memory, three steps with a checkpoint after each: its writes included),
    for a wide layer and for a population; it once passed a run the kernel killed at 24 GB
    (16.2 GiB estimated)."""
    from lenet_train.setup import memory_needed

    base = PRESETS["lenet5"].to_dict()
    layers = [dict(layer, out_features=width) if layer.get("name") == "fc1" else layer
              for layer in base["layers"]]
    path = tmp_path / "wide.json"
    path.write_text(json.dumps({**base, "name": "wide", "layers": layers}))
    flags = ["--spec", str(path), "--max-steps", "3", "--checkpoint-every", "1", "--quiet",
             "--data-dir", mnist_dir, *(["--seeds", seeds] if seeds else [])]
    peak = _peak_rss([f"lenet_{framework}.train", *flags, "--workdir", str(tmp_path / "run")])
    estimate = sum(memory_needed(Config(max_steps=3, seeds=seeds),
                                 Spec.from_dict(json.loads(path.read_text()))).values())
    assert peak < estimate, (peak / 2**30, estimate / 2**30)
