"""The training programs through their real command lines: flags, outputs, resume, parity."""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest
from helpers import PROGRAMS, SLOW, fast_only, mnist, run_command, run_program

import lenet_jax
import lenet_torch
from lenet_spec import PRESETS, load_weights, save_weights
from lenet_train.cli import parser
from lenet_train.plot import curve
from lenet_train.runlog import read_jsonl
from lenet_train.schedule import lr_at


def _run(module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The program ``module`` run in this process (tests/helpers.py: run_program)."""
    res = run_program(module, *args)
    if check and res.returncode != 0:
        raise AssertionError(f"{module} failed:\n{res.stderr[-3000:]}")
    return res


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
        (["--lr", "-0.1"], "--lr: must be a finite number ≥ 0, got -0.1"),
        (["--lr", "0"], "--lr: must be greater than 0"),
        (["--lr", "nan"], "--lr: must be a finite number"),
        (["--epochs", "two"], "--epochs: expected a positive integer, got 'two'"),
        (["--spec", "lenet6"], "--spec: unknown spec 'lenet6': not a preset"),
        (["--optimizer", "rmsprop"], "--optimizer: invalid choice: 'rmsprop'"),
        (["--schedule", "step"], "--schedule: invalid choice: 'step'"),
        (["--loss", "hinge"], "--loss: invalid choice: 'hinge'"),
    ],
)
def test_bad_flags_are_rejected_by_the_parser(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parser("prog", "x").parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("framework", PROGRAMS)
def test_bad_flag_through_the_real_command_line(framework: str) -> None:
    """One line, no usage block; an abbreviated flag is not taken for the full one (the real
    command line, in a new process)."""
    res = run_command(PROGRAMS[framework], "--batch-size", "0")
    assert res.returncode == 2
    assert "--batch-size: must be at least 1" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "usage:" not in res.stderr
    res = _run(PROGRAMS[framework], "--epoch", "1", check=False)
    assert res.returncode == 2 and "unrecognized arguments: --epoch 1" in res.stderr


@pytest.mark.parametrize("framework", PROGRAMS)
def test_help_explains_every_flag_once(framework: str) -> None:
    res = _run(PROGRAMS[framework], "--help")
    flags = re.findall(r"^  (--[a-z-]+)(.*)\n((?:                .*\n)*)", res.stdout, re.M)
    assert len(flags) >= 20
    for flag, rest, more in flags:
        text = " ".join((rest + " " + more).split())
        assert len(text.split()) >= 3, f"{flag} has no help: {text!r}"
        assert text.count("default") <= 1 and "(default: None)" not in text, (flag, text)
        assert "``" not in text and "[" not in text.split("default:")[-1], (flag, text)


def test_schedules() -> None:
    total = 1000
    assert lr_at("constant", 0.1, 500, total) == 0.1
    assert lr_at("cosine", 0.1, 0, total) == pytest.approx(0.1)
    assert lr_at("cosine", 0.1, 500, total) == pytest.approx(0.05)
    assert lr_at("onecycle", 0.1, 0, total) == pytest.approx(0.1 / 25)
    assert lr_at("onecycle", 0.1, 300, total) == pytest.approx(0.1)
    assert lr_at("onecycle", 0.1, total, total) == pytest.approx(0.1 / 25e4)
    values = [lr_at("onecycle", 0.1, s, total) for s in range(total)]
    assert int(np.argmax(values)) == 300


@SLOW
@pytest.mark.parametrize("framework", PROGRAMS)
def test_a_run_prints_only_our_lines(tmp_path, mnist_dir, framework: str) -> None:
    """A user's terminal shows our lines (where the data came from, the framework and devices,
    the progress bar, the epoch's summary, the weights file), no framework log records such as
    JAX's "Unable to initialize backend 'tpu'" (the real command line, in a new process)."""
    res = run_command(PROGRAMS[framework], "--train-size", "512", "--epochs", "1",
                      "--data-dir", mnist_dir, "--workdir", str(tmp_path / "w"))
    assert res.returncode == 0, res.stderr[-3000:]
    ours = re.compile(r"MNIST (train|test) from .*|(jax|torch) \S+ on .*|epoch +0 .*|"
                      r"epoch 0: .*|weights: .*")
    lines = [line.strip() for line in re.split(r"[\r\n]", res.stdout + res.stderr)]
    assert [line for line in lines if line and not ours.fullmatch(line)] == []
    assert any(line.startswith("epoch   0  step      4") for line in lines), lines


def test_missing_data_is_one_clear_error(tmp_path) -> None:
    res = _run("lenet_torch.train", "--data-dir", str(tmp_path), "--workdir",
               str(tmp_path / "w"), check=False)
    assert res.returncode == 2
    assert "no MNIST train files" in res.stderr and "Traceback" not in res.stderr


# ----------------------------------------------------------------------------- real MNIST


@pytest.fixture(scope="module")
def one_epoch_runs(tmp_path_factory, mnist_dir):
    """Both programs, one full epoch with the default flags, from torch's seed-0 weights."""
    root = tmp_path_factory.mktemp("parity")
    init = root / "init.safetensors"
    save_weights(init, lenet_torch.get_weights(lenet_torch.build("lenet5", seed=0)),
                 PRESETS["lenet5"])
    runs = {}
    for framework, module in PROGRAMS.items():
        workdir = root / framework
        _run(module, "--epochs", "1", "--init-weights", str(init), "--log-steps", "--quiet",
             "--data-dir", mnist_dir, "--workdir", str(workdir))
        runs[framework] = workdir
    return runs


def _step_losses(runs) -> dict[str, np.ndarray]:
    return {fw: np.array([r["loss"] for r in read_jsonl(d / "steps.jsonl")])
            for fw, d in runs.items()}


@SLOW
def test_programs_agree_step_by_step_lenet5(one_epoch_runs) -> None:
    """Same weights, same batches, default flags: the first 30 losses within 1e-3 relative.

    Not 100: on lenet5 (ReLU + max-pool) a one-ulp difference between the frameworks grows
    about tenfold every 7 steps once a max-pool argmax or a ReLU sign flips (measured: 3e-6 by
    step 20, 5e-5 by 30, 4.5e-4 by 40, 1.4e-2 by 60). The smooth lenet5_classic below holds for
    all 100 steps, so the ports agree and the divergence is the network's own sensitivity.
    """
    losses = _step_losses(one_epoch_runs)
    assert len(losses["jax"]) == len(losses["torch"]) == 60_000 // 128
    rel = np.abs(losses["jax"][:30] - losses["torch"][:30]) / losses["torch"][:30]
    assert rel.max() <= 1e-3, rel.max()


@SLOW
def test_programs_agree_step_by_step_classic(tmp_path, mnist_dir) -> None:
    """tanh + average pooling (no argmax to flip): 100 steps of the default optimizer and
    schedule within 1e-3 relative (6e-6 measured)."""
    spec = PRESETS["lenet5_classic"]
    init = tmp_path / "init.safetensors"
    save_weights(init, lenet_torch.get_weights(lenet_torch.build(spec, seed=0)), spec)
    runs = {}
    for framework, module in PROGRAMS.items():
        runs[framework] = tmp_path / framework
        _run(module, "--spec", "lenet5_classic", "--max-steps", "100", "--epochs", "1",
             "--init-weights", str(init), "--log-steps", "--quiet", "--data-dir", mnist_dir,
             "--workdir", str(runs[framework]))
    losses = _step_losses(runs)
    assert len(losses["jax"]) == len(losses["torch"]) == 100
    rel = np.abs(losses["jax"] - losses["torch"]) / losses["torch"]
    assert rel.max() <= 1e-3, rel.max()


@SLOW
def test_programs_agree_after_one_epoch(one_epoch_runs) -> None:
    records = {fw: read_jsonl(d / "metrics.jsonl") for fw, d in one_epoch_runs.items()}
    for fw, recs in records.items():
        assert len(recs) == 1
        for key in ("epoch", "step", "train_loss", "train_accuracy", "test_loss",
                    "test_accuracy", "images_per_sec", "wall_s"):
            assert key in recs[0], (fw, key)
        assert recs[0]["test_accuracy"] > 0.97, fw  # one epoch of LeNet-5 learns MNIST
    gap = abs(records["jax"][0]["test_accuracy"] - records["torch"][0]["test_accuracy"])
    assert gap <= 0.003, gap


@SLOW
def test_weights_file_loads_into_both_ports(one_epoch_runs) -> None:
    import jax.numpy as jnp
    import torch

    from lenet_train.data import prepare

    weights, spec = load_weights(one_epoch_runs["jax"] / "weights.safetensors")
    t, j = lenet_torch.build(spec), lenet_jax.build(spec)
    lenet_torch.set_weights(t, weights)
    lenet_jax.set_weights(j, weights)
    images, labels = mnist("test")
    x = prepare(images[:2000], spec)
    with torch.no_grad():
        acc_t = (t(torch.from_numpy(x)).argmax(1).numpy() == labels[:2000]).mean()
    acc_j = (np.asarray(j(jnp.asarray(x.transpose(0, 2, 3, 1)))).argmax(1) == labels[:2000]).mean()
    assert acc_t == acc_j and acc_t > 0.97


@SLOW
@pytest.mark.parametrize("framework", PROGRAMS)
def test_resume_and_refuse_overwrite(tmp_path, mnist_dir, framework: str) -> None:
    workdir = tmp_path / "run"
    common = ["--max-steps", "40", "--batch-size", "500", "--data-dir", mnist_dir,
              "--workdir", str(workdir), "--quiet"]
    _run(PROGRAMS[framework], "--epochs", "1", *common)
    res = _run(PROGRAMS[framework], "--epochs", "1", *common, check=False)
    assert res.returncode == 2 and "is not empty; pass --resume" in res.stderr
    _run(PROGRAMS[framework], "--epochs", "2", "--resume", *common[:1], "80", *common[2:])
    records = read_jsonl(workdir / "metrics.jsonl")  # epoch 0 (120 steps) was cut at 40: its
    assert [r["epoch"] for r in records] == [0]      # next 40 steps, as 80 straight would train
    assert [r["step"] for r in records] == [80]
    res = _run(PROGRAMS[framework], "--epochs", "3", "--resume", "--optimizer", "sgd", *common,
               check=False)
    assert res.returncode == 2 and "written with --optimizer adam, now sgd" in res.stderr
    res = _run(PROGRAMS[framework], "--epochs", "3", "--resume", "--spec", "lenet5_3x3", *common,
               check=False)
    assert res.returncode == 2 and "written for spec 'lenet5', not --spec 'lenet5_3x3'" in \
        res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("framework", fast_only(PROGRAMS, "torch"))
def test_init_weights_of_another_spec(tmp_path, mnist_dir, framework: str) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(path, lenet_torch.get_weights(lenet_torch.build("lenet5_3x3")),
                 PRESETS["lenet5_3x3"])
    res = _run(PROGRAMS[framework], "--init-weights", str(path), "--data-dir", mnist_dir,
               "--workdir", str(tmp_path / "run"), check=False)
    assert res.returncode == 2
    assert f"--init-weights: {path}: lenet5: tensor 'conv1.weight' has shape (6, 1, 3, 3)" \
        in res.stderr
    assert "Traceback" not in res.stderr


def test_plot(tmp_path) -> None:
    """Several runs on one chart; a population's curve is its summaries' mean and s.d., not
    its members' records."""
    for name, acc in (("jax", 0.98), ("torch", 0.97)):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "metrics.jsonl", "w") as f:
            for e in range(3):
                f.write(json.dumps({"epoch": e, "train_loss": 1 / (e + 1), "test_loss": 1 / (e + 2),
                                    "train_accuracy": acc - 0.1 / (e + 1),
                                    "test_accuracy": acc}) + "\n")
    (tmp_path / "population").mkdir()
    with open(tmp_path / "population" / "metrics.jsonl", "w") as f:
        for e in range(3):
            members = [{"epoch": e, "seed": s, "train_loss": 1.0 + s, "test_loss": 1.0 + s,
                        "train_accuracy": 0.9, "test_accuracy": 0.9 + s / 100} for s in (0, 2)]
            summary = {"epoch": e, "seeds": [0, 2], "members": 2}
            for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy"):
                values = [m[key] for m in members]
                summary[key], summary[key + "_sd"] = np.mean(values), np.std(values, ddof=1)
            f.writelines(json.dumps(r) + "\n" for r in (*members, summary))
    records = read_jsonl(tmp_path / "population" / "metrics.jsonl")
    assert curve(records, "test_accuracy") == ([0, 1, 2], [0.91] * 3,
                                               [pytest.approx(0.02 / 2**0.5)] * 3)
    assert curve(read_jsonl(tmp_path / "jax" / "metrics.jsonl"), "test_accuracy") == (
        [0, 1, 2], [0.98] * 3, None)
    out = tmp_path / "curves.png"
    res = _run("lenet_train.plot", str(tmp_path / "jax"), str(tmp_path / "torch"),
               str(tmp_path / "population"), "-o", str(out))
    assert "wrote" in res.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_says_what_it_shows(tmp_path) -> None:
    """Legends name the framework (and the spec where the runs differ in it), the title the
    spec and dataset, the x axis counts whole epochs as the programs number them, and a
    one-epoch population's axis spans that epoch, not 0.96–1.04."""
    import matplotlib

    matplotlib.use("Agg")
    from lenet_train.plot import describe, figure

    record = {"epoch": 0, "train_loss": 0.5, "test_loss": 0.4, "train_accuracy": 0.9,
              "test_accuracy": 0.91}
    for fw in ("jax", "torch"):
        (tmp_path / fw).mkdir()
        (tmp_path / fw / "config.json").write_text(json.dumps(
            {"framework": fw, "spec": {"name": "lenet5"}, "dataset": "mnist"}))
    assert describe(tmp_path / "jax") == ("JAX", "lenet5", "mnist")
    fig = figure({"JAX": [record, {**record, "epoch": 1}, {**record, "epoch": 2}],
                  "torch": [record]}, "lenet5 on mnist")
    ax = fig.axes[1]
    assert fig._suptitle.get_text() == "lenet5 on mnist"
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["JAX, train", "JAX, test"]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks == [0.0, 1.0, 2.0] and ax.get_xlim() == (-0.5, 2.5)
    population = [{**record, "seed": 1}, {**record, "seeds": [1, 2], "members": 2,
                                          **{f"{k}_sd": 0.01 for k in record if k != "epoch"}}]
    ax = figure({"JAX": population}).axes[0]
    assert ax.get_xlim() == (-0.5, 0.5)


@SLOW
def test_jax_steps_per_call_scan_matches_single_steps(tmp_path, mnist_dir) -> None:
    """``--steps-per-call 5`` (lax.scan) trains the same 20 steps as one jitted step per call:
    per-step losses within 1e-4 relative (XLA may fuse the scanned body differently)."""
    losses = {}
    for k in ("1", "5"):
        workdir = tmp_path / k
        _run("lenet_jax.train", "--spec", "lenet5_classic", "--max-steps", "20", "--epochs", "1",
             "--steps-per-call", k, "--log-steps", "--quiet", "--data-dir", mnist_dir,
             "--workdir", str(workdir))
        losses[k] = np.array([r["loss"] for r in read_jsonl(workdir / "steps.jsonl")])
    assert len(losses["1"]) == len(losses["5"]) == 20
    assert np.all(np.abs(losses["5"] - losses["1"]) <= 1e-4 * losses["1"])


@SLOW
def test_torch_compile_trains_like_eager(tmp_path, mnist_dir) -> None:
    """``--compile`` (torch.compile) trains the same 10 steps as eager: per-step losses within
    1e-4 relative (inductor may fuse and reorder float32 arithmetic)."""
    losses = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        workdir = tmp_path / name
        _run("lenet_torch.train", "--train-size", "1280", "--epochs", "1", "--log-steps",
             "--quiet", "--data-dir", mnist_dir, "--workdir", str(workdir), *extra)
        losses[name] = np.array([r["loss"] for r in read_jsonl(workdir / "steps.jsonl")])
    assert len(losses["eager"]) == len(losses["compiled"]) == 10
    assert np.all(np.abs(losses["compiled"] - losses["eager"]) <= 1e-4 * losses["eager"])


@SLOW
@pytest.mark.parametrize("framework", PROGRAMS)
def test_kernels_flag_trains_the_same_steps(tmp_path, mnist_dir, framework: str) -> None:
    """``--kernels stock`` and ``--kernels fused`` train the same 20 steps: per-step losses
    within 1e-4 relative (the same as the parity battery's trajectories), and the first line
    says which kernels ran."""
    losses = {}
    for kernels in ("stock", "fused"):
        workdir = tmp_path / kernels
        res = _run(PROGRAMS[framework], "--kernels", kernels, "--spec", "lenet5_classic",
                   "--max-steps", "20", "--epochs", "1", "--log-steps", "--data-dir",
                   mnist_dir, "--workdir", str(workdir))
        assert f", {kernels} kernels, float32; lenet5_classic, 20 steps" in res.stdout
        losses[kernels] = np.array([r["loss"] for r in read_jsonl(workdir / "steps.jsonl")])
    assert len(losses["stock"]) == len(losses["fused"]) == 20
    assert np.all(np.abs(losses["fused"] - losses["stock"]) <= 1e-4 * losses["stock"])


@SLOW
@pytest.mark.parametrize("framework", PROGRAMS)
def test_an_output_layer_trains_as_its_logits(tmp_path, mnist_dir, framework: str) -> None:
    """A spec ending in log_softmax trains the same steps as the spec without it (cross-entropy
    of the logits is the NLL of the log-probabilities); a spec whose outputs are not the
    dataset's classes is one line naming both counts."""
    base = PRESETS["lenet5"].to_dict()
    losses = {}
    for name, extra in (("logits", []), ("log_probs", [{"type": "log_softmax"}])):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**base, "name": name, "layers": base["layers"] + extra}))
        workdir = tmp_path / name
        _run(PROGRAMS[framework], "--spec", str(path), "--max-steps", "8", "--epochs", "1",
             "--log-steps", "--train-size", "1024", "--data-dir", mnist_dir, "--workdir",
             str(workdir))
        losses[name] = np.array([r["loss"] for r in read_jsonl(workdir / "steps.jsonl")])
    assert len(losses["logits"]) == 8
    np.testing.assert_array_equal(losses["log_probs"], losses["logits"])
    path = tmp_path / "seven.json"
    layers = base["layers"][:-1] + [{**base["layers"][-1], "out_features": 7}]
    path.write_text(json.dumps({**base, "name": "seven", "layers": layers}))
    res = _run(PROGRAMS[framework], "--spec", str(path), "--data-dir", mnist_dir, "--workdir",
               str(tmp_path / "seven_run"), check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "spec seven ends in 7 outputs; mnist has 10 classes" in res.stderr
