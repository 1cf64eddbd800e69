"""The transport-independent part of one AdaComp exchange of a group of named gradients.

Every integration (DDP hook, Horovod wrapper, mpi4py communicator) runs the same protocol
and differs only in which collectives carry the bytes (a :class:`Transport`):

1. :class:`GroupExchange` compresses each gradient locally (two-phase: residues are not
   updated yet) and builds a small int64 ``meta`` vector: a configuration hash, and per
   tensor its payload sizes (one per shard in the sharded and auto modes; always ``W``
   slots, so that ranks configured with different modes still send equal-length vectors
   and get a clear error instead of a failed collective) and non-finite flag.
2. The integration all-gathers ``meta``; :meth:`GroupExchange.decide` checks that every
   rank runs the same configuration (a clear error on every rank otherwise) and decides,
   identically on every rank, per tensor: *non-finite* (any rank saw NaN/Inf: every rank
   outputs NaN and keeps its residue), *dense* (by rule, or because some rank's payload is
   not smaller than the dense bytes: residue kept, plain allreduce), or *compressed*
   (residue committed); and for the group the exchange of the compressed tensors
   (``exchange="auto"`` picks it with the :class:`CostModel`):

   * **allgather**: every rank all-gathers every rank's payloads (per-worker traffic grows
     as ``(W - 1)`` payloads);
   * **sharded**: each tensor's index range is split into ``W`` bin-aligned shards, shard
     ``s`` owned by rank ``s``. One all-to-all sends each owner its shard of every rank's
     payload; the owner decodes and averages them, re-compresses the average with AdaComp
     and its own *owner residue* (a second level of error feedback), and the owners'
     payloads are all-gathered (after a small all-gather of their sizes). Per-worker
     traffic stays near two payloads whatever ``W`` is;
   * **dense**: the compressed tensors join the dense allreduce (residues kept).
3. The integration all-gathers :meth:`gather_buffer` and all-reduces (sums)
   :meth:`dense_buffer`.
4. :meth:`finish` decodes in rank order with ``decompress_sum``, averages, and writes the
   results into the output tensors.

Because every rank decodes the same bytes in the same order, the compressed tensors come
out bit-identical on every rank and in every integration. :func:`run_exchange` drives the
whole protocol over a synchronous :class:`Transport` (Horovod, mpi4py); the DDP hook runs
the same steps with asynchronous collectives for the last one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from ..compressor import AdaComp
from ..payload import Payload, decompress_sum, shard_bounds
from ..stats import TrafficStats, layer_kind, ring_allreduce_received

META_MAGIC = 0xADAC02
META_FIXED = 4  # magic, config hash, number of tensors, pieces per tensor

DENSE_RULE, COMPRESSED, DENSE_FALLBACK, NONFINITE = 0, 1, 2, 3
DECISION_NAMES = {DENSE_RULE: "dense", COMPRESSED: "compressed", DENSE_FALLBACK: "dense-fallback",
                  NONFINITE: "non-finite"}
EXCHANGES = ("allgather", "sharded", "auto")


def check_exchange(exchange: str) -> str:
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    return exchange


@dataclass(frozen=True)
class CostModel:
    """The cost model of ``exchange="auto"``: seconds = bytes / ``bandwidth`` + rounds x
    ``latency``, for the busiest worker's link, with ring collectives.

    For ``W`` workers, the compressed tensors' dense bytes ``D`` and the payload sizes
    ``P[r, t, s]`` (rank ``r``, tensor ``t``, shard ``s``) every rank knows after the size
    exchange:

    * dense ring allreduce: ``2 (W-1)/W * D`` bytes, ``2 (W-1)`` rounds;
    * allgather: ``(W-1) * max_r sum_{t,s} P[r,t,s]`` bytes (padded to the longest
      rank's), ``W - 1`` rounds;
    * sharded: the all-to-all's busiest link, ``max_r max(sent_r, received_r)``, plus the
      owners' all-gather, estimated as ``(W-1) * max_s max_r sum_t P[r,t,s]`` (an owner's
      re-compressed shard is about as dense as one rank's shard), and ``3 (W-1)`` rounds
      (all-to-all, owner sizes, owner payloads).

    The defaults describe a 1 Gbit/s link with 100 us per round; set them to the cluster's.
    """

    bandwidth: float = 1.25e8
    latency: float = 1e-4

    def __post_init__(self):
        if not self.bandwidth > 0 or not self.latency >= 0:
            raise ValueError(f"CostModel needs bandwidth > 0 and latency >= 0, got {self}")

    def seconds(self, nbytes: float, rounds: int) -> float:
        return nbytes / self.bandwidth + rounds * self.latency

    def estimate(self, world: int, dense_bytes: int, sizes: torch.Tensor) -> dict:
        """Estimated ``{mode: (seconds, bytes)}``; ``sizes`` is ``[W, T, S]`` (int64)."""
        W = world
        out = {"dense": (2 * (W - 1) * dense_bytes / W, 2 * (W - 1))}
        per_rank = sizes.sum(dim=(1, 2))
        out["allgather"] = ((W - 1) * int(per_rank.max()) if W > 1 else 0, W - 1)
        if sizes.shape[2] == W:
            by_shard = sizes.sum(dim=1)                       # [W ranks, W shards]
            own = torch.diagonal(by_shard)
            sent = by_shard.sum(dim=1) - own
            received = by_shard.sum(dim=0) - own
            a2a = int(torch.maximum(sent, received).max()) if W > 1 else 0
            owners = int(by_shard.max(dim=0).values.max()) if W > 1 else 0
            out["sharded"] = (a2a + (W - 1) * owners, 3 * (W - 1))
        return {m: (self.seconds(b, r), int(b)) for m, (b, r) in out.items()}


class Transport:
    """The collectives an integration provides to :func:`run_exchange` (synchronous)."""

    world: int
    rank: int
    padded = False  # True if allgatherv pads every rank's bytes to the longest

    def allgather_int64(self, t: torch.Tensor) -> torch.Tensor:
        """All-gather a 1-D int64 tensor of the same length on every rank -> ``[W, n]``."""
        raise NotImplementedError

    def allgatherv(self, own: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        """All-gather 1-D uint8 tensors of ``sizes[r]`` bytes -> one tensor per rank (each at
        least ``sizes[r]`` long)."""
        raise NotImplementedError

    def alltoallv(self, parts: list[torch.Tensor], recv_sizes: list[int]) -> list[torch.Tensor]:
        """Send ``parts[s]`` (1-D uint8) to rank ``s``; receive ``recv_sizes[r]`` bytes from
        each rank ``r`` -> one tensor per source rank."""
        raise NotImplementedError

    def allreduce_sum(self, flat: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks of a 1-D tensor."""
        raise NotImplementedError


def run_exchange(ex: GroupExchange, transport: Transport, stats: TrafficStats) -> None:
    """Run the whole protocol of :class:`GroupExchange` ``ex`` over ``transport``."""
    ex.decide(transport.allgather_int64(ex.meta()))
    if ex.mode == "sharded":
        received = transport.alltoallv(ex.alltoall_parts(), ex.alltoall_recv_sizes())
        ex.reduce_owned(received)
        ex.set_owner_sizes(transport.allgather_int64(ex.owner_sizes()))
    gathered = None
    if ex.compressed:
        gathered = transport.allgatherv(ex.gather_buffer(), ex.gather_sizes())
    dense = ex.dense_buffer()
    dense_sum = transport.allreduce_sum(dense) if dense is not None else None
    ex.account(stats, padded=transport.padded)
    ex.finish(gathered, dense_sum)


class ExchangeState:
    """What every integration keeps per rank: the compressor (residues), the owner
    compressor of the sharded exchange (owner residues), the exchange mode and cost model,
    the exchange counter and the traffic statistics; checkpointed together, one entry per
    rank."""

    __slots__ = ()  # subclasses declare compressor, owner, exchange, cost_model, iter, traffic

    def owner_compressor(self) -> AdaComp:
        """The compressor holding this rank's owner residues (created on first use)."""
        if self.owner is None:
            c = self.compressor
            self.owner = AdaComp(bin_size=None, scale=c.scale, values=c.values, min_numel=0,
                                 device=c.device)
        return self.owner

    def group_exchange(self, names, grads, world: int, rank: int, outputs=None) -> GroupExchange:
        return GroupExchange(self.compressor, names, grads, world, outputs=outputs, rank=rank,
                             exchange=self.exchange, owner=self.owner_compressor(),
                             cost_model=self.cost_model)

    def stats(self) -> dict:
        """Bytes, cumulative (``total``) and for the last step (``last_step``): dense fp32
        bytes, bytes handed to collectives, their ratio, split by kind of layer (``conv``,
        ``fc`` = fully connected / recurrent, ``dense`` = sent dense, ``overhead``);
        ``received_bytes`` (what this rank received from the others); ``decisions``: how
        each parameter travelled in its last exchange; ``exchanges``: how many groups went
        each way, and ``last_choice``: per group (named by its first parameter) the mode,
        the reason and the cost model's estimates."""
        d = self.traffic.as_dict()
        d["decisions"] = dict(self.traffic.last_exchange)
        d["exchanges"] = dict(self.traffic.modes)
        d["last_choice"] = dict(self.traffic.last_choice)
        return d

    def state_dict(self) -> dict:
        """This rank's residues, owner residues, step counter and statistics (save one per
        rank)."""
        return {"compressor": self.compressor.state_dict(), "iter": self.iter,
                "stats": self.traffic.state_dict(), "exchange": self.exchange,
                "owner": self.owner.state_dict() if self.owner is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.compressor.load_state_dict(state["compressor"])
        self.iter = int(state["iter"])
        self.traffic.load_state_dict(state["stats"])
        owner = state.get("owner")
        self.owner = None
        if owner is not None:
            self.owner_compressor().load_state_dict(owner)


class PlainExchangeState(ExchangeState):
    """An :class:`ExchangeState` holder for integrations that are not one themselves."""

    __slots__ = ("compressor", "owner", "exchange", "cost_model", "iter", "traffic")

    def __init__(self, compressor: AdaComp, exchange: str = "auto", cost_model: CostModel | None = None):
        self.compressor = compressor
        self.owner = None
        self.exchange = check_exchange(exchange)
        self.cost_model = cost_model or CostModel()
        self.iter = 0
        self.traffic = TrafficStats()


class ConfigMismatchError(RuntimeError):
    """The ranks do not run the same AdaComp configuration or parameter set."""


def config_hash(comp: AdaComp, names, grads, bins, exchange: str) -> int:
    tensors = [[n, list(g.shape), str(g.dtype), b] for n, g, b in zip(names, grads, bins)]
    desc = json.dumps({"config": comp.config(), "exchange": exchange, "tensors": tensors},
                      sort_keys=True, default=str)
    return int.from_bytes(hashlib.blake2b(desc.encode(), digest_size=8).digest(), "little") >> 1


def owner_key(name: str, start: int, end: int) -> str:
    """The owner residue's name for shard ``[start, end)`` of parameter ``name``."""
    return f"{name}@shard[{start}:{end}]"


class GroupExchange:
    """One rank's side of exchanging ``grads`` (named ``names``) with AdaComp.

    ``outputs`` (default: ``grads``) receive the averaged gradients in :meth:`finish`.
    ``exchange``: ``"allgather"``, ``"sharded"`` (needs ``owner``, the compressor of this
    rank's owner residues) or ``"auto"`` (chooses per call with ``cost_model``).
    """

    def __init__(self, comp: AdaComp, names: list[str], grads: list[torch.Tensor], world: int,
                 outputs: list[torch.Tensor] | None = None, *, rank: int = 0,
                 exchange: str = "allgather", owner: AdaComp | None = None,
                 cost_model: CostModel | None = None):
        if len(names) != len(grads):
            raise ValueError("one name per gradient")
        check_exchange(exchange)
        if exchange != "allgather" and owner is None:
            raise ValueError(f"exchange={exchange!r} needs the owner compressor (owner=...)")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        self.comp = comp
        self.owner = owner
        self.names = list(names)
        self.grads = list(grads)
        self.outputs = list(outputs) if outputs is not None else self.grads
        self.world = world
        self.rank = rank
        self.exchange = exchange
        self.cost_model = cost_model or CostModel()
        self.split = exchange != "allgather"  # payloads split into one piece per shard
        self.pieces = world if self.split else 1
        self.bins = [comp.bin_size_for(n, g) for n, g in zip(names, grads)]
        self.payloads: list[list[Payload] | None] = []
        self.pending = []
        flags, sizes = [], []
        for n, g, b in zip(self.names, self.grads, self.bins):
            if b is None:
                self.payloads.append(None)
                self.pending.append(None)
                sizes += [-1] * world
                flags.append(0)  # NaN/Inf in a dense tensor propagates through the allreduce
                continue
            if self.split:
                ps, pend = comp.prepare_split(n, g, self.pieces)
            else:
                p, pend = comp.prepare(n, g)
                ps = [p]
            self.payloads.append(ps)
            self.pending.append(pend)
            sizes += [p.nbytes for p in ps] + [0] * (world - len(ps))
            flags.append(int(ps[0].nonfinite))
        self.hash = config_hash(comp, self.names, self.grads, self.bins, exchange)
        device = grads[0].device if grads else torch.device("cpu")
        self._meta = torch.tensor([META_MAGIC, self.hash, len(self.grads), self.pieces] + sizes + flags,
                                  dtype=torch.int64, device=device)
        self.decisions: list[int] | None = None
        self.mode = None
        self.owner_payloads: list[Payload] = []
        self.owner_size_table = None

    # -------------------------------------------------------------- step 1: metadata
    def meta(self) -> torch.Tensor:
        """int64 vector to all-gather (same length on every rank with the same bucket)."""
        return self._meta

    # -------------------------------------------------------------- step 2: decisions
    def decide(self, all_meta: torch.Tensor) -> list[int]:
        """Check configurations and decide each tensor's fate, and the exchange, from every
        rank's meta."""
        m = all_meta.reshape(self.world, -1).cpu()
        T, S, W = len(self.grads), self.pieces, self.world
        if (m.shape[1] != META_FIXED + (W + 1) * T or bool((m[:, 0] != META_MAGIC).any())
                or bool((m[:, 3] != S).any())):
            self._discard_all()
            raise ConfigMismatchError(
                f"AdaComp: ranks disagree on the tensors exchanged together ({T} here) or on the "
                "exchange mode; every rank must wrap the same model with the same settings")
        if bool((m[:, 1] != m[0, 1]).any()) or bool((m[:, 2] != T).any()):
            self._discard_all()
            bad = [r for r in range(self.world) if int(m[r, 1]) != int(m[0, 1])]
            raise ConfigMismatchError(
                f"AdaComp configuration differs between ranks (ranks {bad} differ from rank 0): "
                f"bin sizes, value mode, scale, min_numel, exchange, parameter names, shapes and "
                f"dtypes must match on every rank. This rank has {self.comp.config()}, "
                f"exchange={self.exchange!r} for {list(zip(self.names, self.bins))[:8]}...")
        sizes = m[:, META_FIXED:META_FIXED + W * T].reshape(W, T, W)[:, :, :S]
        flags = m[:, META_FIXED + W * T:META_FIXED + (W + 1) * T]
        self.sizes = sizes
        decisions = []
        for t in range(T):
            if bool(flags[:, t].any()):
                decisions.append(NONFINITE)
            elif self.bins[t] is None:
                decisions.append(DENSE_RULE)
            elif int(sizes[:, t, :].sum(dim=1).max()) >= self.grads[t].numel() * self.grads[t].element_size():
                decisions.append(DENSE_FALLBACK)
            else:
                decisions.append(COMPRESSED)
        comp_t = [t for t in range(T) if decisions[t] == COMPRESSED]
        self.mode, self.choice = self._choose(comp_t)
        if self.mode == "dense":
            for t in comp_t:
                decisions[t] = DENSE_FALLBACK
            comp_t = []
        for t in range(T):
            (self.comp.commit if decisions[t] == COMPRESSED else self.comp.discard)(self.pending[t])
        self.pending = [None] * T
        self.decisions = decisions
        self.compressed = comp_t
        self.dense = [t for t in range(T) if decisions[t] in (DENSE_RULE, DENSE_FALLBACK)]
        if comp_t:
            self.bounds = {t: shard_bounds(self.grads[t].numel(), self.bins[t], self.world) for t in comp_t}
        return decisions

    def _choose(self, comp_t: list[int]) -> tuple[str | None, dict]:
        if not comp_t:
            return None, {"mode": None, "reason": "nothing compressed"}
        if self.exchange != "auto":
            return self.exchange, {"mode": self.exchange, "reason": f"exchange={self.exchange!r}"}
        dense_bytes = sum(self.grads[t].numel() * self.grads[t].element_size() for t in comp_t)
        est = self.cost_model.estimate(self.world, dense_bytes, self.sizes[:, comp_t, :])
        order = ["allgather", "sharded", "dense"]  # ties go to the simpler exchange
        mode = min(order, key=lambda k: (est[k][0], order.index(k)))
        detail = ", ".join(f"{k} {est[k][0] * 1e3:.3f} ms ({est[k][1]} B)" for k in order)
        return mode, {"mode": mode, "reason": f"auto, least estimated time: {detail}",
                      "estimates": {k: {"seconds": est[k][0], "bytes": est[k][1]} for k in order}}

    def _discard_all(self):
        for pend in self.pending:
            self.comp.discard(pend)
        self.pending = [None] * len(self.grads)

    # -------------------------------------------------------------- sharded: owners
    def alltoall_parts(self) -> list[torch.Tensor]:
        """Per owner ``s``: this rank's shard-``s`` payloads of the compressed tensors."""
        device = self._device()
        return [self._cat([self.payloads[t][s].tensor for t in self.compressed], device)
                for s in range(self.world)]

    def alltoall_recv_sizes(self) -> list[int]:
        return [int(self.sizes[r, self.compressed, self.rank].sum()) for r in range(self.world)]

    def reduce_owned(self, received: list[torch.Tensor]) -> None:
        """As owner of shard ``rank``: decode every rank's shard payloads (rank order),
        average, and re-compress with the owner residues (committed at once: the owner's
        payload is always used)."""
        W, me = self.world, self.rank
        offsets = [0] * W
        self.owner_payloads = []
        for t in self.compressed:
            start, end = self.bounds[t][me]
            plist = []
            for r in range(W):
                size = int(self.sizes[r, t, me])
                plist.append(Payload.from_tensor(received[r][offsets[r]:offsets[r] + size]))
                offsets[r] += size
            avg = torch.zeros(end - start, dtype=torch.float32, device=self._device())
            decompress_sum(plist, avg, name=self.names[t])
            if end == start:  # fewer bins than ranks: nothing to own (and no residue to keep)
                self.owner_payloads.append(plist[0])
                continue
            avg.div_(W)
            p, pend = self.owner.prepare(owner_key(self.names[t], start, end), avg,
                                         bin_size=max(1, min(self.bins[t], end - start)))
            self.owner.commit(pend)
            self.owner_payloads.append(p)

    def owner_sizes(self) -> torch.Tensor:
        return torch.tensor([p.nbytes for p in self.owner_payloads], dtype=torch.int64,
                            device=self._device())

    def set_owner_sizes(self, all_sizes: torch.Tensor) -> None:
        self.owner_size_table = all_sizes.reshape(self.world, -1).cpu()

    # -------------------------------------------------------------- step 3: buffers
    def gather_sizes(self) -> list[int]:
        """Bytes every rank contributes to the payload all-gather."""
        if self.mode == "sharded":
            return self.owner_size_table.sum(dim=1).tolist()
        return self.sizes[:, self.compressed, :].sum(dim=(1, 2)).tolist()

    def gather_buffer(self) -> torch.Tensor:
        """This rank's bytes for the payload all-gather: its payloads of the compressed
        tensors (allgather), or its owner payloads (sharded)."""
        if self.mode == "sharded":
            parts = [p.tensor for p in self.owner_payloads]
        else:
            parts = [p.tensor for t in self.compressed for p in self.payloads[t]]
        return self._cat(parts, self._device())

    def payload_buffer(self) -> torch.Tensor | None:
        """:meth:`gather_buffer` padded to the longest rank's (for a plain all-gather that
        needs equal sizes). None if nothing is compressed."""
        if not self.compressed:
            return None
        own = self.gather_buffer()
        longest = max(self.gather_sizes())
        if own.numel() < longest:
            own = torch.cat([own, torch.zeros(longest - own.numel(), dtype=torch.uint8, device=own.device)])
        return own

    def dense_buffer(self) -> torch.Tensor | None:
        """The dense tensors (by rule and by fallback), flattened together, to be summed."""
        if not self.dense:
            return None
        return torch.cat([self.grads[t].detach().reshape(-1) for t in self.dense])

    def _device(self):
        return self.grads[0].device if self.grads else torch.device("cpu")

    @staticmethod
    def _cat(parts, device):
        if not parts:
            return torch.empty(0, dtype=torch.uint8, device=device)
        return torch.cat([p.to(device) for p in parts])

    # -------------------------------------------------------------- step 4: results
    def finish(self, gathered: torch.Tensor | list | None, dense_sum: torch.Tensor | None) -> None:
        """Decode and average; write into the outputs. ``gathered``: the all-gathered
        buffers, ``[world, n]`` or a list of per-rank 1-D uint8 tensors (padding after
        each rank's bytes is ignored)."""
        W = self.world
        if self.compressed:
            rows = [gathered[r] for r in range(W)]
            offsets = [0] * W

            def take(r, size):
                p = Payload.from_tensor(rows[r][offsets[r]:offsets[r] + size])
                offsets[r] += size
                return p

            for i, t in enumerate(self.compressed):
                out = torch.zeros(self.grads[t].numel(), dtype=torch.float32, device=self.outputs[t].device)
                nonfinite = False
                if self.mode == "sharded":  # rank s holds the averaged shard s
                    for s, (start, end) in enumerate(self.bounds[t]):
                        p = take(s, int(self.owner_size_table[s, i]))
                        nonfinite |= p.nonfinite
                        decompress_sum([p], out[start:end], name=self.names[t])
                else:
                    pieces = self.bounds[t] if self.split else [(0, out.numel())]
                    for s, (start, end) in enumerate(pieces):
                        plist = [take(r, int(self.sizes[r, t, s])) for r in range(W)]
                        if not self.split:
                            decompress_sum(plist, out.view(self.grads[t].shape), name=self.names[t])
                        else:
                            decompress_sum(plist, out[start:end], name=self.names[t])
                    out.div_(W)
                if nonfinite:  # an owner's average overflowed: the whole tensor is non-finite
                    out.fill_(float("nan"))
                self.outputs[t].copy_(out.view(self.grads[t].shape))
        if self.dense:
            dense_sum = dense_sum.div_(W) if dense_sum.is_floating_point() else dense_sum
            pos = 0
            for t in self.dense:
                n = self.grads[t].numel()
                self.outputs[t].copy_(dense_sum[pos:pos + n].view(self.grads[t].shape))
                pos += n
        for t, d in enumerate(self.decisions):
            if d == NONFINITE:
                self.outputs[t].fill_(float("nan"))

    def account(self, stats: TrafficStats, padded: bool = True) -> None:
        """Add this exchange's bytes to ``stats``: bytes handed to collectives by this rank
        (``padded``: the payload all-gather pads each rank to the longest) and bytes it
        receives from the others (the dense allreduce counted as a ring's
        ``2 (W-1)/W`` of its bytes)."""
        W, me = self.world, self.rank
        sharded = self.mode == "sharded"
        owner_payload = dict(zip(self.compressed, self.owner_payloads)) if sharded else {}
        own = 0
        for t, d in enumerate(self.decisions):
            g = self.grads[t]
            dense_b = g.numel() * 4  # ratios are against dense fp32
            if d == COMPRESSED:
                if sharded:  # the all-to-all (to the other owners) and this rank's owner payload
                    size = int(self.sizes[me, t, :].sum() - self.sizes[me, t, me])
                    size += owner_payload[t].nbytes
                else:
                    size = int(self.sizes[me, t, :].sum())
                own += size
                stats.add(layer_kind(g.shape), dense_b, size)
            elif d in (DENSE_RULE, DENSE_FALLBACK):
                stats.add("dense", dense_b, g.numel() * g.element_size())
            else:
                stats.add("dense", dense_b, 0)
        received = 0
        meta_bytes = self._meta.numel() * 8
        overhead = meta_bytes
        received += (W - 1) * meta_bytes
        if self.compressed:
            sizes = self.gather_sizes()
            longest = max(sizes)
            others = [r for r in range(W) if r != me]
            if sharded:
                from_others = self.alltoall_recv_sizes()
                received += sum(from_others) - from_others[me]
                overhead += 8 * len(self.compressed)
                received += (W - 1) * 8 * len(self.compressed)
                mine = sizes[me]
            else:
                mine = own
            received += sum((longest if padded else sizes[r]) for r in others)
            if padded:
                overhead += longest - mine
        if self.dense:
            nbytes = sum(self.grads[t].numel() * self.grads[t].element_size() for t in self.dense)
            received += ring_allreduce_received(nbytes, W)
        stats.add("overhead", 0, overhead)
        stats.add_received(received)
        stats.note_exchange(self.names[0] if self.names else "", self.mode, self.choice)
        stats.last_exchange.update({self.names[t]: DECISION_NAMES[d] for t, d in enumerate(self.decisions)})
