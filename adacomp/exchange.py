"""The transport-independent part of one AdaComp exchange of a group of named gradients.

Every integration (DDP hook, Horovod wrapper, mpi4py communicator) runs the same protocol
and differs only in which collectives carry the bytes:

1. :class:`GroupExchange` compresses each gradient locally (two-phase: residues are not
   updated yet) and builds a small int64 ``meta`` vector: a configuration hash, and per
   tensor its payload size and non-finite flag.
2. The integration all-gathers ``meta``; :meth:`GroupExchange.decide` checks that every
   rank runs the same configuration (a clear error on every rank otherwise) and decides,
   identically on every rank, per tensor: *non-finite* (any rank saw NaN/Inf: every rank
   outputs NaN and keeps its residue), *dense* (by rule, or because some rank's payload is
   not smaller than the dense bytes: residue kept, plain allreduce), or *compressed*
   (residue committed).
3. The integration all-gathers :meth:`payload_buffer` (padded to the longest rank's)
   and all-reduces (sums) :meth:`dense_buffer`.
4. :meth:`finish` decodes every rank's payloads in rank order with ``decompress_sum``,
   divides by the world size, and writes the averages into the output tensors.

Because every rank decodes the same bytes in the same order, the compressed tensors come
out bit-identical on every rank and in every integration.
"""

from __future__ import annotations

import hashlib
import json

import torch

from .compressor import AdaComp
from .payload import Payload, decompress_sum
from .stats import TrafficStats, layer_kind

META_MAGIC = 0xADAC01
META_FIXED = 3  # magic, config hash, number of tensors

DENSE_RULE, COMPRESSED, DENSE_FALLBACK, NONFINITE = 0, 1, 2, 3
DECISION_NAMES = {DENSE_RULE: "dense", COMPRESSED: "compressed", DENSE_FALLBACK: "dense-fallback",
                  NONFINITE: "non-finite"}


class ExchangeState:
    """What every integration keeps per rank: the compressor (residues), the exchange
    counter and the traffic statistics; checkpointed together, one entry per rank."""

    __slots__ = ()  # subclasses (AdaCompState) declare the attributes

    def stats(self) -> dict:
        """Bytes, cumulative (``total``) and for the last step (``last_step``): dense fp32
        bytes, bytes handed to collectives, their ratio, split by kind of layer (``conv``,
        ``fc`` = fully connected / recurrent, ``dense`` = sent dense, ``overhead``), plus
        ``decisions``: how each parameter travelled in its last exchange."""
        d = self.traffic.as_dict()
        d["decisions"] = dict(self.traffic.last_exchange)
        return d

    def state_dict(self) -> dict:
        """This rank's residues, step counter and statistics (save one per rank)."""
        return {"compressor": self.compressor.state_dict(), "iter": self.iter,
                "stats": self.traffic.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.compressor.load_state_dict(state["compressor"])
        self.iter = int(state["iter"])
        self.traffic.load_state_dict(state["stats"])


class PlainExchangeState(ExchangeState):
    """An :class:`ExchangeState` holder for integrations that are not one themselves."""

    __slots__ = ("compressor", "iter", "traffic")

    def __init__(self, compressor: AdaComp):
        self.compressor = compressor
        self.iter = 0
        self.traffic = TrafficStats()


class ConfigMismatchError(RuntimeError):
    """The ranks do not run the same AdaComp configuration or parameter set."""


def config_hash(comp: AdaComp, names, grads, bins) -> int:
    tensors = [[n, list(g.shape), str(g.dtype), b] for n, g, b in zip(names, grads, bins)]
    desc = json.dumps({"config": comp.config(), "tensors": tensors}, sort_keys=True, default=str)
    return int.from_bytes(hashlib.blake2b(desc.encode(), digest_size=8).digest(), "little") >> 1


class GroupExchange:
    """One rank's side of exchanging ``grads`` (named ``names``) with AdaComp.

    ``outputs`` (default: ``grads``) receive the averaged gradients in :meth:`finish`.
    """

    def __init__(self, comp: AdaComp, names: list[str], grads: list[torch.Tensor], world: int,
                 outputs: list[torch.Tensor] | None = None):
        if len(names) != len(grads):
            raise ValueError("one name per gradient")
        self.comp = comp
        self.names = list(names)
        self.grads = list(grads)
        self.outputs = list(outputs) if outputs is not None else self.grads
        self.world = world
        self.bins = [comp.bin_size_for(n, g) for n, g in zip(names, grads)]
        self.payloads: list[Payload | None] = []
        self.pending = []
        flags, sizes = [], []
        for n, g, b in zip(self.names, self.grads, self.bins):
            if b is None:
                self.payloads.append(None)
                self.pending.append(None)
                sizes.append(-1)
                flags.append(0)  # NaN/Inf in a dense tensor propagates through the allreduce
                continue
            p, pend = comp.prepare(n, g)
            self.payloads.append(p)
            self.pending.append(pend)
            sizes.append(p.nbytes)
            flags.append(int(p.nonfinite))
        self.hash = config_hash(comp, self.names, self.grads, self.bins)
        device = grads[0].device if grads else torch.device("cpu")
        self._meta = torch.tensor([META_MAGIC, self.hash, len(self.grads)] + sizes + flags,
                                  dtype=torch.int64, device=device)
        self.decisions: list[int] | None = None

    # -------------------------------------------------------------- step 1: metadata
    def meta(self) -> torch.Tensor:
        """int64 vector to all-gather (same length on every rank with the same bucket)."""
        return self._meta

    # -------------------------------------------------------------- step 2: decisions
    def decide(self, all_meta: torch.Tensor) -> list[int]:
        """Check configurations and decide each tensor's fate from every rank's meta."""
        m = all_meta.reshape(self.world, -1).cpu()
        T = len(self.grads)
        if m.shape[1] != META_FIXED + 2 * T or bool((m[:, 0] != META_MAGIC).any()):
            self._discard_all()
            raise ConfigMismatchError(
                f"AdaComp: ranks disagree on the tensors exchanged together ({T} here); every rank "
                "must wrap the same model with the same settings")
        if bool((m[:, 1] != m[0, 1]).any()) or bool((m[:, 2] != T).any()):
            self._discard_all()
            bad = [r for r in range(self.world) if int(m[r, 1]) != int(m[0, 1])]
            raise ConfigMismatchError(
                f"AdaComp configuration differs between ranks (ranks {bad} differ from rank 0): "
                f"bin sizes, value mode, scale, min_numel, parameter names, shapes and dtypes "
                f"must match on every rank. This rank has {self.comp.config()} for "
                f"{list(zip(self.names, self.bins))[:8]}...")
        sizes = m[:, META_FIXED:META_FIXED + T]
        flags = m[:, META_FIXED + T:META_FIXED + 2 * T]
        self.sizes = sizes
        decisions = []
        for t in range(T):
            pend = self.pending[t]
            if bool(flags[:, t].any()):
                decisions.append(NONFINITE)
                self.comp.discard(pend)
            elif self.bins[t] is None:
                decisions.append(DENSE_RULE)
            elif int(sizes[:, t].max()) >= self.grads[t].numel() * self.grads[t].element_size():
                decisions.append(DENSE_FALLBACK)
                self.comp.discard(pend)
            else:
                decisions.append(COMPRESSED)
                self.comp.commit(pend)
        self.pending = [None] * T
        self.decisions = decisions
        comp_t = [t for t in range(T) if decisions[t] == COMPRESSED]
        totals = sizes[:, comp_t].sum(dim=1) if comp_t else torch.zeros(self.world, dtype=torch.int64)
        self.compressed = comp_t
        self.dense = [t for t in range(T) if decisions[t] in (DENSE_RULE, DENSE_FALLBACK)]
        self.max_total = int(totals.max()) if comp_t else 0
        return decisions

    def _discard_all(self):
        for pend in self.pending:
            self.comp.discard(pend)
        self.pending = [None] * len(self.grads)

    # -------------------------------------------------------------- step 3: buffers
    def payload_buffer(self) -> torch.Tensor | None:
        """This rank's payloads of the compressed tensors, concatenated, padded to the
        longest rank's (a plain allgather needs equal sizes). None if nothing is compressed."""
        if not self.compressed:
            return None
        parts = [self.payloads[t].tensor for t in self.compressed]
        own = sum(p.numel() for p in parts)
        device = self.grads[0].device
        if own < self.max_total:
            parts.append(torch.zeros(self.max_total - own, dtype=torch.uint8, device=device))
        return torch.cat([p.to(device) for p in parts])

    def dense_buffer(self) -> torch.Tensor | None:
        """The dense tensors (by rule and by fallback), flattened together, to be summed."""
        if not self.dense:
            return None
        return torch.cat([self.grads[t].detach().reshape(-1) for t in self.dense])

    # -------------------------------------------------------------- step 4: results
    def finish(self, gathered: torch.Tensor | list | None, dense_sum: torch.Tensor | None) -> None:
        """Decode and average; write into the outputs. ``gathered``: the all-gathered payload
        buffers, ``[world, max_total]`` (or a list of per-rank 1-D uint8 tensors)."""
        W = self.world
        if self.compressed:
            rows = [gathered[r] for r in range(W)]
            offsets = [0] * W
            for t in self.compressed:
                plist = []
                for r in range(W):
                    size = int(self.sizes[r, t])
                    plist.append(Payload.from_tensor(rows[r][offsets[r]:offsets[r] + size]))
                    offsets[r] += size
                out = torch.zeros(self.grads[t].shape, dtype=torch.float32, device=self.outputs[t].device)
                decompress_sum(plist, out, name=self.names[t])
                out.div_(W)
                self.outputs[t].copy_(out)
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
        """Add this exchange's bytes (known once decided) to ``stats``; ``padded``: the
        payloads travel in a padded allgather (each rank sends ``max_total`` bytes)."""
        own = 0
        for t, d in enumerate(self.decisions):
            g = self.grads[t]
            dense_b = g.numel() * 4  # ratios are against dense fp32
            if d == COMPRESSED:
                size = self.payloads[t].nbytes
                own += size
                stats.add(layer_kind(g.shape), dense_b, size)
            elif d in (DENSE_RULE, DENSE_FALLBACK):
                stats.add("dense", dense_b, g.numel() * g.element_size())
            else:
                stats.add("dense", dense_b, 0)
        stats.add("overhead", 0, self._meta.numel() * 8 + ((self.max_total - own) if padded else 0))
        stats.last_exchange.update({self.names[t]: DECISION_NAMES[d] for t, d in enumerate(self.decisions)})
