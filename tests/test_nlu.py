"""Tests of the ATIS workload: loading, the joint BiLSTM, conlleval-style span F1, int8 for the rest."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from adacomp.stages import EmbeddingConfig, compress_, module_bytes
from adacomp.workloads.data import DataNotFound
from adacomp.workloads.nlu import (
    Atis,
    JointBiLSTM,
    atis_batches,
    conll_spans,
    evaluate_nlu,
    joint_loss,
    load_atis,
    quantize_rest_,
    slot_f1,
    storage_bytes,
)


def _atis_or_skip():
    try:
        return load_atis()
    except DataNotFound as exc:
        pytest.skip(f"ATIS not installed: {exc}")


def _tiny(n=24, vocab=20, slots=5, intents=3, seed=0) -> Atis:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 7, (n,), generator=g)
    words = torch.randint(2, vocab, (n, 6), generator=g)
    tags = torch.randint(0, slots, (n, 6), generator=g)
    mask = torch.arange(6)[None] < lengths[:, None]
    return Atis(
        words=words * mask,
        slots=tags * mask,
        lengths=lengths,
        intents=torch.randint(0, intents, (n,), generator=g),
        intent_sets=[("a",)] * n,
        vocab=["<pad>", "<unk>"] + [f"w{i}" for i in range(vocab - 2)],
        slot_tags=["O", "B-x", "I-x", "B-y", "I-y"][:slots],
        intent_names=[f"i{i}" for i in range(intents)],
    )


# --------------------------------------------------------------------------- spans and F1


@pytest.mark.parametrize(
    "tags, spans",
    [
        (["O", "O"], set()),
        (["B-x", "I-x", "O", "B-y"], {("x", 0, 2), ("y", 3, 4)}),
        (["B-x", "B-x"], {("x", 0, 1), ("x", 1, 2)}),  # B always starts a new span
        (["I-x", "I-x", "O"], {("x", 0, 2)}),  # conlleval: I after O starts a span
        (["B-x", "I-y", "I-y"], {("x", 0, 1), ("y", 1, 3)}),  # type change starts a span
        (["B-a.b_c", "I-a.b_c"], {("a.b_c", 0, 2)}),
        (["O", "I-x"], {("x", 1, 2)}),
    ],
)
def test_conll_spans(tags, spans):
    assert conll_spans(tags) == spans


def test_slot_f1_counts_exact_spans_only():
    gold = [["B-x", "I-x", "O", "B-y"], ["O", "B-x"]]
    assert slot_f1(gold, gold) == 1.0
    # a span with the wrong end counts as a miss and a false positive
    pred = [["B-x", "O", "O", "B-y"], ["O", "B-x"]]
    # 3 gold, 3 predicted, 2 correct
    assert slot_f1(gold, pred) == pytest.approx(2 / 3)
    assert slot_f1([["O"]], [["O"]]) == 1.0
    assert slot_f1([["B-x"]], [["O"]]) == 0.0
    with pytest.raises(ValueError):
        slot_f1(gold, pred[:1])


# --------------------------------------------------------------------------- model and training


def test_joint_model_shapes_and_padding_invariance():
    torch.manual_seed(0)
    model = JointBiLSTM(20, 5, 3, embedding_dim=8, hidden=4).eval()
    words = torch.tensor([[3, 4, 5, 0, 0], [6, 7, 8, 9, 10]])
    lengths = torch.tensor([3, 5])
    slots, intents = model(words, lengths)
    assert slots.shape == (2, 5, 5) and intents.shape == (2, 3)
    # the padded tail does not change the first utterance's outputs
    s1, i1 = model(words[:1, :3], lengths[:1])
    assert torch.allclose(slots[0, :3], s1[0], atol=1e-6) and torch.allclose(intents[0], i1[0], atol=1e-6)


def test_joint_loss_trains_and_evaluate_reports_both_metrics():
    data = _tiny()
    torch.manual_seed(0)
    model = JointBiLSTM(20, 5, 3, embedding_dim=8, hidden=8, dropout=0.0)
    batches = atis_batches(data, 8, generator=0)
    assert len(batches) == 3 and sum(b[0].shape[0] for b in batches) == 24
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    with torch.no_grad():
        first = float(joint_loss(model, next(iter(batches))))
    for _ in range(10):
        for batch in batches:
            loss = joint_loss(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        assert float(joint_loss(model, next(iter(batches)))) < first
    scores = evaluate_nlu(model, data)
    assert set(scores) == {"intent_acc", "slot_f1"} and scores["intent_acc"] > 0.5


def test_batches_are_reproducible_and_validate():
    data = _tiny()
    a = [b[0] for b in atis_batches(data, 5, generator=3)]
    b = [b[0] for b in atis_batches(data, 5, generator=3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="batch_size"):
        atis_batches(data, 0)


# --------------------------------------------------------------------------- storage


def test_storage_bytes_matches_module_bytes_and_counts_int8():
    torch.manual_seed(0)
    model = JointBiLSTM(50, 5, 3, embedding_dim=16, hidden=8)
    assert storage_bytes(model) == module_bytes(model)
    lstm_weights = sum(p.numel() for n, p in model.lstm.named_parameters() if "weight" in n)
    lstm_biases = sum(p.numel() for n, p in model.lstm.named_parameters() if "bias" in n)
    report = quantize_rest_(model)
    rec = {r.name: r for r in report.layers}
    assert set(rec) == {"lstm", "slot_head", "intent_head"}
    # int8 weights, fp32 biases, 16 bytes of scale/zero point per quantized tensor (4 in the BiLSTM)
    assert rec["lstm"].bytes_after == lstm_weights + 4 * lstm_biases + 4 * 16
    assert report.bytes_after == storage_bytes(model) < report.bytes_before
    assert report.bytes_after > module_bytes(model.embedding)
    words, lengths = torch.tensor([[2, 3, 4]]), torch.tensor([3])
    slots, intents = model(words, lengths)  # the quantized model still runs
    assert slots.shape == (1, 3, 5)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert len(buf.getvalue()) >= report.bytes_after
    with pytest.raises(ValueError, match="no nn.LSTM"):
        quantize_rest_(nn.Sequential(nn.Embedding(3, 2)))


def test_compressed_embedding_in_the_nlu_model():
    torch.manual_seed(0)
    model = JointBiLSTM(40, 5, 3, embedding_dim=12, hidden=4)
    report = compress_(model, EmbeddingConfig(ratio=0.9, method="pq", num_codebooks=3, codebook_size=4))
    assert report.layers[0].name == "embedding" and report.layers[0].bytes_after <= 0.1 * 40 * 12 * 4
    slots, intents = model(torch.tensor([[2, 3, 0]]), torch.tensor([2]))
    assert slots.shape == (1, 3, 5) and intents.shape == (1, 3)
    quantize_rest_(model)  # both stages compose
    assert storage_bytes(model) == report.layers[0].bytes_after + storage_bytes(
        nn.ModuleList([model.lstm, model.slot_head, model.intent_head])
    )


# --------------------------------------------------------------------------- ATIS


def test_load_atis():
    train, test = _atis_or_skip()
    assert len(train) == 4978 and len(test) == 893
    assert train.vocab[:2] == ["<pad>", "<unk>"] and train.slot_tags[0] == "O"
    assert len(train.intent_names) >= 18 and len(train.slot_tags) >= 130
    assert train.vocab == test.vocab
    # first utterance of train_dev as shipped
    first = [train.vocab[i] for i in train.words[0, : train.lengths[0]].tolist()]
    assert first[:4] == ["i", "want", "to", "fly"]
    assert train.intent_names[int(train.intents[0])] == "atis_flight"
    assert train.slot_tags[int(train.slots[0, 5])] == "B-fromloc.city_name"
    multi = [s for s in test.intent_sets if len(s) > 1]
    assert len(multi) == 15
    # the first label is the target
    i = test.intent_sets.index(multi[0])
    assert test.intent_names[int(test.intents[i])] == multi[0][0]
    # unseen test words map to <unk>
    assert (test.words == 1).any() and not (train.words == 1).any()


def test_load_atis_bad_root(tmp_path):
    with pytest.raises(DataNotFound, match="no ATIS files"):
        load_atis(tmp_path)
