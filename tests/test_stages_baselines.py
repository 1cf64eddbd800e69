"""adacomp.stages.baselines and benchmarks/baselines.py: the plain-SVD rule leaves small layers
dense, int8 / fp16 bytes are measured on the saved state dict, a stage stacks with int8, and a
``--quick`` run of the low-rank comparison writes every expected row."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from adacomp.stages import LowRankConfig, LowRankLinear, compress_
from adacomp.stages.baselines import (
    fp16_rounded,
    fp16_state_dict,
    mean_se,
    median_seconds,
    plain_svd_config,
    plain_svd_ranks,
    quantize_int8,
    saved_bytes,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "baselines.py")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def _params(layers):
    return sum(p.numel() for m in layers for p in m.parameters())


@pytest.mark.parametrize("ratio", [0.5, 0.7, 0.8])
def test_plain_svd_leaves_the_small_head_dense_and_meets_the_budget(ratio):
    model = _mlp()
    total = _params([model[1], model[3], model[5]])
    ranks = plain_svd_ranks(model, ratio)
    assert set(ranks) == {"1", "3"}  # the 10-output head stays dense
    kept = sum(
        r * (lin.in_features + lin.out_features) + lin.out_features
        for name, r in ranks.items()
        for lin in [model.get_submodule(name)]
    ) + _params([model[5]])
    budget = int((1 - ratio) * total)
    assert kept <= budget and kept > 0.93 * budget  # within one rank step per layer of the budget
    # every large layer keeps about the same share of its weights
    shares = [
        r * (m.in_features + m.out_features) / (m.in_features * m.out_features)
        for name, r in ranks.items()
        for m in [model.get_submodule(name)]
    ]
    assert max(shares) - min(shares) < 0.05
    # the stage's "uniform" strawman cuts the head; the plain rule does not
    uniform = compress_(_mlp(), LowRankConfig(ratio=ratio, method="uniform"))
    assert uniform.info["ranks"].get("5", 10) < 10
    cfg = plain_svd_config(model, ratio, finetune_steps=0)
    assert cfg.method == "fixed" and cfg.ranks == ranks
    report = compress_(model, cfg)
    assert type(model[5]) is nn.Linear and isinstance(model[3], LowRankLinear)
    assert report.params_after == kept  # the whole model is its three layers


def test_plain_svd_small_share_layers_stay_dense_and_errors_are_clear():
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 40), nn.ReLU(), nn.Linear(40, 40))
    # the 40 x 40 layer has enough outputs but holds 0.6 % of the parameters: small by share
    assert set(plain_svd_ranks(model, 0.5)) == {"0", "2"}
    assert set(plain_svd_ranks(model, 0.5, min_share=0.0)) == {"0", "2", "4"}
    assert set(plain_svd_ranks(model, 0.5, min_outputs=41)) == {"0"}  # 40 outputs: now a "head"
    with pytest.raises(ValueError, match="either ratio"):
        plain_svd_ranks(model)
    with pytest.raises(ValueError, match="unreachable"):
        plain_svd_ranks(model, budget=100)


def test_int8_and_fp16_bytes_are_the_saved_state_dict():
    model = _mlp()
    dense = saved_bytes(model)
    weights = 4 * sum(p.numel() for p in model.parameters())
    assert weights < dense < weights + 4096  # tensors plus the file format's overhead
    q = quantize_int8(model)
    assert type(model[1]) is nn.Linear  # not in place
    assert isinstance(q[1], torch.ao.nn.quantized.dynamic.Linear)
    assert dense / 4.2 < saved_bytes(q) < dense / 3.2
    half = fp16_state_dict(model)
    assert all(v.dtype == torch.float16 for v in half.values())
    assert abs(saved_bytes(half) - dense / 2) < 2048
    rounded = fp16_rounded(model)
    assert rounded[1].weight.dtype == torch.float32
    assert torch.equal(rounded[1].weight, model[1].weight.half().float())
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert (q(x) - model(x)).norm() / model(x).norm() < 0.05


def test_a_stage_stacks_with_int8():
    model = _mlp()
    compress_(model, LowRankConfig(method="fixed", ranks={"3": 16}))
    q = quantize_int8(model)
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert isinstance(q[3].first, dynamic) and isinstance(q[3].second, dynamic)
    assert saved_bytes(q) < saved_bytes(model) / 3


def test_mean_se_and_median_seconds():
    m, se = mean_se([1.0, 2.0, 3.0])
    assert m == 2.0 and se == pytest.approx(1.0 / 3**0.5)
    assert mean_se([4.0])[0] == 4.0
    calls = []
    assert median_seconds(lambda: calls.append(1), repeats=7, warmup=2) >= 0 and len(calls) == 9


def test_quick_lowrank_run_writes_every_row(tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--stage", "lowrank", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    got = {(e["setting"], e["variant"]) for e in result["summary"]}
    want = {("-", v) for v in ("dense", "fp16", "int8", "dense + same ft")}
    want |= {
        (f"{r}%", v)
        for r in (50, 70, 80)
        for v in ("bsr", "plain svd", "bsr alloc, plain ft", "bsr + int8", "plain svd + int8")
    }
    assert want <= got
    assert all(e["bytes"] > 0 and 0 <= e["acc"] <= 1 for e in result["summary"])
    by = {(e["setting"], e["variant"]): e for e in result["summary"]}
    assert by[("-", "int8")]["bytes"] < by[("-", "fp16")]["bytes"] < by[("-", "dense")]["bytes"]
    assert by[("80%", "bsr + int8")]["bytes"] < by[("80%", "bsr")]["bytes"]
    assert by[("80%", "bsr")]["latency_b1"] > 0 and by[("80%", "bsr")]["latency_batch"] > 0
    assert "lowrank 80%: bsr - plain svd (acc, paired)" in result["targets"]
    assert "test acc" in proc.stdout and "bytes on disk" in proc.stdout
