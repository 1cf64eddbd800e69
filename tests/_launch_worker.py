"""Worker for the Horovod and mpi4py tests, started by a real launcher:

    mpiexec -n N python tests/_launch_worker.py OUT mpi KIND CFG STEPS [OPTS]
    mpiexec -n N python tests/_launch_worker.py OUT ddp-from-mpi KIND CFG STEPS
    horovodrun -np N --gloo python tests/_launch_worker.py OUT horovod KIND CFG STEPS [OPTS]
    mpiexec / horovodrun ... OUT invariant-mpi|invariant-horovod - {} 0 [OPTS]

``mpi``: the training of tests/_ddp_scenarios.train through adacomp.parallel.mpi.Communicator;
``horovod``: through adacomp.parallel.horovod.DistributedOptimizer; ``ddp-from-mpi``: torch.distributed
initialised from MPI (adacomp.parallel.mpi.init_torch_distributed) running the DDP hook. Each rank
saves its result to OUT/rank<r>.pt.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tests import _ddp_scenarios as sc  # noqa: E402


class MpiPath:
    def __init__(self, cfg):
        from mpi4py import MPI

        from adacomp.parallel.mpi import Communicator

        self.rank, self.world = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
        self.comm = Communicator(start_iter=cfg.get("start_iter", 0),
                                 exchange=cfg.get("exchange", "allgather"), **sc.comp_settings(cfg))

    def wrap(self, model, opt):
        self.model = model
        return opt

    def synchronize(self, opt):
        named = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]
        avg = self.comm.allreduce([n for n, _ in named], [p.grad for _, p in named])
        for (_, p), a in zip(named, avg):
            p.grad.copy_(a)

    def step(self, opt, finite):
        if finite:
            opt.step()

    def residues(self):
        c = self.comm.compressor
        return {n: c.residue(n).clone() for n in c.names()}

    def state(self, opt):
        return self.comm.state_dict()

    def load(self, opt, state):
        self.comm.load_state_dict(state)

    def stats(self, opt):
        return self.comm.stats()


class HorovodPath:
    def __init__(self, cfg):
        import horovod.torch as hvd

        hvd.init()
        self.hvd, self.cfg = hvd, cfg
        self.rank, self.world = hvd.rank(), hvd.size()

    def wrap(self, model, opt):
        import adacomp.parallel.horovod

        opt = adacomp.parallel.horovod.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                                   start_iter=self.cfg.get("start_iter", 0),
                                                   exchange=self.cfg.get("exchange", "allgather"),
                                                   **sc.comp_settings(self.cfg))
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        self.hvd.broadcast_optimizer_state(opt, root_rank=0)
        self.opt = opt
        return opt

    def synchronize(self, opt):
        opt.synchronize()

    def step(self, opt, finite):
        if finite:
            with opt.skip_synchronize():
                opt.step()

    def residues(self):
        c = self.opt.compressor
        return {n: c.residue(n).clone() for n in c.names()}

    def state(self, opt):
        return opt.state_dict()

    def load(self, opt, state):
        opt.load_state_dict(state)

    def stats(self, opt):
        return opt.stats()


def train_path(path, kind, cfg, steps, resume=None, save_at=None, bad_step=None):
    """The loop of tests/_ddp_scenarios.train over an explicit exchange ``path``."""
    torch.set_num_threads(1)
    rank, world = path.rank, path.world
    model = sc.make_model(kind)
    opt = path.wrap(model, torch.optim.SGD(model.parameters(), lr=sc.LR))
    first = 0
    if resume:
        ck = torch.load(resume, weights_only=False)[rank]
        model.load_state_dict(ck["model"])
        path.load(opt, ck["hook"])
        first = ck["step"]
    digests, saved, history = [], None, []
    accum = cfg.get("accumulate", 1)
    for step in range(first, steps):
        opt.zero_grad()
        for micro in range(accum):
            x, y = sc.batch(kind, rank, world, step * accum + micro)
            loss = sc.loss_of(kind, model, x, y)
            if bad_step == step and rank == 1:
                loss = loss * float("inf")
            loss.backward()
        res_before = path.residues()
        path.synchronize(opt)
        finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        before = sc.params(model)
        path.step(opt, finite)
        history.append({"finite": finite, "res_before": res_before, "res_after": path.residues(),
                        "moved": any(not torch.equal(before[n], p) for n, p in model.named_parameters())})
        digests.append(sc.digest(model))
        if save_at is not None and step + 1 == save_at:
            saved = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                     "hook": path.state(opt), "step": step + 1}
    return {"digests": digests, "params": sc.params(model), "stats": path.stats(opt), "saved": saved,
            "history": history}


def errors(kind):
    """Errors that must reach every rank: rank 1 exchanges fewer tensors, then rank 1 sends
    a bad (integer) tensor, then a normal exchange still works."""
    from adacomp.parallel.exchange import PlainExchangeState

    torch.set_num_threads(1)
    rank_world = None
    if kind == "horovod":
        import horovod.torch as hvd

        from adacomp.parallel.horovod import HorovodTransport

        hvd.init()
        rank_world = hvd.rank(), hvd.size()
        import adacomp

        state = PlainExchangeState(adacomp.AdaComp(min_numel=0), "allgather",
                                   world=hvd.size(), rank=hvd.rank())

        def exchange(names, tensors, tag):
            outs = [torch.empty_like(t) for t in tensors]
            state.run(names, tensors, HorovodTransport(hvd, tag), outputs=outs)
            return outs
    else:
        from mpi4py import MPI

        from adacomp.parallel.mpi import Communicator

        rank_world = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
        comm = Communicator(min_numel=0, exchange="allgather")

        def exchange(names, tensors, tag):
            return comm.allreduce(names, tensors)
    rank, _ = rank_world
    g = torch.Generator().manual_seed(rank)
    names = ["a", "b", "c"]
    tensors = [torch.randn(64, 64, generator=g) for _ in names]
    out = {}

    def attempt(key, fn):
        try:
            fn()
            out[key] = "ok"
        except Exception as exc:  # noqa: BLE001 - the message is what is tested
            out[key] = f"{type(exc).__name__}: {exc}"

    n = 2 if rank == 1 else 3
    attempt("fewer", lambda: exchange(names[:n], tensors[:n], "fewer"))
    bad = [t.to(torch.int64) if rank == 1 else t for t in tensors]
    attempt("bad_input", lambda: exchange(names, bad, "bad"))
    attempt("after", lambda: exchange(names, tensors, "after"))
    return rank, out


def main():
    out, mode, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    cfg, steps = json.loads(sys.argv[4]), int(sys.argv[5])
    opts = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
    if mode == "mpi":
        path = MpiPath(cfg)
        rank = path.rank
        result = train_path(path, kind, cfg, steps, **opts)
    elif mode == "horovod":
        path = HorovodPath(cfg)
        rank = path.rank
        result = train_path(path, kind, cfg, steps, **opts)
    elif mode in ("errors-mpi", "errors-horovod"):
        rank, result = errors(mode.split("-")[1])
    elif mode in ("invariant-mpi", "invariant-horovod"):
        from tests import _invariant

        torch.set_num_threads(1)
        path = _invariant.SyncPath(mode.split("-")[1])
        rank = path.rank
        result = _invariant.run_all(path, rank, path.world, **opts)
    elif mode == "ddp-from-mpi":
        import torch.distributed as dist

        from adacomp.parallel.mpi import init_torch_distributed

        torch.set_num_threads(1)
        rank, world = init_torch_distributed("gloo")
        result = sc.train(rank, world, kind, cfg, steps)
        dist.barrier()
        dist.destroy_process_group()
    else:
        raise SystemExit(f"unknown mode {mode}")
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
