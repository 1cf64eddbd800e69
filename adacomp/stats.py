"""Traffic statistics shared by the integrations (DDP hook, Horovod, mpi4py).

Compression ratios are always measured on bytes (docs/algorithm.md section 3): dense fp32 bytes
of the gradients divided by the bytes this rank actually handed to collectives, headers,
padding and metadata included.
"""

from __future__ import annotations

import copy

KINDS = ("conv", "fc", "dense", "overhead")
KIND_HELP = {
    "conv": "compressed tensors of 3+ dims (convolutions)",
    "fc": "compressed tensors of 1-2 dims (fully connected, recurrent, embedding)",
    "dense": "tensors sent dense (by rule, by fallback, or before start_iter)",
    "overhead": "size exchange, padding of the payload allgather, decisions",
}


def layer_kind(shape) -> str:
    return "conv" if len(shape) >= 3 else "fc"


def ring_allreduce_received(nbytes: int, world: int) -> int:
    """Bytes one rank receives in a ring allreduce of ``nbytes`` over ``world`` ranks:
    ``2 (W-1)/W`` of them (reduce-scatter plus all-gather), rounded down."""
    return 2 * (world - 1) * nbytes // world


def _zero():
    return {k: {"dense_bytes": 0, "wire_bytes": 0} for k in KINDS}


class TrafficStats:
    """Cumulative and last-step bytes, split by kind of layer."""

    def __init__(self):
        self.total = _zero()
        self.last = _zero()
        self._current = _zero()
        self.steps = 0
        self.last_exchange: dict = {}
        self.received = {"total": 0, "last_step": 0, "current": 0}
        self.modes = {"allgather": 0, "sharded": 0, "dense": 0}
        self.last_choice: dict = {}
        self.slots = {"one_round": 0, "overflow": 0}

    def add(self, kind: str, dense_bytes: int = 0, wire_bytes: int = 0) -> None:
        c = self._current[kind]
        c["dense_bytes"] += int(dense_bytes)
        c["wire_bytes"] += int(wire_bytes)

    def add_received(self, nbytes: int) -> None:
        """Bytes this rank receives from the others (payloads, sizes, dense allreduce)."""
        self.received["current"] += int(nbytes)

    def note_exchange(self, group: str, mode: str | None, choice: dict) -> None:
        """Record how a group of tensors (named by its first parameter) was exchanged."""
        if mode is not None:
            self.modes[mode] = self.modes.get(mode, 0) + 1
        self.last_choice[group] = choice

    def note_slots(self, overflow: bool) -> None:
        """Count an exchange sent in one round of slots (``overflow``: it needed a second
        round for the bytes beyond a slot)."""
        self.slots["one_round"] += 1
        self.slots["overflow"] += int(overflow)

    def end_step(self) -> None:
        r = self.received
        r["last_step"], r["current"] = r["current"], 0
        r["total"] += r["last_step"]
        self.last = self._current
        for k in KINDS:
            for f in ("dense_bytes", "wire_bytes"):
                self.total[k][f] += self.last[k][f]
        self._current = _zero()
        self.steps += 1

    @staticmethod
    def _summary(split):
        out = {}
        dense = wire = 0
        for k in KINDS:
            d, w = split[k]["dense_bytes"], split[k]["wire_bytes"]
            out[k] = {"dense_bytes": d, "wire_bytes": w, "ratio": (d / w) if w else None}
            dense += d
            wire += w
        out["all"] = {"dense_bytes": dense, "wire_bytes": wire, "ratio": (dense / wire) if wire else None}
        return out

    def as_dict(self) -> dict:
        return {"steps": self.steps, "total": self._summary(self.total),
                "last_step": self._summary(self.last),
                "received_bytes": {"total": self.received["total"], "last_step": self.received["last_step"]},
                "modes": dict(self.modes)}

    def state_dict(self) -> dict:
        return {"total": copy.deepcopy(self.total), "steps": self.steps,
                "received": self.received["total"], "modes": dict(self.modes)}

    def load_state_dict(self, state: dict) -> None:
        self.total = copy.deepcopy(state["total"])
        self.steps = int(state["steps"])
        self.received["total"] = int(state.get("received", 0))
        self.modes.update(state.get("modes", {}))

    def format(self) -> str:
        s = self.as_dict()["total"]
        parts = []
        for k in ("conv", "fc", "dense", "all"):
            r = s[k]["ratio"]
            parts.append(f"{k}={r:.1f}x" if r else f"{k}=-")
        return (f"step {self.steps}: wire {s['all']['wire_bytes'] / 1e6:.2f} MB for "
                f"{s['all']['dense_bytes'] / 1e6:.2f} MB dense; ratio " + " ".join(parts))
