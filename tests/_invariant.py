"""The lossless error-feedback harness, run inside real training (docs/algorithm.md,
contracts), for the DDP hook, the Horovod wrapper and the mpi4py path.

With plain SGD at learning rate ``LR``, summed over the steps the optimizer applied::

    sum_t mean_r g_{r,t}  ==  -(theta_T - theta_0) / LR  +  mean_r R_r  +  sum_r O_r

where ``g_{r,t}`` is rank ``r``'s local (unscaled) gradient, ``R_r`` its residues (in
unscaled units) and ``O_r`` its owner residues of the sharded exchange, put at their shard's
place. Every rank returns its side of the sums; :func:`check` adds them up in the test
process. Scenarios (each a kind of fault of issue 14, all in one run of the processes):

* ``plain``: nothing special;
* ``skip``: rank 1's linear weight gradient gets an Inf at step ``BAD_STEP``; every rank
  skips that optimizer step (as ``GradScaler`` does): no residue of that step may change;
* ``unused``: a branch that every rank skips on even steps (DDP: ``find_unused_parameters``;
  Horovod and mpi4py: ``zero_grad(set_to_none=False)``, so the branch's gradient is zero on
  every rank): its residue must stay;
* ``scaler``: ``torch.amp.GradScaler`` with its scale doubling every 2 steps and backing off
  at the Inf of step ``BAD_STEP``: residues must follow the scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LR = 0.1
STEPS = 10
BAD_STEP = 5
BATCH = 16
SCENARIOS = ("plain", "skip", "unused", "scaler")
MODES = ("allgather", "sharded", "auto")
CFG = {"bin_size": None, "min_numel": 256}


class InvNet(nn.Module):
    """A conv (4,608-element weight), a linear layer, and a linear branch used on odd steps."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(512, 10)
        self.branch = nn.Linear(512, 10)

    def forward(self, x, use_branch=True):
        h = F.avg_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2).flatten(1)
        out = self.fc(h)
        return out + self.branch(h) if use_branch else out


_DATA = {}


def batch(rank, world, step):
    if "x" not in _DATA:
        from adacomp.workloads import data

        d = data.load("digits", split="train")
        _DATA["x"], _DATA["y"] = d.x, d.y
    n = _DATA["x"].shape[0]
    start = ((step * world + rank) * BATCH) % (n - BATCH)
    return _DATA["x"][start:start + BATCH], _DATA["y"][start:start + BATCH]


def make_model():
    torch.manual_seed(7)
    return InvNet()


def uses_branch(scenario, step):
    return scenario != "unused" or step % 2 == 1


def inject(scenario, rank, step):
    return scenario in ("skip", "scaler") and rank == 1 and step == BAD_STEP


def run_all(path, rank, world, steps=STEPS, scenarios=SCENARIOS, modes=MODES):
    """Every scenario in every exchange mode over ``path``; returns ``{(scenario, mode):
    this rank's sums}``."""
    out = {}
    for scenario in scenarios:
        for mode in modes:
            out[(scenario, mode)] = run_one(path, rank, world, scenario, mode, steps)
    return out


def run_one(path, rank, world, scenario, mode, steps):
    model = make_model()
    scaler = None
    if scenario == "scaler":
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    runner = path.wrap(model, opt, dict(CFG, exchange=mode), scaler=scaler,
                       find_unused=scenario == "unused")
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    grad_sum = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    captured = {}

    def capture(name, step):
        def hook(g):
            captured[name] = captured.get(name, 0) + g.detach().clone()
            if name == "fc.weight" and inject(scenario, rank, step):
                g = g.clone()
                g[0, 0] = float("inf")
            return g
        return hook

    skipped = []
    for step in range(steps):
        captured.clear()
        handles = [p.register_hook(capture(n, step)) for n, p in model.named_parameters()]
        runner.zero_grad()
        x, y = batch(rank, world, step)
        loss = F.cross_entropy(runner.forward(x, use_branch=uses_branch(scenario, step)), y)
        scale = scaler.get_scale() if scaler is not None else 1.0
        (scaler.scale(loss) if scaler is not None else loss).backward()
        for h in handles:
            h.remove()
        runner.exchange()
        finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        if scaler is not None:
            runner.step(lambda: scaler.step(opt))
            scaler.update()
        elif finite:
            runner.step(opt.step)
        if finite:
            for n in grad_sum:
                if n in captured:
                    grad_sum[n] += captured[n] / scale
        else:
            skipped.append(step)
    res_scale = runner.residue_scale() or 1.0
    comp = runner.compressor()
    residues = {n: (comp.residue(n).clone() / res_scale if n in comp.names() else torch.zeros_like(p))
                for n, p in model.named_parameters()}
    owner = runner.owner()
    owner_res = {k: owner.residue(k).clone() / res_scale for k in owner.names()} if owner is not None else {}
    return {"grad_sum": grad_sum, "residues": residues, "owner": owner_res, "skipped": skipped,
            "delta": {n: p.detach() - theta0[n] for n, p in model.named_parameters()},
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "scale": scaler.get_scale() if scaler is not None else None}


def check(per_rank: list[dict], where: str, rtol: float = 2e-5) -> dict:
    """Assert the invariant for every scenario and mode from every rank's sums; returns the
    largest relative error per case."""
    from adacomp.parallel.exchange import parse_owner_key

    world = len(per_rank)
    worst = {}
    for case in per_rank[0]:
        ranks = [r[case] for r in per_rank]
        for r in ranks[1:]:
            assert r["skipped"] == ranks[0]["skipped"], (where, case, "ranks skipped different steps")
            for n, p in r["params"].items():
                assert torch.equal(p, ranks[0]["params"][n]), (where, case, n, "ranks diverged")
        if case[0] in ("skip", "scaler"):
            assert ranks[0]["skipped"] == [BAD_STEP], (where, case, ranks[0]["skipped"])
        else:
            assert ranks[0]["skipped"] == [], (where, case, ranks[0]["skipped"])
        owner = {}
        for r in ranks:
            for key, v in r["owner"].items():
                name, start, end = parse_owner_key(key)
                full = owner.setdefault(name, torch.zeros(ranks[0]["params"][name].numel()))
                full[start:end] += v.reshape(-1)
        err = 0.0
        for n in ranks[0]["params"]:
            lhs = sum(r["grad_sum"][n].double() for r in ranks) / world
            rhs = (-ranks[0]["delta"][n].double() / LR
                   + sum(r["residues"][n].double() for r in ranks) / world)
            if n in owner:
                rhs = rhs + owner[n].double().view_as(rhs)
            scale = float(lhs.abs().max()) + 1e-6
            e = float((lhs - rhs).abs().max()) / scale
            err = max(err, e)
            assert e < rtol, (f"{where} {case}: gradient mass of {n} not conserved: max error "
                              f"{e:.3g} of the largest summed gradient element "
                              f"({int(((lhs - rhs).abs() > rtol * scale).sum())} of {lhs.numel()} "
                              "elements off)")
        worst[case] = err
    return worst


# ------------------------------------------------------------------------------ paths

class DDPPath:
    """The DDP hook (torch.distributed already initialised)."""

    def wrap(self, model, opt, cfg, scaler=None, find_unused=False):
        return _DDPRunner(model, opt, cfg, scaler, find_unused)


class _Runner:
    """What the harness reads from any integration's state."""

    def compressor(self):
        return self.state.compressor

    def owner(self):
        return self.state.owner

    def residue_scale(self):
        return self.state.residue_scale


class _DDPRunner(_Runner):
    def __init__(self, model, opt, cfg, scaler, find_unused):
        from torch.nn.parallel import DistributedDataParallel as DDP

        import adacomp

        self.model, self.opt = model, opt
        self.ddp = DDP(model, bucket_cap_mb=0.005, find_unused_parameters=find_unused)
        self.state = adacomp.AdaCompState(model=self.ddp, log_every=0, scaler=scaler,
                                          **{k: v for k, v in cfg.items()})
        self.ddp.register_comm_hook(self.state, adacomp.adacomp_hook)

    def zero_grad(self):
        self.opt.zero_grad()

    def forward(self, x, use_branch):
        return self.ddp(x, use_branch=use_branch)

    def exchange(self):
        pass  # the hook ran in backward()

    def step(self, fn):
        fn()


class SyncPath:
    """Horovod (``"horovod"``) or mpi4py (``"mpi"``), started by their launchers."""

    def __init__(self, kind):
        self.kind = kind
        if kind == "horovod":
            import horovod.torch as hvd

            hvd.init()
            self.hvd = hvd
            self.rank, self.world = hvd.rank(), hvd.size()
        else:
            from mpi4py import MPI

            self.rank, self.world = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()

    def wrap(self, model, opt, cfg, scaler=None, find_unused=False):
        return _SyncRunner(self, model, opt, cfg, scaler)


class _SyncRunner(_Runner):
    def __init__(self, path, model, opt, cfg, scaler):
        self.path, self.model = path, model
        if path.kind == "horovod":
            import adacomp.parallel.horovod

            self.opt = adacomp.parallel.horovod.DistributedOptimizer(
                opt, named_parameters=model.named_parameters(), scaler=scaler, **cfg)
            path.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
            self.state = self.opt._adacomp_state
        else:
            from adacomp.parallel.mpi import Communicator

            self.opt = opt
            self.state = Communicator(scaler=scaler, **cfg)

    def zero_grad(self):
        # set_to_none=False: the unused branch's gradient is zero on every rank, not None
        self.opt.zero_grad(set_to_none=False)

    def forward(self, x, use_branch):
        return self.model(x, use_branch=use_branch)

    def exchange(self):
        if self.path.kind == "horovod":
            self.opt.synchronize()
        else:
            named = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]
            avg = self.state.allreduce([n for n, _ in named], [p.grad for _, p in named])
            for (_, p), a in zip(named, avg):
                p.grad.copy_(a)

    def step(self, fn):
        if self.path.kind == "horovod":
            with self.opt.skip_synchronize():
                fn()
        else:
            fn()


def ddp_worker(rank, world, scenarios=SCENARIOS, modes=MODES):
    """Entry point for tests/_dist.run."""
    torch.set_num_threads(1)
    return run_all(DDPPath(), rank, world, scenarios=scenarios, modes=modes)
