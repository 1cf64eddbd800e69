"""The low-rank stage: exact factorization, rank selection, the regulariser, config errors, save/load."""

import copy
import math

import pytest
import torch
from torch import nn

from adacomp import stages
from adacomp.stages import (
    LowRankConfig,
    LowRankConv2d,
    LowRankLinear,
    UnsupportedLayerError,
    compress_,
    factorize,
    modified_stable_rank,
    regularize,
)
from adacomp.stages.lowrank import squared_singular_values, weight_matrix
from adacomp.workloads.models import SmallCNN

# --------------------------------------------------------------------------- factorization


@pytest.mark.parametrize("bias", [True, False])
def test_linear_full_rank_is_exact(bias):
    lin = nn.Linear(20, 7, bias=bias)
    low = factorize(lin, 7)
    assert isinstance(low, LowRankLinear) and low.first.weight.shape == (7, 20)
    x = torch.randn(5, 20)
    torch.testing.assert_close(low(x), lin(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight_matrix(low), lin.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=(3, 2), stride=2, padding=(0, 1), dilation=(1, 2), bias=False),
        dict(kernel_size=3, padding=1, padding_mode="reflect"),
    ],
)
def test_conv_full_rank_is_exact(kw):
    conv = nn.Conv2d(4, 6, **kw)
    full = min(6, 4 * conv.kernel_size[0] * conv.kernel_size[1])
    low = factorize(conv, full)
    assert isinstance(low, LowRankConv2d)
    assert low.first.weight.shape[:2] == (full, 4) and low.second.kernel_size == (1, 1)
    x = torch.randn(2, 4, 9, 8)
    torch.testing.assert_close(low(x), conv(x), rtol=1e-5, atol=1e-5)


def test_truncation_error_is_the_discarded_energy():
    lin = nn.Linear(30, 12)
    s = torch.linalg.svdvals(lin.weight.detach().double())
    for r in (1, 4, 11):
        err = (weight_matrix(factorize(lin, r)).detach().double() - lin.weight.detach().double()).pow(2).sum()
        assert float(err) == pytest.approx(float(s[r:].pow(2).sum()), rel=1e-4)
    with pytest.raises(ValueError, match="rank must lie in"):
        factorize(lin, 13)


# --------------------------------------------------------------------------- the regulariser


def test_modified_stable_rank_on_a_hand_built_matrix():
    w = torch.zeros(4, 5)
    w[0, 0], w[1, 1], w[2, 2] = 3.0, -2.0, 1.0  # singular values 3, 2, 1, 0
    assert float(modified_stable_rank(w, 1)) == pytest.approx((4 + 1) / 9)
    assert float(modified_stable_rank(w, 2)) == pytest.approx(1 / 13)
    assert float(modified_stable_rank(w, 3)) == pytest.approx(0.0, abs=1e-12)
    model = nn.Sequential(nn.Linear(5, 4), nn.Conv2d(1, 2, 1))
    with torch.no_grad():
        model[0].weight.copy_(w)
    value = regularize(model, {"0": 1, "1": None})
    assert float(value.detach()) == pytest.approx(5 / 9, rel=1e-5)
    value.backward()
    # the gradient shrinks the tail (singular values 2 and 1) and grows the head (3)
    g = model[0].weight.grad
    assert g[1, 1] < 0 and g[2, 2] > 0 and g[0, 0] < 0
    assert float(regularize(model, {"0": 4})) == 0.0


@pytest.mark.parametrize("shape", [(7, 30), (30, 7), (12, 12)])
def test_squared_singular_values_match_svdvals_with_gradients(shape):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(squared_singular_values(w), torch.linalg.svdvals(w).square())
    (grad,) = torch.autograd.grad(modified_stable_rank(w, 3), w)
    s2 = torch.linalg.svdvals(w).square()
    (expected,) = torch.autograd.grad(s2[3:].sum() / s2[:3].sum(), w)
    torch.testing.assert_close(grad, expected)


def test_regularize_on_factorized_layer_uses_the_product():
    lin = nn.Linear(9, 6)
    low = factorize(lin, 6)
    model = nn.Sequential(low)
    expected = modified_stable_rank(lin.weight.detach(), 2)
    assert float(regularize(model, {"0": 2}).detach()) == pytest.approx(float(expected), rel=1e-4)


# --------------------------------------------------------------------------- rank selection


def mlp(width=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 16)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def output_match(model, n=256, seed=1):
    """evaluate(model): minus the mean squared distance to the uncompressed model's outputs."""
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(x)

    def evaluate(m):
        with torch.no_grad():
            return -float((m(x) - ref).pow(2).mean())

    return evaluate


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("method", ["bsr", "uniform", "energy"])
def test_methods_meet_the_ratio_within_one_percent(method, ratio):
    model = mlp()
    report = compress_(model, LowRankConfig(ratio=ratio, method=method), evaluate=output_match(model))
    achieved = report.info["selected_reduction"]
    assert ratio - 1e-9 <= achieved <= ratio + 0.01
    assert report.reduction == pytest.approx(achieved)  # every layer of the MLP is selected
    if method == "bsr":
        assert 0 < report.evaluations == report.info["search_evaluations"] <= 150
    else:
        assert report.evaluations == 0


class TwoHeads(nn.Module):
    """Output = a(x) + 0.01 b(x): b barely matters, which only a metric-driven search can see."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.a, self.b = nn.Linear(96, 96), nn.Linear(96, 96)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.a(x) + 0.01 * self.b(x)


def test_bsr_beats_energy_and_uniform_when_layers_matter_unequally():
    scores = {}
    for method in ("bsr", "energy", "uniform"):
        model = TwoHeads()
        evaluate = output_match_two(model)
        report = compress_(model, LowRankConfig(ratio=0.6, method=method), evaluate=evaluate)
        scores[method] = report.metric_after
        if method == "bsr":
            ranks = report.info["ranks"]
            assert ranks.get("a", 96) > ranks["b"]
    assert (
        scores["bsr"] > 2 * scores["energy"] and scores["bsr"] > 2 * scores["uniform"]
    )  # scores are negative


def output_match_two(model):
    x = torch.randn(128, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(x)
    return lambda m: -float((m(x) - ref).pow(2).mean())


def test_layers_above_break_even_stay_dense_and_fixed_ranks_apply():
    model = mlp(width=32)
    report = compress_(model, LowRankConfig(method="fixed", ranks={"0": 3, "2": 31}))  # 31 * 64 > 32 * 32
    assert isinstance(model[0], LowRankLinear) and model[0].rank == 3
    assert type(model[2]) is nn.Linear and type(model[4]) is nn.Linear
    assert report.choices["2"] == {"rank": None, "full_rank": 32}
    with pytest.raises(ValueError, match="not selected: 9"):
        compress_(mlp(width=32), LowRankConfig(method="fixed", ranks={"9": 2}))


def test_unreachable_ratio_raises():
    with pytest.raises(ValueError, match="unreachable"):
        compress_(nn.Sequential(nn.Linear(4, 4)), LowRankConfig(ratio=0.9, method="uniform"))


# --------------------------------------------------------------------------- training phases


def test_regularized_training_then_finetune():
    model = mlp(width=32)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(6))
    y = mlp(width=32, seed=5)(x).detach()
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]

    def train_step(m, batch):
        return (m(batch[0]) - batch[1]).pow(2).mean()

    cfg = LowRankConfig(
        method="fixed",
        ranks={"0": 4, "2": 4},
        regularize_steps=30,
        regularize_weight=1.0,
        finetune_steps=10,
        lr=0.05,
    )
    report = compress_(model, cfg, data=batches, train_step=train_step)
    reg = report.info["regularize"]
    assert reg["msr_last"] < 0.5 * reg["msr_first"]
    assert report.info["finetune"]["steps"] == 10
    assert isinstance(model[0], LowRankLinear) and model[0].rank == 4


def test_training_needs_data_and_a_scalar_loss():
    with pytest.raises(ValueError, match="need data="):
        compress_(mlp(32), LowRankConfig(ratio=0.5, method="uniform", finetune_steps=3))
    with pytest.raises(TypeError, match="scalar loss"):
        compress_(
            mlp(32),
            LowRankConfig(ratio=0.5, method="uniform", finetune_steps=3),
            data=[torch.randn(2, 64)],
            train_step=lambda m, b: m(b),
        )
    with pytest.raises(ValueError, match="pass evaluate="):
        compress_(mlp(32), LowRankConfig(ratio=0.5))


# --------------------------------------------------------------------------- config and layer errors


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(ratio=0.0), r"ratio must lie in \(0, 1\)"),
        (dict(ratio=1.0), r"ratio must lie in \(0, 1\)"),
        (dict(ratio=1.5), r"ratio must lie in \(0, 1\)"),
        (dict(ratio=-0.2), r"ratio must lie in \(0, 1\)"),
        (dict(ratio=True), r"ratio must lie in \(0, 1\)"),
        (dict(), "ratio is required"),
        (dict(ratio=0.5, method="svd"), "method must be one of"),
        (dict(ratio=0.5, ranks={"a": 2}), 'only used by method="fixed"'),
        (dict(method="fixed"), "needs ranks"),
        (dict(method="fixed", ranks={"a": 0}), "positive integers"),
        (dict(ratio=0.5, beam_width=0), "beam_width"),
        (dict(ratio=0.5, rank_grid=()), "rank_grid"),
        (dict(ratio=0.5, rank_grid=(1.0, -2.0)), "rank_grid"),
        (dict(ratio=0.5, finetune_steps=-1), "finetune_steps"),
        (dict(ratio=0.5, regularize_steps=1.5), "regularize_steps"),
        (dict(ratio=0.5, lr=0.0), "lr must be positive"),
        (dict(ratio=0.5, schedule="step"), "schedule must be"),
    ],
)
def test_bad_configs_raise_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        LowRankConfig(**kw)


@pytest.mark.parametrize(
    "layer", [nn.LSTM(4, 4), nn.Embedding(10, 4), nn.Conv2d(4, 4, 3, groups=2), nn.Conv1d(4, 4, 3)]
)
def test_unsupported_layers_under_filter_fn_raise(layer):
    model = nn.Sequential(layer, nn.Linear(4, 4))
    with pytest.raises(UnsupportedLayerError, match=f"layer '0' of kind {type(layer).__name__}"):
        compress_(model, LowRankConfig(ratio=0.5, method="uniform"), filter_fn=lambda m, name: True)
    # without filter_fn, unsupported layers are simply not selected
    report = compress_(copy.deepcopy(model), LowRankConfig(ratio=0.3, method="uniform"))
    assert [r.name for r in report.layers] == ["1"]


# --------------------------------------------------------------------------- save / load


def test_smallcnn_save_load_round_trip(tmp_path):
    model = SmallCNN(image_size=8, channels=(4, 8, 8), hidden=16)
    x = torch.rand(3, 1, 8, 8)
    report = compress_(model, LowRankConfig(ratio=0.5, method="energy"))
    assert any(isinstance(m, (LowRankLinear, LowRankConv2d)) for m in model.modules())
    path = tmp_path / "small.pt"
    torch.save(model.state_dict(), path)
    fresh = stages.load(SmallCNN(image_size=8, channels=(4, 8, 8), hidden=16), path)
    assert fresh.state_dict().keys() == model.state_dict().keys()
    assert torch.equal(fresh(x), model(x))
    assert stages.module_params(fresh) == report.params_after
    with pytest.raises(ValueError, match="shape"):
        stages.load(SmallCNN(image_size=8, channels=(4, 8, 8), hidden=32), path)


def test_unreachable_ratio_states_the_budget_and_what_rank_1_keeps():
    model = mlp(width=32)  # 64 -> 32 -> 32 -> 16: 3,664 parameters
    total = sum(p.numel() for p in model.parameters())
    budget = math.floor((1 - 0.999) * total)
    rank1 = (64 + 32 + 32) + (32 + 32 + 32) + (32 + 16 + 16)  # rank-1 factors plus biases
    with pytest.raises(ValueError) as err:
        compress_(model, LowRankConfig(ratio=0.999, method="energy"))
    msg = str(err.value)
    assert f"budget of {budget:,} of the selected layers' {total:,} parameters" in msg
    assert f"rank 1 in every selected layer keeps {rank1:,}" in msg
    assert f"largest reachable ratio is about {math.floor(1e4 * (1 - rank1 / total)) / 1e4:.4f}" in msg
    with pytest.raises(ValueError, match=f"keeps {rank1:,}"):  # the beam search says the same
        compress_(mlp(width=32), LowRankConfig(ratio=0.999, method="bsr"), evaluate=lambda m: 0.0)
    # the ratio it names is reachable
    largest = math.floor(1e4 * (1 - rank1 / total)) / 1e4
    report = compress_(mlp(width=32), LowRankConfig(ratio=largest, method="energy"))
    assert report.info["ranks"] == {"0": 1, "2": 1, "4": 1}


def test_compressing_again_says_the_layers_are_already_compressed():
    model = mlp(width=32)
    compress_(model, LowRankConfig(ratio=0.5, method="energy"))
    with pytest.raises(ValueError) as err:
        compress_(model, LowRankConfig(ratio=0.5, method="energy"))
    msg = str(err.value)
    assert "no layer selected for stage 'lowrank'" in msg
    assert "'0' (stage 'lowrank'), '2' (stage 'lowrank'), '4' (stage 'lowrank') are already compressed" in msg
    assert "start from the uncompressed model" in msg
