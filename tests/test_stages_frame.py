"""The stage frame: registry, compress_, Report, storage counting, save/load through extra state."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from adacomp import stages
from adacomp.stages import (
    EXTRA_STATE_KEY,
    LayerRecord,
    LowRankConfig,
    Stage,
    UnsupportedLayerError,
    compress_,
    config_from_dict,
    get_stage,
    module_bytes,
    module_params,
    register_stage,
)

# --------------------------------------------------------------------------- a toy stage


@dataclass
class HalfConfig:
    """Store the selected Linear layers in fp16 (a toy stage that swaps modules)."""

    scale: float = 1.0

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale}")


class HalfLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().half(), requires_grad=False)
        self.bias = nn.Parameter(linear.bias.detach().half(), requires_grad=False)

    def forward(self, x):
        return nn.functional.linear(x, self.weight.float(), self.bias.float())

    def get_extra_state(self):
        return {EXTRA_STATE_KEY: "test-half", "kind": "Linear"}

    def set_extra_state(self, state):
        assert state["kind"] == "Linear"


@register_stage("test-half", HalfConfig)
class HalfStage(Stage):
    def supports(self, module):
        return type(module) is nn.Linear

    def supported_kinds(self):
        return "nn.Linear"

    def apply(self, model, config, *, layers, evaluate=None, info=None, **kwargs):
        records = []
        for name, module in layers.items():
            if evaluate is not None:
                evaluate(model)  # a stage's own scoring call, counted in the report
            new = HalfLinear(module)
            model.set_submodule(name, new)
            records.append(
                LayerRecord(
                    name,
                    "Linear",
                    module_params(module),
                    module_params(new),
                    module_bytes(module),
                    module_bytes(new),
                    {"dtype": "fp16"},
                    "fp16",
                )
            )
        info["touched"] = len(records)
        return records

    def rebuild(self, module, extra_state):
        return HalfLinear(module)


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


# --------------------------------------------------------------------------- registry


def test_registry_dispatches_on_config_type():
    assert get_stage(HalfConfig()).name == "test-half"
    assert get_stage("lowrank").config_type is LowRankConfig
    assert "lowrank" in stages.stages() and "test-half" in stages.stages()


def test_unknown_config_and_stage_raise():
    @dataclass
    class Nope:
        x: int = 0

    with pytest.raises(TypeError, match="not a registered stage config"):
        compress_(mlp(), Nope())
    with pytest.raises(KeyError, match="unknown stage 'nope'"):
        get_stage("nope")


def test_register_rejects_duplicates_and_non_dataclasses():
    with pytest.raises(ValueError, match="already registered"):

        @register_stage("test-half", LowRankConfig)
        class Other(Stage):
            pass

    with pytest.raises(TypeError, match="must be a dataclass"):
        register_stage("x", dict)


def test_config_from_dict_names_unknown_fields():
    assert config_from_dict("test-half", {"scale": 2.0}).scale == 2.0
    with pytest.raises(ValueError, match="unknown field.*bogus.*fields: scale"):
        config_from_dict("test-half", {"bogus": 1})


# --------------------------------------------------------------------------- compress_ and report


def test_compress_report_counts_layers_totals_and_evaluations():
    model = mlp()
    calls = []

    def evaluate(m):
        calls.append(1)
        return 0.5

    report = compress_(model, HalfConfig(), evaluate=evaluate)
    assert isinstance(model[0], HalfLinear) and isinstance(model[2], HalfLinear)
    assert [r.name for r in report.layers] == ["0", "2"]
    assert report.layers[0].params_before == report.layers[0].params_after == 6 * 8 + 8
    assert report.layers[0].bytes_before == 4 * 56 and report.layers[0].bytes_after == 2 * 56
    assert report.params_before == report.params_after == 56 + 27
    assert report.bytes_before == 4 * 83 and report.bytes_after == 2 * 83
    assert report.ratio == pytest.approx(2.0) and report.reduction == 0.0
    assert report.evaluations == 2 and len(calls) == 4  # 2 by the stage, before and after by the frame
    assert report.metric_before == report.metric_after == 0.5
    assert report.info == {"touched": 2}
    text = str(report)
    assert "test-half" in text and "total (model)" in text and "2.00x" in text and "0.5000 -> 0.5000" in text
    d = report.to_dict()
    assert d["ratio"] == pytest.approx(2.0) and d["layers"][1]["choice"] == {"dtype": "fp16"}


def test_filter_fn_restricts_and_rejects_unsupported_layers():
    model = nn.Sequential(nn.Embedding(5, 6), nn.Linear(6, 8), nn.Linear(8, 3))
    report = compress_(model, HalfConfig(), filter_fn=lambda m, name: name == "2")
    assert [r.name for r in report.layers] == ["2"] and type(model[1]) is nn.Linear
    with pytest.raises(UnsupportedLayerError, match="layer '0' of kind Embedding.*supported: nn.Linear"):
        compress_(
            nn.Sequential(nn.Embedding(5, 6), nn.Linear(6, 8)), HalfConfig(), filter_fn=lambda m, n: True
        )


def test_nothing_selected_and_root_layer_raise():
    with pytest.raises(ValueError, match="no layer selected"):
        compress_(nn.Sequential(nn.Embedding(5, 6)), HalfConfig())
    with pytest.raises(ValueError, match="single layer"):
        compress_(nn.Linear(3, 3), HalfConfig())


def test_storage_counts_buffers_dtypes_and_shared_tensors_once():
    bn = nn.BatchNorm1d(4)  # 8 params + running mean/var (4 + 4) + num_batches_tracked (int64)
    assert module_params(bn) == 8 + 8 + 1
    assert module_bytes(bn) == 4 * 16 + 8
    shared = nn.Linear(3, 3)
    tied = nn.Sequential(shared, shared)
    assert module_params(tied) == 12
    assert module_bytes(nn.Linear(3, 3).half()) == 2 * 12


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip_rebuilds_swapped_modules(tmp_path):
    model = mlp()
    compress_(model, HalfConfig())
    path = tmp_path / "half.pt"
    torch.save(model.state_dict(), path)
    assert torch.load(path, weights_only=True)["0._extra_state"][EXTRA_STATE_KEY] == "test-half"
    fresh = stages.load(mlp(), path)
    assert isinstance(fresh[0], HalfLinear) and fresh[0].weight.dtype == torch.float16
    x = torch.randn(4, 6)
    assert torch.equal(fresh(x), model(x))


def test_load_plain_state_dict_and_missing_layer(tmp_path):
    model = mlp()
    fresh = stages.load(mlp(), model.state_dict())
    assert torch.equal(fresh[0].weight, model[0].weight)
    compress_(model, HalfConfig())
    with pytest.raises(KeyError, match="lacks"):
        stages.load(nn.Sequential(nn.Linear(6, 8)), model.state_dict())
