"""The exchange protocol (adacomp.parallel.exchange) in one process: W ranks as threads over a
loopback Transport, so the sharded and auto modes' bookkeeping is checked quickly and
exactly; tests/test_ddp.py and tests/test_integrations.py run them over real collectives."""

from __future__ import annotations

import pickle
import threading

import pytest
import torch

from adacomp import AdaComp
from adacomp.parallel.exchange import (
    META_FIXED,
    CostModel,
    GroupExchange,
    MeasuredCost,
    PlainExchangeState,
    SlotCapacity,
    SlotPlan,
    Transport,
    owner_key,
    run_exchange,
)
from adacomp.payload import shard_bounds


class Hub:
    def __init__(self, world):
        self.world = world
        self.slots = [None] * world
        self.barrier = threading.Barrier(world)


class Loopback(Transport):
    def __init__(self, hub: Hub, rank: int):
        self.hub, self.rank, self.world = hub, rank, hub.world

    def _share(self, obj):
        self.hub.slots[self.rank] = obj
        self.hub.barrier.wait()
        out = list(self.hub.slots)
        self.hub.barrier.wait()
        return out

    def allgather_int64(self, t):
        return torch.stack(self._share(t.clone()))

    def allgatherv(self, own, sizes):
        got = self._share(own.clone())
        assert [g.numel() for g in got] == list(sizes)
        return got

    def alltoallv(self, parts, recv_sizes):
        got = [p[self.rank] for p in self._share([p.clone() for p in parts])]
        assert [g.numel() for g in got] == list(recv_sizes)
        return got

    def allreduce_sum(self, flat):
        got = self._share(flat.clone())
        acc = got[0].clone()
        for g in got[1:]:
            acc += g
        return acc


def on_every_rank(world, work):
    """``work(rank, transport)`` on ``world`` threads joined by a :class:`Loopback` hub;
    returns the per-rank results, or raises the first rank's error."""
    hub = Hub(world)
    outs = [None] * world
    errors = []

    def run(r):
        try:
            outs[r] = work(r, Loopback(hub, r))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
            hub.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return outs


def exchange_all(states, grads_per_rank, names):
    """Run one exchange on every rank (threads); return per-rank outputs."""
    world = len(states)

    def work(r, transport):
        outputs = [torch.empty_like(g) for g in grads_per_rank[r]]
        ex = states[r].group_exchange(names, grads_per_rank[r], world, r, outputs=outputs)
        run_exchange(ex, transport, states[r].traffic)
        states[r].end_step()
        return outputs

    return on_every_rank(world, work)


def make_states(world, exchange, **kw):
    cost = kw.pop("cost_model", None)
    return [PlainExchangeState(AdaComp(**kw), exchange, cost) for _ in range(world)]


SHAPES = {"conv": (16, 8, 3, 3), "fc": (40, 64), "bias": (40,), "tiny": (3, 50)}


def grads(world, step, scale=1.0):
    out = []
    for r in range(world):
        g = torch.Generator().manual_seed(100 * step + r)
        out.append([scale * torch.randn(s, generator=g) for s in SHAPES.values()])
    return out


def test_shard_bounds_are_bin_aligned_and_cover():
    for n, L, W in [(1000, 50, 3), (1234, 500, 4), (30, 50, 4), (1, 7, 3), (0, 5, 2), (520, 50, 8)]:
        b = shard_bounds(n, L, W)
        assert len(b) == W and b[0][0] == 0 and b[-1][1] == n
        assert all(b[i][1] == b[i + 1][0] for i in range(W - 1))
        eff = max(1, min(L, n))
        assert all(s % eff == 0 for s, _ in b)  # every bin lies inside one shard
        sizes = [(e - s + eff - 1) // eff for s, e in b]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="shards must be >= 1"):
        shard_bounds(10, 2, 0)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_is_lossless_with_owner_residues(world):
    """The lossless invariant of docs/algorithm.md, extended: summed over steps, the mean gradient equals
    what was applied plus the mean first-level residue plus the owner residues."""
    states = make_states(world, "sharded", min_numel=0)
    names = list(SHAPES)
    total_grad = [torch.zeros(s, dtype=torch.float64) for s in SHAPES.values()]
    total_out = [torch.zeros(s, dtype=torch.float64) for s in SHAPES.values()]
    for step in range(8):
        gs = grads(world, step)
        outs = exchange_all(states, gs, names)
        for r in range(1, world):
            for a, b in zip(outs[0], outs[r]):
                assert torch.equal(a, b), "ranks must agree bit for bit"
        for i in range(len(names)):
            total_grad[i] += sum(g[i].double() for g in gs) / world
            total_out[i] += outs[0][i].double()
    for i, (name, shape) in enumerate(SHAPES.items()):
        L = states[0].compressor.bin_size_for(name, torch.zeros(shape))
        second = torch.zeros(shape, dtype=torch.float64).reshape(-1)
        if L is None:  # 1-D: sent dense, exact up to rounding
            torch.testing.assert_close(total_out[i], total_grad[i], rtol=0, atol=1e-5)
            continue
        first = sum(s.compressor.residue(name).double() for s in states) / world
        for s_idx, (start, end) in enumerate(shard_bounds(second.numel(), L, world)):
            if end > start:
                second[start:end] = states[s_idx].owner.residue(owner_key(name, start, end)).double()
        rebuilt = total_out[i] + first + second.view(shape)
        torch.testing.assert_close(rebuilt, total_grad[i], rtol=0, atol=1e-4)
        # one rank: the owner re-selects exactly the ternary payload it got, nothing is left
        assert (second.abs().sum() > 0) == (world > 1)


def test_auto_matches_the_mode_it_picks():
    """auto's output is bit-identical to the fixed mode it chose."""
    names = list(SHAPES)
    for cost, expect in [(CostModel(bandwidth=1e12, latency=1.0), "allgather"),   # latency bound
                         (CostModel(bandwidth=1e6, latency=0.0), "sharded")]:    # bandwidth bound
        auto = make_states(4, "auto", min_numel=0, cost_model=cost)
        fixed = make_states(4, expect, min_numel=0)
        for step in range(3):
            a = exchange_all(auto, grads(4, step), names)
            f = exchange_all(fixed, grads(4, step), names)
            for x, y in zip(a[0], f[0]):
                assert torch.equal(x, y)
        st = auto[0].stats()
        assert st["exchanges"][expect] == 3 and sum(st["exchanges"].values()) == 3
        (choice,) = st["last_choice"].values()
        assert choice["mode"] == expect and "least estimated time" in choice["reason"]


def test_auto_goes_dense_when_payloads_are_large():
    """fp32 values in bins of 2 send about half the elements at 32+ bits: with 8 ranks the
    all-gather would move 7 such payloads, and at this latency the sharded exchange's extra
    rounds cost more than they save, so the plain allreduce wins; the step is a plain
    average and the residues stay untouched."""
    names = list(SHAPES)
    states = make_states(8, "auto", min_numel=0, bin_size=2, values="fp32",
                         cost_model=CostModel(bandwidth=1e6, latency=3e-3))
    gs = grads(8, 0)
    outs = exchange_all(states, gs, names)
    (choice,) = states[0].stats()["last_choice"].values()
    assert choice["mode"] == "dense", choice["reason"]
    for i in range(len(names)):
        expect = gs[0][i].clone()
        for r in range(1, 8):
            expect += gs[r][i]
        torch.testing.assert_close(outs[0][i], expect / 8)
        if names[i] != "bias":
            assert states[0].compressor.residue(names[i]).abs().sum() == 0
    assert states[0].stats()["exchanges"]["dense"] == 1


def test_cost_model_formulas():
    W, D = 4, 4000
    sizes = torch.full((W, 2, W), 25, dtype=torch.int64)  # every rank: 2 tensors x 4 shards of 25 B
    cm = CostModel(bandwidth=1000.0, latency=0.5)
    est = cm.estimate(W, D, sizes)
    assert est["dense"] == (2 * 3 * D / 4 / 1000 + 6 * 0.5, 6000)
    assert est["allgather"] == (3 * 200 / 1000 + 3 * 0.5, 600)
    # all-to-all: sends 3 x 50 B, receives 3 x 50 B; owners ~ 50 B each, gathered from 3
    assert est["sharded"] == ((150 + 3 * 50) / 1000 + 9 * 0.5, 300)
    with pytest.raises(ValueError, match="bandwidth > 0"):
        CostModel(bandwidth=0)


def test_received_bytes_scale():
    """Per-worker received bytes: allgather grows with W, sharded stays about flat."""
    names = ["fc"]
    shape = (256, 512)
    recv = {"allgather": [], "sharded": []}
    for world in (2, 4, 8):
        for mode in recv:
            states = make_states(world, mode)
            for step in range(2):
                gs = []
                for r in range(world):
                    g = torch.Generator().manual_seed(10 * step + r)
                    gs.append([torch.randn(shape, generator=g)])
                exchange_all(states, gs, names)
            recv[mode].append(states[0].stats()["received_bytes"]["last_step"])
    ag, sh = recv["allgather"], recv["sharded"]
    assert ag[2] > 5 * ag[0], ag          # (W - 1) payloads
    # sharded: (W - 1)/W of two payloads, bounded whatever W is (1 -> 1.75 from 2 to 8)
    assert sh[2] < 2 * sh[0] and max(sh[1:]) < 1.3 * min(sh[1:]), sh
    assert sh[2] < ag[2] / 2


def test_bad_exchange_settings():
    with pytest.raises(ValueError, match="exchange must be one of"):
        PlainExchangeState(AdaComp(), "ring")
    with pytest.raises(ValueError, match="needs the owner compressor"):
        GroupExchange(AdaComp(), ["a"], [torch.zeros(4, 4)], 2, exchange="sharded")
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        GroupExchange(AdaComp(), ["a"], [torch.zeros(4, 4)], 2, rank=2)


def test_mode_mismatch_raises_on_every_rank():
    from adacomp.parallel.exchange import ConfigMismatchError

    states = [PlainExchangeState(AdaComp(min_numel=0), "sharded"),
              PlainExchangeState(AdaComp(min_numel=0), "allgather")]
    with pytest.raises(ConfigMismatchError):
        exchange_all(states, grads(2, 0), list(SHAPES))


def test_owner_residues_round_trip_state_dict():
    states = make_states(2, "sharded", min_numel=0)
    exchange_all(states, grads(2, 0), list(SHAPES))
    sd = states[1].state_dict()
    fresh = PlainExchangeState(AdaComp(min_numel=0), "sharded")
    fresh.load_state_dict(sd)
    for n in states[1].owner.names():
        assert torch.equal(fresh.owner.residue(n), states[1].owner.residue(n))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sharded_half_precision_gradients(dtype):
    """fp16/bf16 gradients: the math is fp32, the outputs come back in the gradients' dtype,
    identical on every rank and close to the plain average after error feedback settles."""
    names = list(SHAPES)
    states = make_states(3, "sharded", min_numel=0)
    for step in range(3):
        gs = [[g.to(dtype) for g in rank_grads] for rank_grads in grads(3, step)]
        outs = exchange_all(states, gs, names)
        for o in outs[0]:
            assert o.dtype == dtype and bool(torch.isfinite(o).all())
        for r in (1, 2):
            assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[r]))
    assert states[0].stats()["exchanges"]["sharded"] == 3


def _headers(world, count, us):
    """Header rows as every rank would send them: ``us[r]`` = {mode: microseconds}."""
    h = torch.zeros(world, META_FIXED, dtype=torch.int64)
    for r in range(world):
        h[r, 5] = count
        for i, m in enumerate(("allgather", "sharded", "dense")):
            h[r, 6 + i] = us[r].get(m, -1)
    return h


def test_measured_cost_explores_then_takes_the_slowest_ranks_fastest_mode():
    mc = MeasuredCost(trials=2, window=3, refresh=20)
    # rank 1 is slow at allgather: its figure, not rank 0's, decides
    us = [{"allgather": 1000, "sharded": 3000}, {"allgather": 5000, "sharded": 3500}]
    plans = []
    for call in range(30):
        plans.append(mc.plan("g"))
        seen = set(plans[:-1])  # the modes measured before this call
        mc.observe("g", _headers(2, call, [{m: us[r][m] for m in seen} for r in range(2)]))
        mc.record("g", plans[-1], 1e-3)
    assert plans[:4] == ["allgather", "allgather", "sharded", "sharded"]
    assert plans[4:20] == ["sharded"] * 16  # 3.5 ms (rank 1) < 5 ms (rank 1)
    assert plans[20:22] == ["allgather", "sharded"]  # refresh: each mode once more
    assert plans[22:] == ["sharded"] * 8
    # this rank's own figures: lower median of the last `window` times, in microseconds
    for t in (4e-3, 1e-3, 2e-3, 9e-3):
        mc.record("h", "sharded", t)
    assert mc.header_fields("h") == [4, -1, 2000, -1]
    assert pickle.loads(pickle.dumps(mc))._groups == {}  # measurements are not saved
    # The margin: sharded must be 10 % faster than allgather (the first mode) to be taken.
    for us, expect in (({"allgather": 1000, "sharded": 950}, "allgather"),
                       ({"allgather": 1000, "sharded": 850}, "sharded")):
        mc = MeasuredCost(trials=1, refresh=20)
        mc.observe("g", _headers(1, 5, [us]))
        assert mc.plan("g") == expect, us


@pytest.mark.parametrize("kw, match", [(dict(modes=("ring",)), "modes"), (dict(modes=()), "modes"),
                                       (dict(trials=0), "trials"), (dict(refresh=4), "refresh"),
                                       (dict(margin=1.0), "margin")])
def test_measured_cost_rejects_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        MeasuredCost(**kw)


def test_measured_auto_is_bit_identical_to_the_planned_fixed_mode():
    """The default auto plans allgather, then sharded, before compressing (no split payloads
    for allgather), and each exchange equals the fixed mode it planned; every rank plans the
    same (else the headers' piece counts would disagree and raise)."""
    names = list(SHAPES)
    auto = make_states(3, "auto", min_numel=0)
    assert isinstance(auto[0].cost_model, MeasuredCost)
    ref = make_states(3, "allgather", min_numel=0)
    modes = []
    for step in range(9):
        choice = None
        a = exchange_all(auto, grads(3, step), names)
        (choice,) = auto[0].stats()["last_choice"].values()
        modes.append(choice["mode"])
        for s in ref:
            s.exchange = choice["mode"]
        f = exchange_all(ref, grads(3, step), names)
        for r in range(3):
            for x, y in zip(a[r], f[r]):
                assert torch.equal(x, y)
        assert "measured" in choice["reason"]
    trials = auto[0].cost_model.trials
    assert modes[:2 * trials] == ["allgather"] * trials + ["sharded"] * trials
    assert set(modes[2 * trials:]) <= {"allgather", "sharded"}
    st = auto[0].stats()["exchanges"]
    assert st["allgather"] + st["sharded"] == 9


def test_measured_auto_with_dense_mode_keeps_residues():
    """With "dense" among the modes, a dense exchange is a plain average that compresses
    nothing and leaves every residue as it was."""
    names = list(SHAPES)
    states = make_states(2, "auto", min_numel=0, cost_model=None)
    for s in states:
        s.cost_model = MeasuredCost(modes=("dense", "allgather"), trials=1, refresh=10)
    gs = grads(2, 0)
    outs = exchange_all(states, gs, names)
    (choice,) = states[0].stats()["last_choice"].values()
    assert choice["mode"] == "dense"
    for i, n in enumerate(names):
        torch.testing.assert_close(outs[0][i], (gs[0][i] + gs[1][i]) / 2)
        assert n not in states[0].compressor.state_dict()["residues"] or \
            states[0].compressor.residue(n).abs().sum() == 0
    exchange_all(states, grads(2, 1), names)
    (choice,) = states[0].stats()["last_choice"].values()
    assert choice["mode"] == "allgather"


@pytest.mark.parametrize("world", [2, 3])
def test_small_dense_tensors_ride_in_the_payload_allgather(world, monkeypatch):
    """Tensors sent dense by rule (here the bias) travel at the head of the payload
    all-gather when they are small: no allreduce is issued, and every rank gets the rank-order
    sum divided by W, bit for bit. Over the size limit they go back to the allreduce."""
    calls = []
    real = Loopback.allreduce_sum

    def counting(self, flat):
        calls.append(flat.numel())
        return real(self, flat)

    monkeypatch.setattr(Loopback, "allreduce_sum", counting)
    names = list(SHAPES)
    states = make_states(world, "allgather", min_numel=64)
    gs = grads(world, 0)
    outs = exchange_all(states, gs, names)
    b = names.index("bias")
    want = gs[0][b].clone()
    for r in range(1, world):
        want += gs[r][b]
    want /= world
    for r in range(world):
        assert torch.equal(outs[r][b], want)
    assert calls == []  # the bias rode in the all-gather
    # Dense bytes (fc and bias, 10.4 kB) above the limit and above the payloads: an allreduce.
    monkeypatch.setattr("adacomp.parallel.exchange.MERGE_DENSE_BYTES", 0)
    states = make_states(world, "allgather", min_numel=64, bin_size={"fc": None})
    exchange_all(states, grads(world, 1), names)
    assert calls == [40 * 64 + 40] * world


def test_slot_capacity_plans_from_the_largest_recent_payload():
    slots = SlotCapacity(margin=0.125, history=2)
    assert slots.plan("g") is None  # first exchange: two rounds
    slots.update("g", 1000, rule_bytes=400)
    assert slots.plan("g") == SlotPlan(1152 + 400, True)  # ceil(1125 / 64) * 64, then the dense bytes
    slots.update("g", 100, rule_bytes=400)
    assert slots.plan("g") == SlotPlan(1152 + 400, True)  # the larger of the last 2
    slots.update("g", 100, rule_bytes=400)
    assert slots.plan("g") == SlotPlan(128 + 400, True)
    slots.update("g", 100, rule_bytes=1 << 20)  # too many dense bytes: their own allreduce
    assert slots.plan("g") == SlotPlan(128, False)
    slots.update("g", 900, 400, next_allgather=False)  # e.g. a sharded exchange next
    assert slots.plan("g") is None
    slots.update("g", 100, 400)  # back to the all-gather: the sizes seen meanwhile count
    assert slots.plan("g") == SlotPlan(1024 + 400, True)
    for bad in (dict(margin=-0.1), dict(margin=float("nan")), dict(history=0), dict(history=1.5)):
        with pytest.raises(ValueError, match="SlotCapacity"):
            SlotCapacity(**bad)


def _slot_exchange_all(states, grads_per_rank, names, slots):
    """One exchange on every rank (threads) the way the DDP hook runs the one-round
    exchange: slots, decisions, tails on overflow, dense allreduce, decoding."""
    world = len(states)

    def work(r, tr):
        outputs = [torch.empty_like(g) for g in grads_per_rank[r]]
        key = tuple(names)
        ex = states[r].group_exchange(names, grads_per_rank[r], world, r, outputs=outputs,
                                      slot=slots[r].plan(key))
        if ex.slot_plan is None:
            run_exchange(ex, tr, states[r].traffic)
        else:
            gathered = torch.stack(tr._share(ex.slot_buffer()))
            ex.decide(ex.meta_of_slots(gathered))
            tails = torch.stack(tr._share(ex.tail_buffer())) if max(ex.tail_sizes()) else None
            dense = ex.dense_buffer()
            dense = tr.allreduce_sum(dense) if dense is not None else None
            ex.account(states[r].traffic)
            ex.finish(ex.slot_rows(gathered, tails), dense)
        slots[r].update(key, *ex.slot_need())
        states[r].end_step()
        return outputs

    return on_every_rank(world, work)


#: bins of 1 with fp32 values for "tiny": its payload is larger than the tensor (dense fallback)
FALLBACK = dict(min_numel=64, values="fp32", bin_size={"tiny": 1})


def case_grads(world, step, names, zero_at, bad_at, bad=float("nan")):
    """:func:`grads`, with "conv" zero on every rank at step ``zero_at`` and a non-finite
    value ``bad`` in the last rank's "fc" at step ``bad_at``."""
    gs = grads(world, step)
    if step == zero_at:
        for r in range(world):
            gs[r][names.index("conv")].zero_()
    if step == bad_at:
        gs[world - 1][names.index("fc")][0, 0] = bad
    return gs


def assert_same_exchange(got, want, states, ref_states, names, step):
    """Outputs bit for bit, residues and decisions equal, rank by rank."""
    for r in range(len(states)):
        for i, n in enumerate(names):
            bits = [x[r][i].view(-1).view(torch.int32) for x in (got, want)]
            assert torch.equal(*bits), (step, r, n)
        for n in states[r].compressor.names():
            same = torch.equal(states[r].compressor.residue(n), ref_states[r].compressor.residue(n))
            assert same, (step, r, n)
    assert states[0].stats()["decisions"] == ref_states[0].stats()["decisions"]


@pytest.mark.parametrize("world", [2, 3])
def test_one_round_slots_equal_two_rounds_in_every_case(world):
    """The one-round slot exchange against the two-round one, step by step and bit for bit
    (outputs, residues, traffic counted as compressed): a tensor that falls back to dense
    (bins of 1 with fp32 values: payload larger than the tensor), one that is zero on every
    rank, a non-finite step, and slots too small for anything (every byte in the tails)."""
    names = list(SHAPES)
    one, two = make_states(world, "allgather", **FALLBACK), make_states(world, "allgather", **FALLBACK)
    slots = [SlotCapacity() for _ in range(world)]
    seen = []
    for step in range(6):
        gs = case_grads(world, step, names, zero_at=2, bad_at=3)
        if step == 4:
            for s in slots:  # nothing fits: every byte goes in the second all-gather
                for g in s._groups.values():
                    g["plan"] = SlotPlan(0, g["plan"].merge_dense)
        got = _slot_exchange_all(one, [[g.clone() for g in gg] for gg in gs], names, slots)
        want = exchange_all(two, [[g.clone() for g in gg] for gg in gs], names)
        assert_same_exchange(got, want, one, two, names, step)
        last = one[0].stats()["last_step"]
        assert {k: last[k]["dense_bytes"] for k in last} == \
            {k: v["dense_bytes"] for k, v in two[0].stats()["last_step"].items()}
        seen.append(dict(one[0].stats()["slots"]))
    assert one[0].stats()["decisions"]["tiny"] == "dense-fallback"
    assert seen[0] == {"one_round": 0, "overflow": 0}  # the first exchange has no slot size yet
    assert seen[-1]["one_round"] == 5 and seen[4]["overflow"] == seen[3]["overflow"] + 1


def test_one_round_setting_is_checked():
    from adacomp import AdaCompState

    custom = SlotCapacity(margin=0.0, history=1)
    assert AdaCompState(named_parameters=[], one_round=custom)._slots is custom
    assert not AdaCompState(named_parameters=[], one_round=False).one_round
    with pytest.raises(TypeError, match="one_round must be a bool or a SlotCapacity"):
        AdaCompState(named_parameters=[], one_round="yes")


class OneGather(Loopback):
    """A transport whose all-gather takes a different length per rank (as Horovod's): one
    round for :meth:`allgather_bytes`. Counts the collective rounds."""

    rounds = 0

    def _share(self, obj):
        if self.rank == 0:
            type(self).rounds += 1
        return super()._share(obj)

    def allgather_bytes(self, own):
        # views into one buffer at odd offsets, as a real concatenation gives them
        got = self._share(own.clone())
        cat = torch.cat([torch.zeros(3, dtype=torch.uint8)] + got)
        rows, pos = [], 3
        for g in got:
            rows.append(cat[pos:pos + g.numel()])
            pos += g.numel()
        return rows


@pytest.mark.parametrize("world", [2, 3])
def test_inband_exchange_is_one_round_and_the_same_result(world, monkeypatch):
    """ExchangeState.run (Horovod, mpi4py) sends an all-gather exchange's payloads with the
    meta vectors, unpadded: one collective where the transport gathers any length, the
    same outputs, residues and decisions as sizes-then-payloads, bit for bit, through a
    dense fallback, an all-zero tensor and a non-finite step."""
    names = list(SHAPES)
    inband, two = make_states(world, "allgather", **FALLBACK), make_states(world, "allgather", **FALLBACK)
    for step in range(4):
        gs = case_grads(world, step, names, zero_at=1, bad_at=2, bad=float("inf"))
        OneGather.rounds = 0

        def work(r, tr, gs=gs):
            out = [torch.empty_like(g) for g in gs[r]]
            inband[r].run(names, [g.clone() for g in gs[r]], OneGather(tr.hub, r), outputs=out)
            return out

        got = on_every_rank(world, work)
        # the payloads and the bias came with the meta; the fallback tensor is summed
        assert OneGather.rounds == 2, OneGather.rounds
        want = exchange_all(two, [[g.clone() for g in gg] for gg in gs], names)
        assert_same_exchange(got, want, inband, two, names, step)
        assert inband[0].stats()["slots"]["one_round"] == step + 1
    assert inband[0].stats()["decisions"]["tiny"] == "dense-fallback"
    # no padding: each rank hands over exactly its own bytes
    last_in, last_two = inband[0].stats()["last_step"]["all"], two[0].stats()["last_step"]["all"]
    assert last_in["wire_bytes"] <= last_two["wire_bytes"]


def test_inband_local_error_reaches_every_rank():
    """A rank that fails before an in-band exchange still sends its (failed) header in the
    same all-gather: it raises its own error, the others ConfigMismatchError."""
    names = list(SHAPES)
    states = make_states(2, "allgather", min_numel=64)
    gs = grads(2, 0)
    errors = [None, None]

    def work(r, tr):
        g = [x.clone() for x in gs[r]]
        if r == 1:
            g[0] = g[0].to(torch.int32)  # not floating point: a local error
        try:
            states[r].run(names, g, OneGather(tr.hub, r))
        except Exception as exc:  # noqa: BLE001 - both ranks must raise
            errors[r] = exc

    on_every_rank(2, work)
    assert "floating" in str(errors[1]), errors[1]
    assert type(errors[0]).__name__ == "ConfigMismatchError" and "failed before" in str(errors[0])
