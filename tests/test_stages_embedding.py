"""Tests of the embedding stage: bit packing, byte accounting, drop-in replacement, configs, training."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adacomp.stages import (
    EmbeddingConfig,
    LowRankEmbedding,
    PQEmbedding,
    UnsupportedLayerError,
    compress_,
    config_from_dict,
    load,
    module_bytes,
)
from adacomp.stages.embedding import choose_codes, pack_codes, pq_bytes, unpack_codes

V, D = 60, 12


class Tagger(nn.Module):
    """A tiny model around an embedding: mean of token vectors -> linear."""

    def __init__(self, bag: bool = False, padding_idx: int | None = 0, classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        if bag:
            self.embedding = nn.EmbeddingBag(V, D, mode="mean", padding_idx=padding_idx)
        else:
            self.embedding = nn.Embedding(V, D, padding_idx=padding_idx)
        self.head = nn.Linear(D, classes)
        self.bag = bag

    def forward(self, x):
        h = self.embedding(x) if self.bag else self.embedding(x).mean(1)
        return self.head(h)


def _serialized_tensor_bytes(module: nn.Module) -> int:
    return sum(
        v.numel() * v.element_size() for v in module.state_dict().values() if isinstance(v, torch.Tensor)
    )


# --------------------------------------------------------------------------- bit packing


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, n, seed):
    rng = np.random.default_rng(seed)
    codes = torch.from_numpy(rng.integers(0, 1 << bits, size=n))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, torch.arange(n)), codes)
    pick = torch.from_numpy(rng.integers(0, n, size=7))
    assert torch.equal(unpack_codes(packed, bits, pick), codes[pick])


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_codes(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.tensor([0]), 9)


def test_pq_module_codes_round_trip():
    emb = nn.Embedding(V, D)
    codes = torch.randint(0, 8, (V, 4))
    books = torch.randn(4, 8, 3)
    pq = PQEmbedding.from_codes(emb, codes, books, "float32")
    assert torch.equal(pq.code_matrix(), codes)
    expected = torch.cat([books[m, codes[:, m]] for m in range(4)], dim=1)
    assert torch.equal(pq.rows(torch.arange(V)), expected)


# --------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("method", ["pq", "svd", "int8"])
def test_stored_bytes_equal_serialized_size(method):
    model = Tagger()
    ratio = 0.6 if method == "int8" else 0.9
    report = compress_(model, EmbeddingConfig(ratio=ratio, method=method))
    new = model.embedding
    rec = report.layers[0]
    assert rec.bytes_before == V * D * 4
    assert rec.bytes_after == module_bytes(new) == _serialized_tensor_bytes(new)
    assert rec.bytes_after <= math.floor((1 - ratio) * V * D * 4)
    # the numbers the formulae promise
    if method == "pq":
        m, k = rec.choice["num_codebooks"], rec.choice["codebook_size"]
        assert (
            rec.bytes_after == pq_bytes(V, D, m, k, 2) == math.ceil(V * m * int(math.log2(k)) / 8) + k * D * 2
        )
        raw = new.codes.numpy().tobytes() + new.codebooks.numpy().tobytes()
        assert len(raw) == rec.bytes_after
    elif method == "svd":
        assert rec.bytes_after == rec.choice["rank"] * (V + D) * 2
    else:
        assert rec.bytes_after == V * D + 4 * V
    # a checkpoint holds those tensors and no dense table
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert "embedding.weight" not in state


def test_choose_codes_meets_budget_and_prefers_lower_error():
    torch.manual_seed(1)
    table = torch.randn(V, D)
    cfg = EmbeddingConfig(ratio=0.8, method="pq", float_dtype="float32")
    budget = math.floor(0.2 * V * D * 4)
    m, k, cands = choose_codes(table, budget, cfg)
    assert all(pq_bytes(V, D, c["num_codebooks"], c["codebook_size"], 4) <= budget for c in cands)
    assert (m, k) == min(
        ((c["num_codebooks"], c["codebook_size"]) for c in cands),
        key=lambda mk: next(c["error"] for c in cands if (c["num_codebooks"], c["codebook_size"]) == mk),
    )
    # each K uses the largest M that fits
    for c in cands:
        bigger = [mm for mm in range(c["num_codebooks"] + 1, D + 1) if D % mm == 0]
        assert all(pq_bytes(V, D, mm, c["codebook_size"], 4) > budget for mm in bigger)


# --------------------------------------------------------------------------- drop-in replacement


@pytest.mark.parametrize("method", ["pq", "svd", "int8"])
def test_drop_in_embedding(method):
    model = Tagger()
    x = torch.randint(0, V, (5, 7))
    x[:, -2:] = 0  # padding
    before = model(x)
    compress_(model, EmbeddingConfig(ratio=0.6, method=method, float_dtype="float32"))
    emb = model.embedding
    out = emb(x)
    assert out.shape == (5, 7, D) and out.dtype == torch.float32
    assert torch.all(out[:, -2:] == 0)  # padding index decodes to zeros
    assert model(x).shape == before.shape
    # decoded rows are an approximation of the table: closer than a zero table
    dense = Tagger().embedding.weight.detach()
    err = (emb.weight_matrix() - dense)[1:].pow(2).sum()
    assert err < 0.9 * dense[1:].pow(2).sum()
    if method == "int8":  # 8 bits are nearly exact
        assert torch.allclose(emb.weight_matrix()[1:], dense[1:], atol=dense.abs().max() / 127)


def test_drop_in_embedding_bag_matches_functional():
    model = Tagger(bag=True)
    compress_(model, EmbeddingConfig(ratio=0.7, method="pq"))
    emb = model.embedding
    inp = torch.tensor([3, 0, 7, 7, 12, 0, 5])
    offsets = torch.tensor([0, 3, 5])
    table = emb.weight_matrix()
    expected = F.embedding_bag(inp, table, offsets, mode="mean", padding_idx=0)
    assert torch.allclose(emb(inp, offsets), expected, atol=1e-6)
    # 2-D input without offsets and per-sample weights in sum mode
    emb.mode = "sum"
    w = torch.rand(7)
    assert torch.allclose(
        emb(inp, offsets, per_sample_weights=w),
        F.embedding_bag(inp, table, offsets, mode="sum", per_sample_weights=w, padding_idx=0),
        atol=1e-6,
    )
    assert emb(torch.tensor([[1, 2], [0, 0]])).shape == (2, D)


def test_svd_is_exact_at_the_table_rank():
    emb = nn.Embedding(V, D)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(V, 2) @ torch.randn(2, D))
    model = nn.Sequential(emb)
    dense = emb.weight.detach().clone()
    report = compress_(model, EmbeddingConfig(ratio=0.5, method="svd", float_dtype="float32"))
    assert report.layers[0].choice["rank"] == math.floor(0.5 * V * D * 4) // (
        (V + D) * 4
    )  # largest in budget
    assert torch.allclose(model[0].weight_matrix(), dense, atol=1e-4)
    small = nn.Sequential(nn.Embedding(V, D))
    small[0].weight.data.copy_(dense)
    compress_(small, EmbeddingConfig(ratio=0.5, method="svd", rank=2, float_dtype="float32"))
    assert small[0].rank == 2
    assert torch.allclose(small[0].weight_matrix(), dense, atol=1e-4)


@pytest.mark.parametrize("method", ["pq", "svd", "int8", "task_aware"])
def test_save_and_load_round_trip(tmp_path, method):
    model = Tagger()
    data = [(torch.randint(1, V, (8, 5)), torch.randint(0, 3, (8,))) for _ in range(3)]
    compress_(
        model,
        EmbeddingConfig(
            ratio=0.6 if method == "int8" else 0.9, method=method, steps=4 if method == "task_aware" else 0
        ),
        data=data,
        train_step=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
    )
    path = tmp_path / "small.pt"
    torch.save(model.state_dict(), path)
    fresh = load(Tagger(), path)
    x = torch.randint(0, V, (4, 6))
    assert torch.equal(fresh(x), model(x))
    assert type(fresh.embedding) is type(model.embedding)


# --------------------------------------------------------------------------- task-aware training


def test_task_aware_learns_with_the_task_loss():
    """k-means spends its 2 codes on a large nuisance direction; codes learned on the task do not."""
    torch.manual_seed(0)
    ids = torch.randint(1, V, (512, 4))
    label = torch.arange(V) % 2
    target = label[ids[:, 0]]  # class given by the first token

    class FirstToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(V, D, padding_idx=0)
            self.head = nn.Linear(D, 2)

        def forward(self, x):
            return self.head(self.embedding(x)[:, 0])

    base = FirstToken()
    with torch.no_grad():
        w = torch.randn(V, D) * 0.05
        w[:, 0] = torch.randn(V) * 5  # nuisance direction, large variance
        w[:, 1] = 2 * label - 1.0  # the task's direction, small variance
        w[0] = 0
        base.embedding.weight.copy_(w)
        base.head.weight.zero_()
        base.head.weight[:, 1] = torch.tensor([-4.0, 4.0])
        base.head.bias.zero_()
    data = [(ids[i : i + 64], target[i : i + 64]) for i in range(0, 512, 64)]

    def step(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    def acc(m):
        return float((m(ids).argmax(1) == target).float().mean())

    assert acc(base) == 1.0
    results = {}
    for method, steps in (("pq", 0), ("task_aware", 120)):
        model = FirstToken()
        model.load_state_dict(base.state_dict())
        report = compress_(
            model,
            EmbeddingConfig(
                ratio=0.9,
                method=method,
                steps=steps,
                train_rest=False,
                num_codebooks=1,
                codebook_size=2,
                float_dtype="float32",
            ),
            data=data,
            train_step=step,
            evaluate=acc,
        )
        results[method] = report.metric_after
        assert isinstance(model.embedding, PQEmbedding)
        if method == "task_aware":
            assert report.layers[0].choice["changed_codes"] > 0.1
            assert report.info["train"]["loss_last"] < report.info["train"]["loss_first"]
            assert torch.equal(model.head.weight, base.head.weight)  # train_rest=False froze it
            assert all(p.requires_grad for p in model.parameters())  # and gave it back trainable
    assert results["pq"] < 0.7
    assert results["task_aware"] > 0.95


def test_post_hoc_fine_tuning_keeps_table_frozen():
    data = [(torch.randint(1, V, (8, 5)), torch.randint(0, 3, (8,))) for _ in range(2)]
    tuned, plain = Tagger(), Tagger()
    compress_(
        tuned,
        EmbeddingConfig(ratio=0.9, method="svd", steps=3),
        data=data,
        train_step=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
    )
    compress_(plain, EmbeddingConfig(ratio=0.9, method="svd"))
    assert isinstance(tuned.embedding, LowRankEmbedding)
    assert torch.equal(tuned.embedding.left, plain.embedding.left)  # the table did not train
    assert torch.equal(tuned.embedding.right, plain.embedding.right)
    assert not torch.equal(tuned.head.weight, plain.head.weight)  # the rest did


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 1.0}, "ratio must lie"),
        ({"ratio": True}, "ratio must lie"),
        ({"method": "kmeans"}, "method must be one of"),
        ({"method": "pq", "codebook_size": 6}, "power of two"),
        ({"method": "pq", "codebook_size": 512}, "power of two"),
        ({"method": "svd", "num_codebooks": 4}, "num_codebooks/codebook_size are for"),
        ({"method": "pq", "rank": 3}, "rank is only used"),
        ({"method": "task_aware", "steps": 0}, "needs steps >= 1"),
        ({"method": "pq", "steps": 5, "train_rest": False}, "train_rest must be True"),
        ({"float_dtype": "bfloat16"}, "float_dtype"),
        ({"lr": 0}, "lr must be a positive"),
        ({"steps": -1}, "steps must be"),
    ],
)
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EmbeddingConfig(**kwargs)


def test_config_defaults_and_cli_dict():
    assert EmbeddingConfig().steps == 300 and EmbeddingConfig(method="pq").steps == 0
    cfg = config_from_dict("embedding", {"ratio": 0.95, "method": "svd"})
    assert isinstance(cfg, EmbeddingConfig) and cfg.ratio == 0.95
    with pytest.raises(ValueError, match="unknown field"):
        config_from_dict("embedding", {"ratios": 0.9})


def test_errors_at_apply_time():
    with pytest.raises(ValueError, match="int8 needs"):
        compress_(Tagger(), EmbeddingConfig(ratio=0.9, method="int8"))
    with pytest.raises(ValueError, match="pass data="):
        compress_(Tagger(), EmbeddingConfig(ratio=0.9, method="task_aware"))
    with pytest.raises(ValueError, match="must divide"):
        compress_(Tagger(), EmbeddingConfig(ratio=0.5, method="pq", num_codebooks=5))
    with pytest.raises(ValueError, match="no codes fit"):
        compress_(Tagger(), EmbeddingConfig(ratio=0.995, method="pq", float_dtype="float32"))
    with pytest.raises(ValueError, match="over the budget"):
        compress_(Tagger(), EmbeddingConfig(ratio=0.99, method="svd", rank=5))
    with pytest.raises(UnsupportedLayerError, match="nn.Embedding"):
        compress_(Tagger(), EmbeddingConfig(ratio=0.9, method="pq"), filter_fn=lambda m, n: n == "head")
    model = Tagger()
    model.embedding.max_norm = 1.0
    with pytest.raises(ValueError, match="max_norm"):
        compress_(model, EmbeddingConfig(ratio=0.9, method="pq"))
    model = Tagger()
    compress_(model, EmbeddingConfig(ratio=0.9, method="pq"))
    with pytest.raises(TypeError, match="only the index tensor"):
        model.embedding(torch.tensor([[1]]), torch.tensor([0]))


def test_load_into_a_mismatched_model_raises(tmp_path):
    model = Tagger()
    compress_(model, EmbeddingConfig(ratio=0.9, method="svd"))
    path = tmp_path / "small.pt"
    torch.save(model.state_dict(), path)
    other = Tagger()
    other.embedding = nn.Embedding(V + 1, D)
    with pytest.raises(ValueError, match="table shape"):
        load(other, path)
    other.embedding = nn.Linear(D, V)
    with pytest.raises(TypeError, match="compressed Embedding"):
        load(other, path)
    state = torch.load(path, weights_only=True)
    fresh = Tagger()
    fresh.embedding = LowRankEmbedding(fresh.embedding, model.embedding.rank + 1)
    with pytest.raises(ValueError, match="does not match"):
        fresh.load_state_dict(state, strict=False)


def test_headline_reports_the_bytes_the_table_shows():
    # packed codes: one uint8 element holds several codes, so elements and bytes fall differently
    model = Tagger()
    report = compress_(model, EmbeddingConfig(ratio=0.9, method="pq"))
    assert report.reduction != pytest.approx(report.bytes_reduction, abs=1e-3)
    total = str(report).splitlines()[-1]
    assert total.startswith("total (model)") and f"-{100 * report.bytes_reduction:.1f}% bytes" in total
    assert report.bytes_reduction == pytest.approx(1 - 1 / report.ratio)
    assert report.to_dict()["bytes_reduction"] == report.bytes_reduction
