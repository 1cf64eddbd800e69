"""The DDP communication hook on real processes (gloo, world sizes 2 and 3).

Each test spawns workers that train with ``register_comm_hook(AdaCompState(...),
adacomp_hook)`` and compares against a single-process simulation of the same workers
running the core compressor directly (tests/_ddp_scenarios.py).
"""

import functools

import pytest
import torch

from . import _ddp_scenarios as sc
from . import _dist

pytestmark = pytest.mark.distributed

STEPS = 6
CNN = {"bin_size": None, "min_numel": 64}          # paper defaults: conv 50, fc 500, 1-D dense
ALL_COMPRESSED = {"bin_size": 50, "min_numel": 0}  # every tensor, biases included


def run(tmp_path, fn, world, *args, timeout=240):
    return _dist.results(_dist.run(fn, world, *args, out_dir=str(tmp_path), timeout=timeout))


def assert_params_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].view(-1).view(torch.int32) if a[k].dtype == torch.float32 else a[k],
                           b[k].view(-1).view(torch.int32) if b[k].dtype == torch.float32 else b[k]), k


def assert_ranks_identical(res):
    for r in res[1:]:
        assert r["digests"] == res[0]["digests"], "ranks diverged"


@pytest.mark.parametrize("kind", ["cnn", "lstm"])
def test_hook_equals_simulation_world2(tmp_path, kind):
    res = run(tmp_path, sc.train, 2, kind, CNN, STEPS)
    assert_ranks_identical(res)
    sim = sc.simulate(kind, 2, CNN, STEPS)
    assert res[0]["digests"] == sim["digests"]  # bit-identical after every step
    assert_params_equal(res[0]["params"], sim["params"])
    for n, r in sim["residues"].items():  # rank 0's residues, keyed by name
        assert torch.equal(res[0]["residues"][n], r), n
    st = res[0]["stats"]
    assert st["steps"] == STEPS
    assert st["total"]["all"]["wire_bytes"] < st["total"]["all"]["dense_bytes"]
    assert "compressed" in st["decisions"].values() and "dense" in st["decisions"].values()


def test_hook_equals_simulation_world3_all_compressed(tmp_path):
    """World 3 with every tensor compressed: the project sums everything itself, in rank
    order, so even three workers are bit-identical to the simulation."""
    res = run(tmp_path, sc.train, 3, "cnn", ALL_COMPRESSED, STEPS)
    assert_ranks_identical(res)
    sim = sc.simulate("cnn", 3, ALL_COMPRESSED, STEPS)
    assert res[0]["digests"] == sim["digests"]


def test_hook_world3_with_dense_tensors(tmp_path):
    """World 3 with dense tensors: gloo's allreduce may sum three values in another order
    than the simulation, so parameters agree to fp32 rounding (ranks still bit-identical)."""
    res = run(tmp_path, sc.train, 3, "lstm", CNN, STEPS)
    assert_ranks_identical(res)
    sim = sc.simulate("lstm", 3, CNN, STEPS)
    for n, p in sim["params"].items():
        torch.testing.assert_close(res[0]["params"][n], p, rtol=1e-5, atol=1e-6)


def test_checkpoint_resume_is_exact(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = run(tmp_path / "a", functools.partial(sc.train, save_at=3), 2, "cnn", CNN, STEPS)
    ckpts = [r["saved"] for r in full]
    resumed = run(tmp_path / "b", functools.partial(sc.train, resume=ckpts), 2, "cnn", CNN, STEPS)
    assert resumed[0]["digests"] == full[0]["digests"][3:]
    assert_params_equal(resumed[0]["params"], full[0]["params"])
    assert resumed[1]["iter"] == STEPS


def test_nonfinite_gradient_skips_step_and_keeps_residues(tmp_path):
    hist = run(tmp_path, sc.train_scaler, 2, "cnn", CNN, 4, 2, 1)
    for rank, h in enumerate(hist):
        bad = h[2]
        assert not bad["grads_finite"], f"rank {rank}: averaged gradient should be non-finite"
        assert_params_equal(bad["before"], bad["after"])  # the scaler skipped the step
        for n in bad["res_before"]:
            assert torch.equal(bad["res_before"][n], bad["res_after"][n]), n
        assert bad["scale"] < h[1]["scale"]
        assert h[3]["grads_finite"] and not all(  # and training goes on
            torch.equal(h[3]["before"][n], h[3]["after"][n]) for n in h[3]["before"])


@pytest.mark.parametrize("cfg", [
    dict(CNN, accumulate=2),            # no_sync gradient accumulation
    dict(CNN, static_graph=True),
    dict(CNN, start_iter=2),            # dense warm-up steps, then AdaComp
    dict(CNN, bucket_cap_mb=25),        # one big bucket holding every parameter
], ids=["no_sync", "static_graph", "start_iter", "one_bucket"])
def test_hook_variants_equal_simulation(tmp_path, cfg):
    res = run(tmp_path, sc.train, 2, "cnn", cfg, 4)
    assert_ranks_identical(res)
    assert res[0]["digests"] == sc.simulate("cnn", 2, cfg, 4)["digests"]


def test_find_unused_parameters(tmp_path):
    cfg = dict(CNN, find_unused=True)
    res = run(tmp_path, sc.train, 2, "unused", cfg, 4)
    assert_ranks_identical(res)
    assert res[0]["digests"] == sc.simulate("unused", 2, cfg, 4)["digests"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients(tmp_path, dtype):
    res = run(tmp_path, functools.partial(sc.train, dtype=dtype), 2, "cnn", ALL_COMPRESSED, 3)
    assert_ranks_identical(res)
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in res[0]["params"].values())
    assert res[0]["stats"]["total"]["conv"]["ratio"] > 2


def test_config_mismatch_raises_on_every_rank(tmp_path):
    outcomes = _dist.run(sc.mismatch, 2, out_dir=str(tmp_path), timeout=120)
    for o in outcomes:
        assert not o["ok"], "a differing configuration must not pass silently"
        assert "configuration differs between ranks" in o["error"]


# ------------------------------------------------------------------ sharded exchange

SHARDED = dict(CNN, exchange="sharded")
SHARDED_ALL = dict(ALL_COMPRESSED, exchange="sharded")


def assert_owner_residues_equal(res, sim):
    """Every owner residue of the simulation lives on exactly one rank, bit-identical."""
    seen = set()
    for r in res:
        for n, v in r["owner_residues"].items():
            assert torch.equal(v, sim["owner_residues"][n]), n
            assert n not in seen, f"{n} owned by two ranks"
            seen.add(n)
    assert seen == set(sim["owner_residues"]), "owner residues missing on the ranks"


@pytest.mark.parametrize("world,kind,cfg", [
    (2, "lstm", SHARDED),        # dense biases beside sharded recurrent matrices
    (3, "cnn", SHARDED_ALL),     # every tensor sharded; three owners
    (4, "cnn", SHARDED_ALL),     # more shards than some tensors have bins (empty shards)
], ids=["w2-lstm", "w3-cnn", "w4-cnn"])
def test_sharded_equals_simulation(tmp_path, world, kind, cfg):
    res = run(tmp_path, sc.train, world, kind, cfg, 4)
    assert_ranks_identical(res)
    sim = sc.simulate(kind, world, cfg, 4)
    assert res[0]["digests"] == sim["digests"]
    for r in range(world):  # first-level residues, per rank
        for n, v in sim["all_residues"][r].items():
            assert torch.equal(res[r]["residues"][n], v), (r, n)
    assert_owner_residues_equal(res, sim)
    st = res[0]["stats"]
    assert st["exchanges"]["sharded"] > 0 and st["exchanges"]["allgather"] == 0
    assert st["received_bytes"]["total"] > 0


def test_sharded_checkpoint_resume_is_exact(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = run(tmp_path / "a", functools.partial(sc.train, save_at=2), 3, "cnn", SHARDED_ALL, 4)
    ckpts = [r["saved"] for r in full]
    assert all(c["hook"]["owner"]["residues"] for c in ckpts), "owner residues must be checkpointed"
    resumed = run(tmp_path / "b", functools.partial(sc.train, resume=ckpts), 3, "cnn", SHARDED_ALL, 4)
    assert resumed[0]["digests"] == full[0]["digests"][2:]
    assert_params_equal(resumed[0]["params"], full[0]["params"])


def test_sharded_nonfinite_gradient(tmp_path):
    hist = run(tmp_path, sc.train_scaler, 3, "cnn", SHARDED, 4, 2, 1)
    for rank, h in enumerate(hist):
        bad = h[2]
        assert not bad["grads_finite"], f"rank {rank}: averaged gradient should be non-finite"
        assert_params_equal(bad["before"], bad["after"])
        for n in bad["res_before"]:
            assert torch.equal(bad["res_before"][n], bad["res_after"][n]), n
        assert h[3]["grads_finite"]


def test_auto_reports_its_choice(tmp_path):
    """exchange="auto" (the default, with the measured cost model): ranks agree, and stats
    say what was chosen and why."""
    res = run(tmp_path, sc.train, 3, "cnn", dict(CNN, exchange="auto"), 3)
    assert_ranks_identical(res)
    st = res[0]["stats"]
    assert sum(st["exchanges"].values()) > 0
    chosen = [c for c in st["last_choice"].values() if c["mode"]]
    assert chosen and all("measured" in c["reason"] for c in chosen)
    assert all(set(c["measured"]) == {"allgather", "sharded", "dense"} for c in chosen)
    assert st["slots"]["one_round"] > 0  # auto's all-gather exchanges go in one round too


def _compiled_autograd(rank, world):
    import torch._dynamo
    from torch._dynamo import compiled_autograd
    from torch.nn.parallel import DistributedDataParallel as DDP

    import adacomp

    torch._dynamo.config.optimize_ddp = "python_reducer"
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    ddp = DDP(model)
    state = adacomp.AdaCompState(model=ddp, min_numel=0, log_every=0)
    ddp.register_comm_hook(state, adacomp.adacomp_hook)
    with compiled_autograd._enable(torch.compile(backend="eager")):
        torch.compile(ddp, backend="eager")(torch.randn(8, 64)).sum().backward()
    return "no error"


def test_compiled_autograd_per_parameter_form_is_refused_clearly(tmp_path):
    """optimize_ddp="python_reducer" (compiled autograd) calls hooks per parameter as
    hook(state, (grad, param)): every rank raises an error naming the setting, none hangs."""
    out = _dist.run(_compiled_autograd, 2, out_dir=str(tmp_path), timeout=180)
    for o in out:
        assert not o["ok"] and "optimize_ddp" in o["error"] and "python_reducer" in o["error"], o


def _hook_blocking(rank, world, overlap):
    """Rank 1 starts its backward pass 1.5 s late; how long does each of rank 0's hook calls
    block the backward pass?"""
    import time

    from torch.nn.parallel import DistributedDataParallel as DDP

    import adacomp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))
    ddp = DDP(model, bucket_cap_mb=0.2)
    state = adacomp.AdaCompState(model=ddp, min_numel=0, log_every=0, overlap=overlap)
    calls = []

    def timed(st, bucket):
        t = time.perf_counter()
        fut = adacomp.adacomp_hook(st, bucket)
        calls.append(time.perf_counter() - t)
        return fut

    ddp.register_comm_hook(state, timed)
    x = torch.randn(8, 256)
    for _ in range(2):  # the worker's process group is made, DDP rebuilds its buckets
        ddp(x).sum().backward()
    calls.clear()
    loss = ddp(x).sum()
    if rank == 1:  # rank 1 starts its backward pass late
        time.sleep(1.5)
    loss.backward()
    return {"calls": calls, "params": [p.detach().clone() for p in model.parameters()]}


@pytest.mark.parametrize("overlap", [True, False])
def test_exchange_overlaps_the_backward_pass(tmp_path, overlap):
    """overlap=True: no hook call waits on the network (rank 0's calls return at once while
    rank 1 is late); overlap=False: the size exchange blocks the first call until rank 1
    comes. Same parameters either way."""
    res = run(tmp_path, _hook_blocking, 2, overlap)
    calls = res[0]["calls"]
    assert len(calls) >= 2, calls
    if overlap:
        assert max(calls) < 0.5, calls
    else:
        assert max(calls) > 1.0, calls
    assert all(torch.equal(a, b) for a, b in zip(res[0]["params"], res[1]["params"]))


# ------------------------------------------------------------------ one-round exchange

@pytest.mark.parametrize("world,kind,cfg", [
    (2, "cnn", dict(CNN, overlap=False)),
    (3, "lstm", dict(CNN)),
    (2, "cnn", dict(CNN, slot_capacity=40)),                    # every exchange overflows
    (3, "cnn", dict(ALL_COMPRESSED, slot_capacity=0, overlap=False)),
], ids=["w2-cnn-overlap-off", "w3-lstm", "w2-overflow", "w3-overflow-all-in-tails"])
def test_one_round_exchange_equals_simulation(tmp_path, world, kind, cfg):
    """After each bucket's first exchange the hook sends sizes and payloads in one all-gather
    of slots (and the bytes beyond a slot in a second one): the same parameters, bit for
    bit, as the simulation, on every rank."""
    steps = 5
    res = run(tmp_path, sc.train, world, kind, cfg, steps)
    assert_ranks_identical(res)
    assert res[0]["digests"] == sc.simulate(kind, world, cfg, steps)["digests"]
    slots = res[0]["stats"]["slots"]
    buckets = sum(res[0]["stats"]["exchanges"].values()) // steps
    # two rounds in each bucket's first exchange (step 0, and step 1 after DDP rebuilt them)
    assert slots["one_round"] >= (steps - 2) * buckets > 0, (slots, buckets)
    if "slot_capacity" in cfg:
        assert slots["overflow"] == slots["one_round"], slots
    slotted = [c["slot"] for c in res[0]["stats"]["last_choice"].values() if "slot" in c]
    assert slotted and all(c["overflow"] for c in slotted if "slot_capacity" in cfg), slotted


def test_one_round_is_what_two_rounds_compute(tmp_path):
    """one_round=False (sizes first always) gives the same training, bit for bit."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = run(tmp_path / "one", sc.train, 2, "lstm", dict(CNN), 4)
    two = run(tmp_path / "two", sc.train, 2, "lstm", dict(CNN, one_round=False), 4)
    assert one[0]["digests"] == two[0]["digests"]
    assert two[0]["stats"]["slots"]["one_round"] == 0 < one[0]["stats"]["slots"]["one_round"]


@pytest.mark.parametrize("overlap", [True, False])
def test_one_round_local_error_raises_on_every_rank(tmp_path, overlap):
    """A rank that fails before a one-round exchange still fills its slot (marked failed):
    it raises its own error, the others a ConfigMismatchError, and nobody hangs."""
    out = _dist.run(sc.fail_in_step, 2, 1, 3, overlap, out_dir=str(tmp_path), timeout=120)
    assert not out[1]["ok"] and "KeyError" in out[1]["error"], out[1]
    assert not out[0]["ok"] and "ConfigMismatchError" in out[0]["error"], out[0]
    assert "failed before this exchange" in out[0]["error"]
