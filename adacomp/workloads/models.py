"""Models used by the adacomp training scripts and benchmarks.

* :class:`SmallCNN`: an image classifier with 4-D convolution weights, 2-D linear weights and
  1-D biases, sized so that the gradients are big enough to be worth compressing (about 0.46 M
  parameters for 28x28 inputs, with a 401 k-weight fully connected layer).
* :class:`CharLSTM`: a character language model (embedding, multi-layer LSTM, decoder).
* :class:`CharGPT`: a GPT-style decoder-only transformer for next-token prediction (token
  and learned position embeddings, pre-LayerNorm blocks of causal self-attention and a 4x
  GELU MLP). :data:`GPT_PRESETS` holds its sizes: ``"gpt"`` (5.82 M parameters in 78
  tensors) and ``"tiny"`` (for tests); :func:`char_gpt` builds one.

:func:`build_model` builds any of them by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT_PRESETS", "MODELS", "CharGPT", "CharLSTM", "SmallCNN", "accuracy", "build_model", "char_gpt"]


class SmallCNN(nn.Module):
    """A small convolutional classifier for ``N x C x H x W`` images.

    Layout: ``conv3x3(C->c1) -> relu -> conv3x3(c1->c2) -> relu -> maxpool2 ->
    conv3x3(c2->c3) -> relu -> maxpool2 -> flatten -> linear(->hidden) -> relu ->
    linear(->num_classes)``. Convolutions are padded, so the spatial size after the two pools
    is ``image_size // 4`` and the first linear layer has ``c3 * (image_size // 4) ** 2``
    inputs: with the defaults that is 3136 x 128 = 401408 weights for 28x28 images and
    256 x 128 for 8x8 digits.

    Args:
        in_channels: image channels ``C``.
        num_classes: number of output logits.
        image_size: height and width of the (square) input images, at least 4.
        channels: output channels of the three convolutions.
        hidden: width of the hidden fully connected layer.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        channels: tuple[int, int, int] = (32, 64, 64),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"image_size must be at least 4, got {image_size}")
        c1, c2, c3 = channels
        self.image_size = image_size
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c3 * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``N x num_classes`` logits for ``N x C x image_size x image_size`` images."""
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(
                f"SmallCNN was built for {self.image_size}x{self.image_size} images, "
                f"got {tuple(x.shape[-2:])}"
            )
        return self.classifier(self.features(x))


LSTMState = tuple[torch.Tensor, torch.Tensor]


class CharLSTM(nn.Module):
    """A character-level language model: embedding -> LSTM -> linear decoder.

    Args:
        vocab_size: number of distinct tokens.
        embed: embedding width.
        hidden: LSTM hidden size.
        layers: number of stacked LSTM layers.
        dropout: dropout between LSTM layers and before the decoder (0 disables it).
    """

    def __init__(
        self,
        vocab_size: int,
        embed: int = 64,
        hidden: int = 256,
        layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden = hidden
        self.layers = layers
        self.embedding = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(
            embed,
            hidden,
            num_layers=layers,
            batch_first=True,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden, vocab_size)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> LSTMState:
        """Return a zero ``(h, c)`` state, each ``layers x batch_size x hidden``."""
        weight = self.decoder.weight
        shape = (self.layers, batch_size, self.hidden)
        return (
            torch.zeros(shape, dtype=weight.dtype, device=device or weight.device),
            torch.zeros(shape, dtype=weight.dtype, device=device or weight.device),
        )

    def forward(
        self, x: torch.Tensor, state: LSTMState | None = None
    ) -> tuple[torch.Tensor, LSTMState]:
        """Map ``B x T`` token ids to ``B x T x vocab_size`` logits and the new ``(h, c)``.

        Pass the returned state (detached) to the next call for truncated BPTT.
        """
        out, state = self.lstm(self.embedding(x), state)
        return self.decoder(self.drop(out)), state


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position ``t`` attends to positions ``<= t`` only.

    One fused ``qkv`` projection (``n_embd -> 3 n_embd``) and one output projection
    (``n_embd -> n_embd``), both with bias. Input and output are ``B x T x n_embd``.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x T x C`` -> ``B x T x C``."""
        b, t, c = x.shape
        # B x T x 3C -> three B x H x T x C/H
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class GPTBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` with
    ``mlp = linear(C -> 4C) -> GELU -> linear(4C -> C)``. ``B x T x C`` -> ``B x T x C``;
    12 parameter tensors (two LayerNorms and four linear layers, weights and biases)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """A GPT-style (decoder-only) transformer language model.

    Layout: ``tok_emb (vocab_size x n_embd) + pos_emb (block_size x n_embd) -> dropout ->
    n_layer x GPTBlock -> LayerNorm -> head (n_embd -> vocab_size)``. The head is a separate
    linear layer with bias, or, with ``tie_weights``, reuses ``tok_emb.weight`` (no bias).
    Parameter tensors: ``12 n_layer + 6`` untied, ``12 n_layer + 4`` tied. Weights are
    initialised as GPT-2's: normal(0, 0.02), the residual output projections scaled by
    ``1 / sqrt(2 n_layer)``, biases zero.

    Args:
        vocab_size: number of distinct tokens (characters for character-level models).
        block_size: longest context; inputs may be shorter.
        n_layer: number of transformer blocks.
        n_head: attention heads per block; must divide ``n_embd``.
        n_embd: model width ``C``.
        dropout: dropout on the embeddings, attention weights and residual branches.
        tie_weights: share the token embedding with the output head.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 128,
        n_layer: int = 6,
        n_head: int = 8,
        n_embd: int = 256,
        dropout: float = 0.0,
        tie_weights: bool = False,
    ) -> None:
        super().__init__()
        if min(vocab_size, block_size, n_layer, n_head, n_embd) < 1:
            raise ValueError("vocab_size, block_size, n_layer, n_head and n_embd must be positive")
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(GPTBlock(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=not tie_weights)
        if tie_weights:
            self.head.weight = self.tok_emb.weight
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                residual_out = name.endswith(("attn.proj.weight", "mlp.2.weight"))
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer) if residual_out else 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``B x T`` token ids (``T <= block_size``) to ``B x T x vocab_size`` logits;
        the logits at position ``t`` depend on ``x[:, :t + 1]`` only."""
        t = x.shape[-1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        pos = torch.arange(t, device=x.device)
        h = self.drop(self.tok_emb(x) + self.pos_emb(pos))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


GPT_PRESETS: dict[str, dict] = {
    # The "GPT-shaped transformer, 5.8M parameters in 78 tensors, embedding 2048 x 256":
    # a 2048-token vocabulary (the 2048 x 256 token embedding and an untied 256 -> 2048 head),
    # context 128, 6 blocks of width 256 with 8 heads: 5,822,464 parameters in 78 tensors.
    # Character data passes its own vocab_size (Shakespeare: 84 -> 4,814,932 parameters).
    "gpt": {"vocab_size": 2048, "block_size": 128, "n_layer": 6, "n_head": 8, "n_embd": 256},
    # for tests: 2 blocks of width 32, 30 tensors
    "tiny": {"vocab_size": 32, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32},
}
"""Named :class:`CharGPT` sizes; :func:`char_gpt` builds them."""


def char_gpt(preset: str = "gpt", **overrides) -> CharGPT:
    """Build a :class:`CharGPT` from :data:`GPT_PRESETS` ``[preset]``, with any constructor
    argument overridden (e.g. ``char_gpt("gpt", vocab_size=84)`` for Shakespeare characters)."""
    try:
        kw = dict(GPT_PRESETS[preset])
    except KeyError:
        raise ValueError(f"unknown GPT preset {preset!r}; known: {', '.join(GPT_PRESETS)}") from None
    kw.update(overrides)
    return CharGPT(**kw)


MODELS: dict[str, Callable[..., nn.Module]] = {"cnn": SmallCNN, "lstm": CharLSTM, "gpt": char_gpt}
"""Registry used by :func:`build_model`."""


def build_model(name: str, **kw) -> nn.Module:
    """Build a model by registry name (``"cnn"``, ``"lstm"`` or ``"gpt"``) with keyword
    arguments ``kw``.

    Example: ``build_model("cnn", in_channels=1, num_classes=10, image_size=8)``,
    ``build_model("lstm", vocab_size=84)`` or ``build_model("gpt", vocab_size=84)`` (the
    ``"gpt"`` preset of :data:`GPT_PRESETS`; ``preset="tiny"`` for another).
    """
    try:
        cls = MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None
    return cls(**kw)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Classification accuracy of ``model`` on ``(x, y)``, in eval mode and without grad,
    ``batch`` samples at a time; the model's training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    model.train(was_training)
    return correct / len(y)
