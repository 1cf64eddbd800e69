"""AdaComp in PyTorch Lightning: DDP on 2 CPU processes (gloo), with checkpoint and resume.

Run (Lightning starts the second process itself)::

    python examples/lightning_ddp.py --devices 2 --epochs 2 --ckpt-dir ckpts
    python examples/lightning_ddp.py --devices 2 --epochs 3 --resume ckpts/epoch=1.ckpt

What to copy is :class:`AdaCompCallback`: add it to ``Trainer(callbacks=[...])`` with a DDP
strategy. It

* builds :class:`adacomp.AdaCompState` from the DDP-wrapped model and registers
  :func:`adacomp.adacomp_hook` on it in ``on_fit_start``. (``DDPStrategy(ddp_comm_state=...,
  ddp_comm_hook=...)`` is not used: Lightning 2.x registers a communication hook only when the
  root device is CUDA, and silently drops it on CPU; and a state built before ``fit`` would
  key its residues by the storage of parameters that Lightning moves to the GPU afterwards);
* puts every rank's AdaComp state (residues, step counter, traffic statistics) into
  Lightning's checkpoint. Lightning writes the checkpoint on global rank 0 only, so the
  callback's ``state_dict`` gathers the per-rank states to every rank with
  ``torch.distributed.all_gather_object`` (a collective: Lightning calls it on all ranks,
  from ``trainer.save_checkpoint`` and ``ModelCheckpoint``) and stores them by rank; on
  resume every rank reads the checkpoint and takes its own entry, so the resumed run
  continues exactly as an uninterrupted one. Loading on another world size raises.

Data: scikit-learn's digits (8x8, ``pip install scikit-learn``); model: adacomp's SmallCNN.
Needs ``pip install lightning``. Guide: docs/trainers.md.
"""

from __future__ import annotations

import argparse
import os

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from adacomp import AdaCompState, adacomp_hook
from adacomp.workloads.data import load
from adacomp.workloads.models import SmallCNN


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class AdaCompCallback(Callback):
    """Registers the AdaComp DDP hook and checkpoints every rank's AdaComp state.

    Args:
        **adacomp_kwargs: passed to :class:`adacomp.AdaCompState` (``bin_size``, ``exchange``,
            ``start_iter``, ``min_numel``, ``process_group``, ...).

    After ``fit`` starts, ``self.state`` is this rank's :class:`adacomp.AdaCompState`
    (``self.state.stats()`` gives the bytes and compression ratios).
    """

    def __init__(self, **adacomp_kwargs):
        self.adacomp_kwargs = adacomp_kwargs
        self.state: AdaCompState | None = None
        self._pending: dict | None = None  # a checkpoint's entry, applied once the state exists

    def on_fit_start(self, trainer, pl_module):
        ddp = trainer.strategy.model
        if not isinstance(ddp, DistributedDataParallel):
            raise RuntimeError(f"AdaCompCallback needs a DDP strategy (strategy='ddp' or DDPStrategy), "
                               f"got {type(trainer.strategy).__name__} wrapping {type(ddp).__name__}")
        previous = self.state.state_dict() if self.state is not None else None  # a second fit()
        # After Lightning wrapped the module (and moved it to its device): names and storage match.
        self.state = AdaCompState(model=ddp, **self.adacomp_kwargs)
        ddp.register_comm_hook(self.state, adacomp_hook)
        if self._pending is not None:
            self._apply(self._pending)
            self._pending = None
        elif previous is not None:
            self.state.load_state_dict(previous)

    # -- checkpoint: one entry per rank, all in rank 0's file --------------------------
    def state_dict(self) -> dict:
        rank, world = _world()
        mine = self.state.state_dict() if self.state is not None else None
        if world == 1:
            return {"world_size": 1, "ranks": [mine]}
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine)  # residues are CPU tensors in state_dict()
        return {"world_size": world, "ranks": everyone}

    def load_state_dict(self, state_dict: dict) -> None:
        # Lightning restores callbacks before it wraps the model: keep it until on_fit_start.
        if self.state is None:
            self._pending = state_dict
        else:
            self._apply(state_dict)

    def _apply(self, state_dict: dict) -> None:
        rank, world = _world()
        if state_dict["world_size"] != world:
            raise ValueError(f"AdaComp checkpoint was written by {state_dict['world_size']} ranks, "
                             f"this run has {world}: residues are per rank")
        mine = state_dict["ranks"][rank]
        if mine is not None:
            self.state.load_state_dict(mine)


class DigitsClassifier(L.LightningModule):
    def __init__(self, lr: float = 0.05, momentum: float = 0.9):
        super().__init__()
        self.save_hyperparameters()
        self.net = SmallCNN(in_channels=1, num_classes=10, image_size=8)
        self.losses: list[float] = []  # this rank's training losses, one per step

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


def digits_loader(batch_size: int) -> DataLoader:
    data = load("digits", split="train")
    # Lightning swaps in a DistributedSampler (shuffle, seed from seed_everything) under DDP.
    return DataLoader(TensorDataset(data.x, data.y), batch_size=batch_size, shuffle=True, drop_last=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=2, help="processes (CPU, gloo)")
    p.add_argument("--epochs", type=int, default=2, help="train until this many epochs are done")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exchange", default="auto", choices=["auto", "allgather", "sharded"])
    p.add_argument("--ckpt-dir", default=None, help="save a checkpoint after every epoch here")
    p.add_argument("--resume", default=None, help="a checkpoint to resume from")
    p.add_argument("--result", default=None,
                   help="write each rank's final parameters, losses and AdaComp stats to "
                        "RESULT.rank<r>.pt (used by tests/test_trainers.py)")
    args = p.parse_args(argv)

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    L.seed_everything(args.seed, verbose=False)
    model = DigitsClassifier()
    adacomp = AdaCompCallback(exchange=args.exchange)
    callbacks = [adacomp]
    if args.ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, filename="{epoch}", every_n_epochs=1,
                                         save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, max_epochs=args.epochs,
        strategy=DDPStrategy(process_group_backend="gloo"),
        callbacks=callbacks, enable_checkpointing=bool(args.ckpt_dir),
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=args.ckpt_dir or None,
    )
    trainer.fit(model, train_dataloaders=digits_loader(args.batch_size), ckpt_path=args.resume,
                weights_only=False)

    stats = adacomp.state.stats()
    rank = trainer.global_rank
    if rank == 0:
        t = stats["total"]
        ratio = lambda k: f"{t[k]['ratio']:.1f}x" if t[k]["ratio"] else "-"  # noqa: E731
        first = sum(model.losses[:5]) / max(1, len(model.losses[:5]))
        last = sum(model.losses[-5:]) / max(1, len(model.losses[-5:]))
        print(f"rank 0: {len(model.losses)} steps this run, loss {first:.3f} -> {last:.3f}; "
              f"AdaComp ratio all {ratio('all')}, conv {ratio('conv')}, fc {ratio('fc')} "
              f"after {adacomp.state.iter} steps")
    if args.result:
        torch.save({"params": {k: v.detach().clone() for k, v in model.net.state_dict().items()},
                    "losses": model.losses, "stats": stats, "iter": adacomp.state.iter,
                    "adacomp_state": adacomp.state.state_dict(), "world_size": trainer.world_size},
                   f"{args.result}.rank{rank}.pt")


if __name__ == "__main__":
    main()
    # Leave without the interpreter's teardown of Gloo work, which aborts now and then
    # (pytorch/pytorch#179291): barrier, destroy the process group, os._exit(0).
    from adacomp.workloads.training import exit_distributed

    exit_distributed(0)
