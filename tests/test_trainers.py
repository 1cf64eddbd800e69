"""The trainer integrations of docs/trainers.md, run as a user runs them: the example scripts
examples/lightning_ddp.py (PyTorch Lightning, ``DDPStrategy`` on gloo) and
examples/accelerate_ddp.py (Hugging Face Accelerate, ``accelerate launch``), each on 2 real CPU
processes.

For each: one run of 2 epochs that checkpoints after every epoch, and one run resumed from
the first epoch's checkpoint. The model trains (finite losses that go down), AdaComp
compresses (bytes on the wire far below dense fp32), and the resumed run ends with the same
parameters and residues on every rank, bit for bit, as the uninterrupted one.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
EPOCHS = 2
STEPS_PER_EPOCH = 1438 // WORLD // 32  # digits train split, per rank, batch 32, drop_last
TIMEOUT = 240

FRAMEWORKS = {
    "lightning": ("lightning", "pip install lightning"),
    "accelerate": ("accelerate", "pip install accelerate"),
}


def _need(framework: str) -> None:
    module, hint = FRAMEWORKS[framework]
    pytest.importorskip(module, reason=f"{module} not installed ({hint}); optional trainer integration")
    pytest.importorskip("sklearn", reason="the digits data set needs scikit-learn (make data)")


def _command(framework: str, args: list[str]) -> list[str]:
    if framework == "lightning":  # Lightning starts the second process itself
        return [sys.executable, os.path.join(ROOT, "examples", "lightning_ddp.py"),
                "--devices", str(WORLD), *args]
    # `accelerate launch --cpu` starts one process; --multi_gpu is the multi-process launcher
    # (torchrun), and the script's Accelerator(cpu=True) picks gloo without CUDA.
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(WORLD), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", "0",
            os.path.join(ROOT, "examples", "accelerate_ddp.py"), "--cpu", *args]


def _env(tmp) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                        "LOCAL_WORLD_SIZE", "NODE_RANK", "ACCELERATE_USE_CPU")}
    env.update(OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]),
               HF_HOME=str(tmp / "hf"),  # no user accelerate config file
               PYTHONUNBUFFERED="1")
    return env


def launch(framework: str, tmp, name: str, *args: str) -> list[dict]:
    """Run one example on WORLD processes; return each rank's result file."""
    result = tmp / name
    cmd = _command(framework, [*args, "--result", str(result)])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env(tmp),
                          cwd=str(tmp))
    assert proc.returncode == 0, (f"{' '.join(cmd)}\nrc={proc.returncode}\n--- stdout\n"
                                  f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return [torch.load(f"{result}.rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _checkpoint(framework: str, ckpt_dir) -> str:
    # the state after the first epoch
    return str(ckpt_dir / ("epoch=0.ckpt" if framework == "lightning" else "epoch_0"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per framework, computed once: the uninterrupted run and the resumed one."""
    cache = {}

    def get(framework: str, resumed: bool = False):
        _need(framework)
        if framework not in cache:
            tmp = tmp_path_factory.mktemp(framework)
            # A fixed exchange: auto plans from measured times, so a resumed run may pick
            # other modes than the uninterrupted one and is not bit-identical to it.
            straight = launch(framework, tmp, "straight", "--epochs", str(EPOCHS), "--exchange",
                              "allgather", "--ckpt-dir", str(tmp / "ckpt"))
            cache[framework] = {"tmp": tmp, "straight": straight}
        entry = cache[framework]
        if resumed and "resumed" not in entry:
            tmp = entry["tmp"]
            entry["resumed"] = launch(framework, tmp, "resumed", "--epochs", str(EPOCHS), "--exchange",
                                      "allgather", "--resume", _checkpoint(framework, tmp / "ckpt"))
        return entry

    return get


def _params_equal(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_trains_and_compresses(runs, framework):
    res = runs(framework)["straight"]
    for rank, r in enumerate(res):
        losses = torch.tensor(r["losses"])
        assert losses.numel() == EPOCHS * STEPS_PER_EPOCH, f"rank {rank}: {losses.numel()} steps"
        assert torch.isfinite(losses).all(), f"rank {rank}: non-finite loss"
        k = STEPS_PER_EPOCH // 2
        assert losses[-k:].mean() < losses[:k].mean(), f"rank {rank}: loss did not go down {losses}"
        assert r["iter"] == EPOCHS * STEPS_PER_EPOCH  # the hook ran on every step
        t = r["stats"]["total"]
        # compressible weights: conv 32x64x3x3 and 64x64x3x3, fc 256x128 and 128x10
        assert t["conv"]["ratio"] > 10, t["conv"]
        assert t["fc"]["ratio"] > 10, t["fc"]
        assert t["all"]["wire_bytes"] < t["all"]["dense_bytes"] / 10, t["all"]
        assert r["adacomp_state"]["compressor"]["residues"], "no residues kept"
    assert not _params_equal(res[0]["params"], res[1]["params"]), "DDP ranks diverged"


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_checkpoint_resume_is_bit_exact(runs, framework):
    entry = runs(framework, resumed=True)
    straight, resumed = entry["straight"], entry["resumed"]
    for rank in range(WORLD):
        a, b = straight[rank], resumed[rank]
        # it resumed after epoch 1 (did not start over) and ran the same steps
        assert len(b["losses"]) == STEPS_PER_EPOCH, f"rank {rank}: {len(b['losses'])} steps"
        assert b["losses"] == a["losses"][STEPS_PER_EPOCH:], f"rank {rank}: losses differ"
        assert b["iter"] == a["iter"] == EPOCHS * STEPS_PER_EPOCH
        assert not _params_equal(a["params"], b["params"]), f"rank {rank}: parameters differ"
        ra = a["adacomp_state"]["compressor"]["residues"]
        rb = b["adacomp_state"]["compressor"]["residues"]
        assert ra.keys() == rb.keys()
        assert all(torch.equal(ra[n], rb[n]) for n in ra), f"rank {rank}: residues differ"
        assert any(bool(v.abs().sum() > 0) for v in ra.values()), "residues are all zero"
        # the traffic statistics carried over too
        assert b["stats"]["total"]["all"] == a["stats"]["total"]["all"]
    # residues are per rank: the two ranks' differ (each took its own entry of the checkpoint)
    r0 = straight[0]["adacomp_state"]["compressor"]["residues"]
    r1 = straight[1]["adacomp_state"]["compressor"]["residues"]
    assert any(not torch.equal(r0[n], r1[n]) for n in r0)
