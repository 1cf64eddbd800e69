"""Models used by the adacomp training scripts and benchmarks.

* :class:`SmallCNN`: an image classifier with 4-D convolution weights, 2-D linear weights and
  1-D biases, sized so that the gradients are big enough to be worth compressing (about 0.46 M
  parameters for 28x28 inputs, with a 401 k-weight fully connected layer).
* :class:`CharLSTM`: a character language model (embedding, multi-layer LSTM, decoder).

:func:`build_model` builds either by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["MODELS", "CharLSTM", "SmallCNN", "accuracy", "build_model"]


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


MODELS: dict[str, Callable[..., nn.Module]] = {"cnn": SmallCNN, "lstm": CharLSTM}
"""Registry used by :func:`build_model`."""


def build_model(name: str, **kw) -> nn.Module:
    """Build a model by registry name (``"cnn"`` or ``"lstm"``) with keyword arguments ``kw``.

    Example: ``build_model("cnn", in_channels=1, num_classes=10, image_size=8)`` or
    ``build_model("lstm", vocab_size=84)``.
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
