"""The stage frame: registry, compress_, Report, storage counting, save/load through extra state,
and the helpers of stages (finetune, StageInputs, layer_sizes)."""

import copy
import io
import re
import sys
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
from adacomp.stages.frame import StageInputs, finetune, layer_sizes

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


def test_nothing_left_to_compress_says_the_layers_are_already_compressed():
    model = mlp()
    compress_(model, HalfConfig())
    with pytest.raises(ValueError) as err:
        compress_(model, HalfConfig())
    msg = str(err.value)
    assert msg.startswith("no layer selected for stage 'test-half' (supported: nn.Linear)")
    assert "layers '0' (stage 'test-half'), '2' (stage 'test-half') are already compressed" in msg
    with pytest.raises(ValueError, match="filter_fn selected none.*'0' \\(stage 'test-half'\\)"):
        compress_(model, HalfConfig(), filter_fn=lambda m, n: n == "0")
    # a model with nothing compressed says nothing about it
    with pytest.raises(ValueError) as err:
        compress_(nn.Sequential(nn.Embedding(5, 6)), HalfConfig())
    assert "already" not in str(err.value)


def test_headline_is_the_share_of_bytes_removed():
    model = mlp()
    report = compress_(model, HalfConfig())  # fp16: the same elements, half the bytes of the Linears
    assert report.reduction == 0.0 and 0 < report.bytes_reduction == pytest.approx(1 - 1 / report.ratio)
    total = report.table().splitlines()[-1]
    assert f"-{100 * report.bytes_reduction:.1f}% bytes" in total and "% params" not in total


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


# --------------------------------------------------------------------------- finetune, the stages' loop


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]


def _mse(model, batch):
    return (model(batch[0]) - batch[1]).pow(2).mean()


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def test_finetune_is_the_plain_loop_bit_for_bit():
    data = _batches()
    torch.manual_seed(0)
    tuned = mlp()
    plain = copy.deepcopy(tuned)
    out = finetune(tuned, 6, data=data, train_step=_mse, optimizer=_sgd)
    opt = _sgd(list(plain.parameters()))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    losses = []
    for step in range(6):  # data is re-iterated: 4 batches, then the first two again
        loss = _mse(plain, data[step % 4])
        losses.append(float(loss.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    assert out == {"steps": 6, "loss_first": losses[0], "loss_last": losses[-1]}
    assert all(torch.equal(p, q) for p, q in zip(tuned.parameters(), plain.parameters()))
    assert tuned.training


def test_finetune_penalty_on_step_frozen_and_log():
    torch.manual_seed(0)
    model = mlp()
    frozen = list(model[2].parameters())
    kept = [p.detach().clone() for p in frozen]
    given, steps, lines = [], [], []

    def factory(params):
        given.extend(params)
        return torch.optim.Adam(params, lr=1e-2)

    out = finetune(
        model,
        10,
        data=_batches(),
        train_step=_mse,
        optimizer=factory,
        scheduler="constant",
        penalty=lambda m: m[0].weight.pow(2).sum(),
        penalty_weight=0.5,
        penalty_name="l2",
        on_step=steps.append,
        frozen=frozen,
        log=lines.append,
        label="demo",
    )
    assert steps == list(range(10))
    assert [id(p) for p in given] == [id(p) for p in model[0].parameters()]  # trainable ones only
    assert all(torch.equal(p, k) for p, k in zip(frozen, kept)) and all(p.requires_grad for p in frozen)
    assert list(out) == ["steps", "loss_first", "loss_last", "l2_first", "l2_last"]
    assert out["l2_last"] < out["l2_first"]
    assert len(lines) == 5 and all(
        re.fullmatch(rf"  demo step {k}/10: loss \d+\.\d{{4}}, l2 \d+\.\d{{4}}", line)
        for k, line in zip((2, 4, 6, 8, 10), lines)
    )
    lines.clear()
    finetune(model, 1, data=_batches(), train_step=_mse, optimizer=_sgd, log=lines.append, label="")
    assert re.fullmatch(r"  step 1/1: loss \d+\.\d{4}", lines[0])


def test_finetune_errors_give_frozen_parameters_back():
    model = mlp()
    frozen = list(model[2].parameters())
    with pytest.raises(TypeError, match="scalar loss"):
        finetune(model, 3, data=_batches(), train_step=lambda m, b: m(b[0]), optimizer=_sgd, frozen=frozen)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="data yielded no batch"):
        finetune(model, 2, data=[], train_step=_mse, optimizer=_sgd, frozen=frozen)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="scheduler must be"):
        finetune(model, 2, data=_batches(), train_step=_mse, optimizer=_sgd, scheduler="step")
    with pytest.raises(ValueError, match="positive integer"):
        finetune(model, 0, data=_batches(), train_step=_mse, optimizer=_sgd)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize(
    "progress, stream, drawn",
    [
        (False, _Terminal, False),  # never
        (True, io.StringIO, True),  # asked for: drawn on any stderr
        (True, _Terminal, True),
        (None, _Terminal, True),  # compress_'s default: on a terminal only
        (None, io.StringIO, False),
    ],
)
def test_finetune_progress_bar_on_request_or_on_a_terminal(monkeypatch, progress, stream, drawn):
    err = stream()
    monkeypatch.setattr(sys, "stderr", err)
    finetune(mlp(), 3, data=_batches(), train_step=_mse, optimizer=_sgd, label="demo", progress=progress)
    assert ("demo" in err.getvalue()) == drawn


# --------------------------------------------------------------------------- a stage built on the helpers


@dataclass
class TuneConfig:
    """Fine-tune the selected Linear layers (a toy stage on compress_layers and the helpers)."""

    steps: int = 0


@register_stage("test-tune", TuneConfig)
class TuneStage(Stage):
    layer_kinds = "nn.Linear"

    def supports(self, module):
        return type(module) is nn.Linear

    def compress_layers(self, model, config, layers, inputs, info, **kwargs):
        assert isinstance(inputs, StageInputs)
        if config.steps:
            inputs.require_training("steps needs")
        before = layer_sizes(layers)
        if config.steps:
            info["train"] = finetune(
                model,
                config.steps,
                data=inputs.data,
                train_step=inputs.train_step,
                optimizer=inputs.make_optimizer or _sgd,
                log=inputs.log,
                progress=inputs.progress,
            )
        info["progress"] = inputs.progress
        return [
            size.record(model.get_submodule(name), {"tuned": True}, "tuned") for name, size in before.items()
        ]


def test_a_stage_on_compress_layers_and_the_helpers():
    with pytest.raises(ValueError, match=r"steps needs data=<iterable of batches> and train_step=<fn\(model"):
        compress_(mlp(), TuneConfig(steps=2))
    with pytest.raises(UnsupportedLayerError, match="supported: nn.Linear"):
        compress_(
            nn.Sequential(nn.Embedding(5, 6), nn.Linear(6, 3)), TuneConfig(), filter_fn=lambda m, n: True
        )
    model = mlp()
    report = compress_(model, TuneConfig(steps=2), data=_batches(), train_step=_mse, progress=True)
    assert report.info["train"]["steps"] == 2 and report.info["progress"] is True
    rec = report.layers[0]
    assert (rec.name, rec.kind, rec.params_before, rec.params_after, rec.bytes_after) == (
        "0",
        "Linear",
        56,
        56,
        224,
    )
    assert rec.choice == {"tuned": True} and rec.detail == "tuned"
