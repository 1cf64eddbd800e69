"""AdaComp for Horovod: a ``DistributedOptimizer`` shaped like ``horovod.torch``'s.

Horovod's ``compression=`` interface cannot carry a sparse payload (it allreduces whatever
it is given), so this wrapper does not use it: it compresses each gradient with the AdaComp
core and exchanges the payloads with ``hvd.allgather``, which accepts a different length
on every rank, so no padding and no patched Horovod are needed (``exchange="sharded"`` adds
``hvd.alltoall``)::

    import horovod.torch as hvd
    import adacomp.parallel.horovod

    hvd.init()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = adacomp.parallel.horovod.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)

The protocol is :mod:`adacomp.parallel.exchange`'s, the same as the DDP hook and the mpi4py path:
the sizes and, in the all-gather exchange, the payloads with them in one ``hvd.allgather``
(the sharded exchange's rounds follow it), and the dense tensors in one allreduce (summed),
decoded in rank order and divided by the world size.
"""

from __future__ import annotations

import contextlib

import torch

from ..compressor import DEFAULT_MIN_NUMEL, AdaComp
from .exchange import CostModel, PlainExchangeState, Transport


def _hvd():
    try:
        import horovod.torch as hvd
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("adacomp.parallel.horovod needs Horovod built with PyTorch support: run "
                          "make distributed (or launch/install_horovod.sh)") from exc
    return hvd


class HorovodTransport(Transport):
    """:class:`adacomp.parallel.exchange.Transport` over Horovod's collectives (each named by the
    exchange counter, as Horovod matches operations across ranks by name)."""

    def __init__(self, hvd, tag: str):
        self.hvd = hvd
        self.world, self.rank = hvd.size(), hvd.rank()
        self.tag = tag
        self.n = 0

    def _name(self, what):
        self.n += 1
        return f"adacomp.{what}.{self.tag}.{self.n}"

    def allgather_int64(self, t):
        return self.hvd.allgather(t.unsqueeze(0), name=self._name("meta"))

    def allgatherv(self, own, sizes):
        # Horovod's allgather takes a different first dimension on every rank: no padding.
        return list(torch.split(self.hvd.allgather(own, name=self._name("payload")), list(sizes)))

    def allgather_bytes(self, own):
        # One hvd.allgather (it takes a different length on every rank); each rank's bytes
        # go behind their length (8 bytes), so that the concatenation can be split.
        own = own.reshape(-1)
        head = torch.tensor([own.numel()], dtype=torch.int64).view(torch.uint8).to(own.device)
        cat = self.hvd.allgather(torch.cat([head, own]), name=self._name("slots"))
        lengths, rows, pos = cat.cpu(), [], 0
        for _ in range(self.world):
            n = int(lengths[pos:pos + 8].clone().view(torch.int64)[0])
            rows.append(cat[pos + 8:pos + 8 + n])
            pos += 8 + n
        if pos != cat.numel():
            raise RuntimeError(f"adacomp: Horovod's allgather returned {cat.numel()} bytes, the "
                               f"ranks' lengths add up to {pos}")
        return rows

    def alltoallv(self, parts, recv_sizes):
        splits = torch.tensor([p.numel() for p in parts], dtype=torch.int32)
        recv, _ = self.hvd.alltoall(torch.cat(parts), splits=splits, name=self._name("shards"))
        return list(torch.split(recv, list(recv_sizes)))

    def allreduce_sum(self, flat):
        return self.hvd.allreduce(flat, op=self.hvd.Sum, name=self._name("dense"))


class _AdaCompOptimizerMixin:
    """Methods mixed into a subclass of the user's optimizer class (as Horovod does)."""

    def _adacomp_init(self, named_parameters, backward_passes_per_step, compressor, start_iter,
                      prefix, exchange, cost_model, scaler=None):
        params = [p for group in self.param_groups for p in group["params"]]
        if named_parameters is not None:
            named = list(named_parameters)
        else:
            named = [(f"param.{i}", p) for i, p in enumerate(params)]
        names = {}
        for name, p in named:
            if id(p) in names:
                raise ValueError(f"parameter {name!r} is given twice in named_parameters")
            names[id(p)] = prefix + name
        missing = [i for i, p in enumerate(params) if id(p) not in names]
        if missing:
            raise ValueError(f"named_parameters does not name {len(missing)} of the optimizer's "
                             "parameters; pass model.named_parameters() for the model being optimized")
        if len(set(names.values())) != len(names):
            raise ValueError("named_parameters contains duplicate names")
        if backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
        self._adacomp_names = names
        hvd = _hvd()
        self._adacomp_state = PlainExchangeState(compressor, exchange, cost_model, scaler=scaler,
                                                 world=hvd.size(), rank=hvd.rank())
        self.backward_passes_per_step = backward_passes_per_step
        self._adacomp_start_iter = start_iter
        self._adacomp_synchronized = False
        self._adacomp_skip_sync = False

    # -- Horovod's interface -------------------------------------------------------------
    def synchronize(self) -> None:
        """Average every gradient over the ranks with AdaComp (once per step)."""
        if self._adacomp_synchronized:
            return
        hvd = _hvd()
        named = [(self._adacomp_names[id(p)], p) for group in self.param_groups
                 for p in group["params"] if p.grad is not None]
        names = [n for n, _ in named]
        grads = [p.grad for _, p in named]
        world = hvd.size()
        state = self._adacomp_state
        if state.iter < self._adacomp_start_iter:
            state.begin_step()
            self._dense_average(grads, world)
            state.end_step()
        else:
            state.run(names, grads, HorovodTransport(hvd, str(state.iter)))
        self._adacomp_synchronized = True

    def _dense_average(self, grads, world):
        hvd = _hvd()
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        total = hvd.allreduce(flat, op=hvd.Sum, name=f"adacomp.warmup.{self._adacomp_state.iter}").div_(world)
        pos = 0
        for g in grads:
            g.copy_(total[pos:pos + g.numel()].view(g.shape))
            pos += g.numel()
            self._adacomp_state.traffic.add("dense", g.numel() * 4, g.numel() * g.element_size())

    @contextlib.contextmanager
    def skip_synchronize(self):
        """``step()`` inside this context does not synchronize (call ``synchronize()`` first),
        for example to clip the averaged gradients in between."""
        self._adacomp_skip_sync = True
        try:
            yield
        finally:
            self._adacomp_skip_sync = False

    def step(self, closure=None):
        if not self._adacomp_skip_sync:
            self.synchronize()
        elif not self._adacomp_synchronized:
            raise RuntimeError("step() inside skip_synchronize() needs synchronize() to have been "
                               "called first in this step")
        self._adacomp_synchronized = False
        return super(self.__class__, self).step(closure)

    def zero_grad(self, set_to_none: bool = True):
        # A step skipped after synchronize() (GradScaler on overflow) ends here.
        self._adacomp_synchronized = False
        return super(self.__class__, self).zero_grad(set_to_none=set_to_none)

    # -- statistics and checkpoints --------------------------------------------------------
    def stats(self) -> dict:
        return self._adacomp_state.stats()

    @property
    def compressor(self) -> AdaComp:
        """The AdaComp compressor of this rank (residues)."""
        return self._adacomp_state.compressor

    def state_dict(self):
        sd = super(self.__class__, self).state_dict()
        sd["adacomp"] = self._adacomp_state.state_dict()
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("adacomp", None)
        super(self.__class__, self).load_state_dict(state_dict)
        if extra is not None:
            self._adacomp_state.load_state_dict(extra)


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters=None, *,
                         backward_passes_per_step: int = 1, bin_size=None, scale: str = "binmax_mean",
                         values: str = "ternary", min_numel: int = DEFAULT_MIN_NUMEL,
                         start_iter: int = 0, exchange: str = "auto", cost_model: CostModel | None = None,
                         device=None, prefix: str = "", scaler=None):
    """Wrap ``optimizer`` so that ``step()`` first averages the gradients with AdaComp.

    Like ``horovod.torch.DistributedOptimizer`` the result is an instance of a subclass of
    the optimizer's own class (``isinstance(opt, torch.optim.SGD)`` holds), built over the
    same parameter groups. ``backward_passes_per_step``: gradients of that many backward
    passes accumulate (autograd sums them) before the one exchange in ``step()``.
    Parameters whose ``.grad`` is ``None`` in a step are left out of that step's exchange
    (all ranks must agree on which; a mismatch raises on every rank).
    ``exchange`` / ``cost_model``: how payloads travel, as for the DDP hook
    (:mod:`adacomp.parallel.exchange`; sharded mode uses ``hvd.alltoall``).
    ``scaler``: the ``torch.amp.GradScaler`` scaling the loss, if any (residues follow its
    scale). A step is atomic: when any rank has a NaN/Inf in any gradient, every rank's
    output for that tensor is NaN (``GradScaler`` skips the step) and no residue changes.
    ``state_dict()`` includes this rank's residues (and owner residues) under the key
    ``"adacomp"``, with the world size and rank (loading it elsewhere raises).
    """
    hvd = _hvd()
    compressor = AdaComp(bin_size=bin_size, scale=scale, values=values, min_numel=min_numel,
                         device=device)
    # As Horovod does: the methods are copied into a subclass of the user's optimizer class
    # (so super(cls, opt).step() is the plain optimizer's step), and the class claims
    # Horovod's module, so that hvd.broadcast_optimizer_state initialises empty optimizer
    # state with the plain step instead of running a (collective) exchange of zeros.
    body = {k: v for k, v in _AdaCompOptimizerMixin.__dict__.items() if k not in ("__dict__", "__weakref__")}
    body["__module__"] = hvd.DistributedOptimizer.__module__
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), body)
    opt = cls.__new__(cls)
    opt.__dict__.update(optimizer.__dict__)  # same param groups, state and hooks
    opt._adacomp_init(named_parameters, backward_passes_per_step, compressor, start_iter, prefix,
                      exchange, cost_model, scaler)
    return opt
