"""AdaComp as a DDP communication hook.

Usage, like PyTorch's PowerSGD hook::

    from adacomp import AdaCompState, adacomp_hook
    model = DistributedDataParallel(net)
    state = AdaCompState(model=model)          # process group: the world
    model.register_comm_hook(state, adacomp_hook)

The hook compresses each gradient of the bucket on its own (bins never straddle two
parameters of the flat bucket), exchanges the payloads with an allgather (sizes first,
then one padded allgather of the bytes), decodes and sums them with ``decompress_sum``
and divides by the world size. Tensors sent dense (1-D, small, or a payload that would
not be smaller than the dense bytes) travel together in one allreduce per bucket. See
:mod:`adacomp.parallel.exchange` for the protocol and docs/algorithm.md section 5 for the contracts.
"""

# No `from __future__ import annotations`: DDP inspects the hook's annotations at runtime.
import logging

import torch
import torch.distributed as dist
from torch import nn

from ..compressor import DEFAULT_MIN_NUMEL, AdaComp
from ..stats import TrafficStats
from .exchange import CostModel, ExchangeState, check_exchange

logger = logging.getLogger(__name__)


def _named_parameters(model: nn.Module | None, named_parameters):
    if named_parameters is not None:
        items = list(named_parameters)
    elif model is not None:
        items = list(model.named_parameters())
    else:
        raise ValueError("AdaCompState needs model=... or named_parameters=... to key residues by "
                         "parameter name (DDP rebuilds its buckets after the first step)")
    out = []
    for name, p in items:
        if isinstance(model, nn.parallel.DistributedDataParallel) and name.startswith("module."):
            name = name[len("module."):]
        out.append((name, p))
    return out


class AdaCompState(ExchangeState):
    """All mutable state of the AdaComp hook, in one checkpointable object.

    Args:
        process_group: the group to reduce over (default: the world).
        model: the (DDP-wrapped or plain) model, to name its parameters; or give
            ``named_parameters`` instead.
        bin_size, scale, values, min_numel, device: the compressor settings of
            :class:`adacomp.AdaComp`.
        start_iter: dense allreduce (no compression, residues untouched) before this step.
        exchange: how payloads travel (see :mod:`adacomp.parallel.exchange`): ``"allgather"``,
            ``"sharded"`` (traffic per worker about two payloads whatever the world size;
            owner residues are a second level of error feedback) or ``"auto"`` (default:
            per bucket and step, the cheapest under ``cost_model``).
        cost_model: :class:`adacomp.parallel.exchange.CostModel` (link bandwidth and latency) for
            ``exchange="auto"``.
        log_every: log the traffic statistics through ``logging`` every this many steps
            (0: never).
    """

    __slots__ = [
        # tuned knobs
        "bin_size", "scale", "values", "min_numel", "start_iter", "exchange", "cost_model",
        # switches and plumbing
        "process_group", "log_every", "_param_names",
        # internal state
        "compressor", "owner", "iter", "traffic",
    ]

    def __init__(self, process_group=None, model: nn.Module | None = None, *, named_parameters=None,
                 bin_size=None, scale: str = "binmax_mean", values: str = "ternary",
                 min_numel: int = DEFAULT_MIN_NUMEL, start_iter: int = 0, exchange: str = "auto",
                 cost_model: CostModel | None = None, log_every: int = 100, device=None):
        if not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"start_iter must be a non-negative int, got {start_iter!r}")
        self.process_group = process_group
        self.bin_size, self.scale, self.values, self.min_numel = bin_size, scale, values, min_numel
        self.start_iter = start_iter
        self.exchange = check_exchange(exchange)
        self.cost_model = cost_model or CostModel()
        self.owner = None
        self.log_every = log_every
        self.compressor = AdaComp(bin_size=bin_size, scale=scale, values=values,
                                  min_numel=min_numel, device=device)
        self._param_names = {}
        for name, p in _named_parameters(model, named_parameters):
            self._param_names[p.data_ptr()] = name
        self.iter = 0
        self.traffic = TrafficStats()

    # -- naming -------------------------------------------------------------------------
    def name_of(self, param: torch.Tensor) -> str:
        name = self._param_names.get(param.data_ptr())
        if name is None:
            raise KeyError(f"AdaComp hook: a parameter of shape {tuple(param.shape)} is not among the "
                           "parameters given to AdaCompState (pass the model that DDP wraps)")
        return name

    # -- step counter (advances on the last bucket, as PowerSGD's) -----------------------
    def maybe_increase_iter(self, bucket) -> None:
        if bucket.is_last():
            self.iter += 1
            self.traffic.end_step()
            if self.log_every and self.iter % self.log_every == 0:
                logger.info("AdaComp %s", self.traffic.format())

    def __getstate__(self):
        # The process group cannot be pickled (as PowerSGD's state).
        return {s: getattr(self, s) for s in self.__slots__ if s != "process_group"}

    def __setstate__(self, state):
        self.process_group = None
        for k, v in state.items():
            setattr(self, k, v)


# all_gather_single is the new name of all_gather_into_tensor (deprecated in recent PyTorch).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _allgather_int64(t, world, group):
    out = torch.empty(world * t.numel(), dtype=t.dtype, device=t.device)
    _all_gather_single(out, t, group=group)
    return out.view(world, -1)


def _alltoallv(parts, recv_sizes, group):
    send = torch.cat(parts)
    recv = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=send.device)
    dist.all_to_all_single(recv, send, output_split_sizes=list(recv_sizes),
                           input_split_sizes=[p.numel() for p in parts], group=group)
    return list(torch.split(recv, list(recv_sizes)))


def _group(state):
    return state.process_group if state.process_group is not None else dist.group.WORLD


def adacomp_hook(state: AdaCompState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook running AdaComp on every gradient of ``bucket``."""
    group = _group(state)
    world = dist.get_world_size(group)
    buf = bucket.buffer()

    if state.iter < state.start_iter:
        for g in bucket.gradients():
            state.traffic.add("dense", g.numel() * 4, g.numel() * g.element_size())
        state.maybe_increase_iter(bucket)
        fut = dist.all_reduce(buf, group=group, async_op=True).get_future()

        def average(f):
            return f.value()[0].div_(world)

        return fut.then(average)

    grads = bucket.gradients()
    names = [state.name_of(p) for p in bucket.parameters()]
    ex = state.group_exchange(names, grads, world, dist.get_rank(group))
    # The size exchange (and, in sharded mode, the all-to-all to the owners and the owners'
    # sizes) is waited for here, on the thread that runs the hooks, on purpose: issuing
    # collectives from a Future callback instead would let them interleave with the next
    # bucket's collectives in a different order on different ranks. The last transfers
    # below stay asynchronous and overlap with the backward pass.
    ex.decide(_allgather_int64(ex.meta(), world, group))  # raises on every rank if configs differ
    if ex.mode == "sharded":
        ex.reduce_owned(_alltoallv(ex.alltoall_parts(), ex.alltoall_recv_sizes(), group))
        ex.set_owner_sizes(_allgather_int64(ex.owner_sizes(), world, group))
    futures = []
    gathered = dense = None
    mine = ex.payload_buffer()
    if mine is not None:
        flat = torch.empty(world * mine.numel(), dtype=torch.uint8, device=mine.device)
        futures.append(_all_gather_single(flat, mine, group=group, async_op=True).get_future())
        gathered = flat.view(world, mine.numel())
    dense = ex.dense_buffer()
    if dense is not None:
        futures.append(dist.all_reduce(dense, group=group, async_op=True).get_future())

    ex.account(state.traffic)
    state.maybe_increase_iter(bucket)

    def finish(_):
        ex.finish(gathered, dense)
        return buf

    if not futures:
        fut = torch.futures.Future()
        fut.set_result(finish(None))
        return fut
    return torch.futures.collect_all(futures).then(finish)
