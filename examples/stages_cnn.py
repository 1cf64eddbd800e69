"""User module for ``adacomp compress``: the SmallCNN on Fashion-MNIST (MNIST subset if absent).

It provides what the command needs: ``build_model()``, ``evaluate(model)`` (accuracy on held-out
*training* images, the calibration set; never the test set), ``train_step(model, batch)`` and
``data()`` (mini-batches of the rest of the training split) for fine-tuning. Run directly, it
trains a model and saves the ``IN`` file to compress (its state dict,
``torch.save(model.state_dict(), path)``), and measures test accuracy. From the repository root::

    python examples/stages_cnn.py train results/cnn.pt --epochs 1
    adacomp compress --stage lowrank --set ratio=0.8 --set method=bsr \\
        --module examples/stages_cnn.py results/cnn.pt results/cnn_small.pt
    python examples/stages_cnn.py test results/cnn_small.pt

(``python -m adacomp.stages.cli compress ...`` does the same where the ``adacomp`` command is not
installed.)

The calibration images are the first ``ADACOMP_EXAMPLE_CALIB`` (default 1000) of a permutation of
the training split seeded with 0, the same split ``benchmarks/lowrank.py`` holds out, so a model
saved by ``benchmarks/lowrank.py --save-model`` can be compressed here honestly.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
import torch.nn.functional as F

from adacomp.workloads import data as datasets
from adacomp.workloads.models import SmallCNN, accuracy

CALIB = int(os.environ.get("ADACOMP_EXAMPLE_CALIB", "1000"))
SPLIT_SEED = 0
BATCH = 64


@functools.lru_cache(maxsize=1)
def _data():
    """``(train, test, calib_idx, train_idx)``; Fashion-MNIST, or the 5k MNIST subset if absent."""
    try:
        train, test = (
            datasets.load("fashion-mnist", split="train"),
            datasets.load("fashion-mnist", split="test"),
        )
    except datasets.DataNotFound as exc:
        print(
            f"stages_cnn: Fashion-MNIST not found, using the 5k MNIST subset instead ({exc})", file=sys.stderr
        )
        train, test = datasets.load("mnist", split="train"), datasets.load("mnist", split="test")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(SPLIT_SEED))
    calib = min(CALIB, len(train) // 5)
    return train, test, perm[:calib], perm[calib:]


def build_model() -> torch.nn.Module:
    """The model as built before compression."""
    return SmallCNN(in_channels=1, num_classes=10, image_size=28)


def evaluate(model: torch.nn.Module) -> float:
    """Accuracy on the held-out calibration images (higher is better)."""
    train, _, calib, _ = _data()
    return accuracy(model, train.x[calib], train.y[calib])


def train_step(model: torch.nn.Module, batch) -> torch.Tensor:
    """Cross-entropy of one batch (the stage back-propagates it)."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def data():
    """Shuffled mini-batches of the training images that are not calibration images."""
    train, _, _, idx = _data()
    return datasets.image_batches(train, BATCH, generator=torch.Generator().manual_seed(1), indices=idx)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("``", ""))
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train the SmallCNN and save its state dict (adacomp compress's IN)")
    tr.add_argument("out", help="where to write the state dict, e.g. results/cnn.pt")
    tr.add_argument("--epochs", type=float, default=1.0)
    tr.add_argument("--lr", type=float, default=0.05)
    te = sub.add_parser("test", help="test accuracy of a saved (possibly compressed) model")
    te.add_argument("path")
    args = ap.parse_args(argv)
    _, test, _, _ = _data()
    if args.cmd == "train":
        with torch.random.fork_rng():  # seeded initialization without touching the caller's RNG
            torch.manual_seed(0)
            model = build_model()
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        batches = data()
        steps = int(args.epochs * len(batches))
        for step, batch in zip(range(steps), (b for _ in range(int(args.epochs) + 1) for b in batches)):
            loss = train_step(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (step + 1) % 200 == 0:
                print(f"step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        torch.save(model.state_dict(), args.out)
        print(f"test accuracy {accuracy(model, test.x, test.y):.4f}")
        small = os.path.join(os.path.dirname(args.out), "cnn_small.pt")
        print(
            f"wrote {args.out} (the model's state dict); compress it with\n"
            f"  adacomp compress --stage lowrank --set ratio=0.8 --set method=bsr \\\n"
            f"      --module {os.path.relpath(__file__)} {args.out} {small}"
        )
        return 0
    from adacomp.stages import load

    model = load(build_model(), args.path)
    print(f"test accuracy {accuracy(model, test.x, test.y):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
