"""Tests for adacomp.workloads.models: output shapes, parameter kinds and sizes, causal masking
of the GPT, the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adacomp.workloads.models import GPT_PRESETS, MODELS, CharGPT, CharLSTM, SmallCNN, build_model, char_gpt


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
    assert set(MODELS) == {"cnn", "lstm", "gpt"}
    cnn = build_model("cnn", image_size=8)
    assert isinstance(cnn, SmallCNN) and cnn(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    lstm = build_model("LSTM", vocab_size=10, hidden=8, layers=1, dropout=0.5)
    assert isinstance(lstm, CharLSTM) and lstm(torch.zeros(1, 4, dtype=torch.long))[0].shape == (
        1,
        4,
        10,
    )
    gpt = build_model("gpt", preset="tiny", vocab_size=11)
    assert isinstance(gpt, CharGPT) and gpt(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 11)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet")


# ------------------------------------------------------------------------------ CharGPT


def test_gpt_shapes_and_backward():
    model = char_gpt("tiny")
    x = torch.randint(32, (3, 16), generator=torch.Generator().manual_seed(0))
    logits = model(x)
    assert logits.shape == (3, 16, 32)
    assert model(x[:, :5]).shape == (3, 5, 32)  # shorter contexts are fine
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple"):
        CharGPT(vocab_size=8, n_embd=30, n_head=4)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gpt_is_causal(dropout):
    """The logits at position t do not depend on the tokens after t (in eval mode, dropout
    off), and the prefix's logits equal those of the prefix alone."""
    model = CharGPT(vocab_size=20, block_size=12, n_layer=2, n_head=4, n_embd=32, dropout=dropout).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(20, (2, 12), generator=gen)
    with torch.no_grad():
        base = model(x)
        for t in (0, 5, 10):
            y = x.clone()
            y[:, t + 1:] = torch.randint(20, y[:, t + 1:].shape, generator=gen)
            out = model(y)
            assert torch.allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-5), t
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-4), t
            assert torch.allclose(model(x[:, :t + 1]), base[:, :t + 1], atol=1e-5), t
    # and the gradient of the loss at position t reaches no later input embedding
    emb = model.tok_emb(x).detach().requires_grad_(True)
    h = emb + model.pos_emb(torch.arange(12))
    for block in model.blocks:
        h = block(h)
    model.head(model.ln_f(h))[:, 4].sum().backward()
    assert emb.grad[:, 5:].abs().max() == 0 and emb.grad[:, :5].abs().max() > 0


def test_gpt_preset_sizes():
    """The "gpt" preset is the issue's GPT shape: 5.8 M parameters in 78 tensors, a 2048 x 256
    token embedding, 6 blocks of attention and a 4x MLP."""
    assert GPT_PRESETS["gpt"] == {"vocab_size": 2048, "block_size": 128, "n_layer": 6,
                                  "n_head": 8, "n_embd": 256}
    model = char_gpt("gpt")
    params = dict(model.named_parameters())
    assert len(params) == 78
    assert sum(p.numel() for p in params.values()) == 5_822_464
    assert params["tok_emb.weight"].shape == (2048, 256)
    assert params["pos_emb.weight"].shape == (128, 256)
    assert params["blocks.5.attn.qkv.weight"].shape == (768, 256)
    assert params["blocks.5.attn.proj.weight"].shape == (256, 256)
    assert params["blocks.0.mlp.0.weight"].shape == (1024, 256)
    assert params["blocks.0.mlp.2.weight"].shape == (256, 1024)
    assert params["head.weight"].shape == (2048, 256) and params["head.bias"].shape == (2048,)
    assert len(model.blocks) == 6
    # per block: 12 tensors; tied head: the head reuses the token embedding (76 tensors)
    tied = char_gpt("gpt", tie_weights=True)
    assert len(list(tied.parameters())) == 76 and tied.head.weight is tied.tok_emb.weight
    assert sum(p.numel() for p in char_gpt("gpt", vocab_size=84).parameters()) == 4_814_932
    assert len(list(char_gpt("tiny").parameters())) == 30
    with pytest.raises(ValueError, match="unknown GPT preset"):
        char_gpt("huge")


# ------------------------------------------------------------------------------ the GPT in the main job


def test_main_job_options_for_the_gpt():
    """``--model gpt`` brings AdamW, its learning rate and the cosine schedule; the default
    job (``make train``: CNN on digits) keeps SGD at 0.05 with a constant rate."""
    from adacomp.workloads.training import lr_factor, parse_args

    default = parse_args([])
    assert (default.model, default.optimizer, default.lr, default.momentum, default.schedule) == (
        "cnn", "sgd", 0.05, 0.9, "constant")
    assert lr_factor(default, 5, 100) == 1.0
    gpt = parse_args(["--model", "gpt", "--data", "shakespeare"])
    assert (gpt.optimizer, gpt.lr, gpt.schedule, gpt.gpt_preset) == ("adamw", 1e-3, "cosine", "gpt")
    factors = [lr_factor(gpt, s, 200) for s in range(200)]
    assert factors[0] == pytest.approx(1 / 20) and max(factors) == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1, abs=1e-3) and factors[19] == 1.0
    assert parse_args(["--model", "lstm", "--data", "shakespeare"]).optimizer == "sgd"
    assert parse_args(["--model", "gpt", "--data", "shakespeare", "--lr", "0.01"]).lr == 0.01


@pytest.mark.parametrize("argv", [["--model", "gpt"],  # digits by default: image data
                                  ["--model", "gpt", "--data", "shakespeare", "--seq-len", "129"]])
def test_main_job_rejects_bad_gpt_settings(argv, capsys):
    from adacomp.workloads.training import parse_args

    with pytest.raises(SystemExit):
        parse_args(argv)
    err = capsys.readouterr().err
    assert "does not fit" in err or "block size" in err


def test_main_job_trains_the_gpt(tmp_path, shakespeare):
    """launch/train.py --model gpt: a few steps of the tiny preset on Shakespeare, dense and
    AdaComp, one process."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "gpt.json"
    proc = subprocess.run([sys.executable, os.path.join(root, "launch", "train.py"), "--model", "gpt",
                           "--data", "shakespeare", "--gpt-preset", "tiny", "--seq-len", "16",
                           "--max-chars", "20000", "--max-steps", "6", "--batch-size", "4",
                           "--compressor", "none", "adacomp", "--plot", "", "--quiet", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=root,
                          env=dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT="29617"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gpt on shakespeare" in proc.stdout
    res = json.loads(out.read_text())
    assert res["args"]["optimizer"] == "adamw" and res["args"]["schedule"] == "cosine"
    for run in res["runs"]:
        assert run["steps"] == 6 and 0 < run["metrics"]["val_loss"] < 10
