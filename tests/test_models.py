"""Tests for adacomp.workloads.models: output shapes, parameter kinds and sizes, the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adacomp.workloads.models import MODELS, CharLSTM, SmallCNN, build_model


def _kinds(model: nn.Module) -> dict[str, list[torch.Size]]:
    kinds: dict[str, list[torch.Size]] = {"conv": [], "linear": [], "bias": [], "other": []}
    for name, p in model.named_parameters():
        if name.endswith("bias") or "bias" in name.rsplit(".", 1)[-1]:
            kinds["bias"].append(p.shape)
        elif p.dim() == 4:
            kinds["conv"].append(p.shape)
        elif p.dim() == 2:
            kinds["linear"].append(p.shape)
        else:
            kinds["other"].append(p.shape)
    return kinds


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (1, 8), (3, 32)])
def test_cnn_output_shape_and_backward(channels, size):
    gen = torch.Generator().manual_seed(0)
    model = SmallCNN(in_channels=channels, num_classes=10, image_size=size)
    x = torch.rand(5, channels, size, size, generator=gen)
    logits = model(x)
    assert logits.shape == (5, 10)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


def test_cnn_parameter_kinds_and_sizes():
    model = SmallCNN(in_channels=1, num_classes=10, image_size=28)
    kinds = _kinds(model)
    assert len(kinds["conv"]) == 3 and len(kinds["linear"]) == 2
    assert len(kinds["bias"]) == 5 and not kinds["other"]
    assert all(len(s) == 1 for s in kinds["bias"])
    # convolutions after the first have thousands of weights; fc1 has > 100k
    assert all(s.numel() >= 10_000 for s in kinds["conv"][1:])
    assert kinds["linear"][0] == (128, 64 * 7 * 7)
    assert kinds["linear"][0].numel() >= 100_000
    assert kinds["linear"][1] == (10, 128)


def test_cnn_rejects_wrong_image_size():
    with pytest.raises(ValueError, match="8x8"):
        SmallCNN(image_size=8)(torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError):
        SmallCNN(image_size=3)


def test_lstm_shapes_and_state():
    model = CharLSTM(vocab_size=84, embed=16, hidden=32, layers=2)
    x = torch.randint(84, (3, 7), generator=torch.Generator().manual_seed(0))
    logits, (h, c) = model(x)
    assert logits.shape == (3, 7, 84)
    assert h.shape == c.shape == (2, 3, 32)
    # carrying the state equals running the concatenated sequence
    first, state = model(x[:, :4])
    second, _ = model(x[:, 4:], (state[0].detach(), state[1].detach()))
    assert torch.allclose(torch.cat([first, second], 1), logits, atol=1e-6)
    zero = model.init_state(3)
    assert torch.equal(model(x, zero)[0], logits)


def test_lstm_parameter_kinds():
    model = CharLSTM(vocab_size=84)
    names = dict(model.named_parameters())
    assert names["embedding.weight"].shape == (84, 64)
    assert names["lstm.weight_ih_l0"].shape == (4 * 256, 64)
    assert names["lstm.weight_hh_l1"].shape == (4 * 256, 256)
    assert names["lstm.bias_ih_l1"].shape == (4 * 256,)
    assert names["decoder.weight"].shape == (84, 256)
    assert names["decoder.bias"].shape == (84,)
    assert model.lstm.batch_first and model.lstm.num_layers == 2


def test_build_model_registry():
    assert set(MODELS) == {"cnn", "lstm"}
    cnn = build_model("cnn", image_size=8)
    assert isinstance(cnn, SmallCNN) and cnn(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    lstm = build_model("LSTM", vocab_size=10, hidden=8, layers=1, dropout=0.5)
    assert isinstance(lstm, CharLSTM) and lstm(torch.zeros(1, 4, dtype=torch.long))[0].shape == (
        1,
        4,
        10,
    )
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet")
