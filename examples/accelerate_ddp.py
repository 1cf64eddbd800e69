"""AdaComp in Hugging Face Accelerate: DDP on 2 CPU processes (gloo), with save_state / load_state.

Run on CPU (``accelerate launch --cpu`` starts one process only; ``--multi_gpu`` is the
launcher that starts several, through torchrun, and the script's ``Accelerator(cpu=True)``
then picks gloo)::

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_ddp.py --epochs 2 --ckpt-dir ck
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_ddp.py --epochs 3 --resume ck/epoch_1
    # or, without the accelerate launcher:
    torchrun --standalone --nproc_per_node 2 examples/accelerate_ddp.py --epochs 2

What to copy: after ``accelerator.prepare(...)`` the model is a
``DistributedDataParallel``; register the hook on it, and register
:class:`PerRankState` for checkpointing::

    model, opt, loader = accelerator.prepare(model, opt, loader)
    state = AdaCompState(model=model)                       # names without "module."
    model.register_comm_hook(state, adacomp_hook)
    accelerator.register_for_checkpointing(PerRankState(state))

``accelerator.save_state`` writes registered objects from the main process only (one
``custom_checkpoint_<i>.pkl``), but calls their ``state_dict()`` on every process:
:class:`PerRankState` gathers every rank's AdaComp state there with
``torch.distributed.all_gather_object`` and stores them by rank; ``load_state`` reads the same
file on every process, and each takes its own entry. Call ``save_state`` / ``load_state`` on
every process, as Accelerate asks.

Data: scikit-learn's digits (8x8, ``pip install scikit-learn``); model: adacomp's SmallCNN.
Needs ``pip install accelerate``. Guide: docs/trainers.md.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, set_seed
from torch.utils.data import DataLoader, TensorDataset

from adacomp import AdaCompState, adacomp_hook
from adacomp.workloads.data import load
from adacomp.workloads.models import SmallCNN


class PerRankState:
    """Checkpoints every rank's :class:`adacomp.AdaCompState` in one file written by rank 0.

    ``state_dict()`` is a collective (every rank must call it, as ``accelerator.save_state``
    does); it returns ``{"world_size": W, "ranks": [state of rank 0, ..., state of rank W-1]}``
    on every rank. ``load_state_dict()`` takes this rank's entry and raises on another world
    size (residues are per rank). Rank 0 holds W copies of the residues while saving.
    """

    def __init__(self, state: AdaCompState):
        self.state = state

    def state_dict(self) -> dict:
        mine = self.state.state_dict()  # residues as CPU tensors
        if not (dist.is_available() and dist.is_initialized()):
            return {"world_size": 1, "ranks": [mine]}
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return {"world_size": len(everyone), "ranks": everyone}

    def load_state_dict(self, state_dict: dict) -> None:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if state_dict["world_size"] != world:
            raise ValueError(f"AdaComp checkpoint was written by {state_dict['world_size']} ranks, "
                             f"this run has {world}: residues are per rank")
        self.state.load_state_dict(state_dict["ranks"][rank])


class Progress:
    """The epochs done, checkpointed with the rest (``register_for_checkpointing``)."""

    def __init__(self):
        self.epoch = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epoch = int(state_dict["epoch"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=2, help="train until this many epochs are done")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exchange", default="auto", choices=["auto", "allgather", "sharded"])
    p.add_argument("--cpu", action="store_true", help="force CPU and gloo (the default without CUDA)")
    p.add_argument("--ckpt-dir", default=None, help="accelerator.save_state to CKPT_DIR/epoch_<n> "
                                                    "after every epoch")
    p.add_argument("--resume", default=None, help="a save_state folder to resume from")
    p.add_argument("--result", default=None,
                   help="write each rank's final parameters, losses and AdaComp stats to "
                        "RESULT.rank<r>.pt (used by tests/test_trainers.py)")
    args = p.parse_args(argv)

    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise SystemExit("start 2+ processes: accelerate launch --multi_gpu --num_processes 2 "
                         "examples/accelerate_ddp.py (or torchrun --nproc_per_node 2 ...)")
    cpu = args.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu,
        # gloo on CPU (Accelerate would pick MPI where torch was built with it)
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if cpu else [],
        # the shuffle depends on the seed and the epoch only: resuming at an epoch is exact
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    set_seed(args.seed)

    data = load("digits", split="train")
    loader = DataLoader(TensorDataset(data.x, data.y), batch_size=args.batch_size, shuffle=True,
                        drop_last=True)
    model = SmallCNN(in_channels=1, num_classes=10, image_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    model, opt, loader = accelerator.prepare(model, opt, loader)

    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise SystemExit(f"expected a DDP model, got {type(model).__name__} (distributed type "
                         f"{accelerator.distributed_type})")
    state = AdaCompState(model=model, exchange=args.exchange)
    model.register_comm_hook(state, adacomp_hook)
    progress = Progress()
    accelerator.register_for_checkpointing(PerRankState(state), progress)

    if args.resume:
        accelerator.load_state(args.resume)  # model, optimizer, RNG, sampler, AdaComp, progress

    losses = []
    model.train()
    for epoch in range(progress.epoch, args.epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        progress.epoch = epoch + 1
        if args.ckpt_dir:
            accelerator.save_state(os.path.join(args.ckpt_dir, f"epoch_{epoch}"))

    stats = state.stats()
    rank = accelerator.process_index
    if accelerator.is_main_process:
        t = stats["total"]
        ratio = lambda k: f"{t[k]['ratio']:.1f}x" if t[k]["ratio"] else "-"  # noqa: E731
        first = sum(losses[:5]) / max(1, len(losses[:5]))
        last = sum(losses[-5:]) / max(1, len(losses[-5:]))
        print(f"rank 0: {len(losses)} steps this run, loss {first:.3f} -> {last:.3f}; "
              f"AdaComp ratio all {ratio('all')}, conv {ratio('conv')}, fc {ratio('fc')} "
              f"after {state.iter} steps")
    if args.result:
        net = accelerator.unwrap_model(model)
        torch.save({"params": {k: v.detach().clone() for k, v in net.state_dict().items()},
                    "losses": losses, "stats": stats, "iter": state.iter,
                    "adacomp_state": state.state_dict(), "world_size": accelerator.num_processes},
                   f"{args.result}.rank{rank}.pt")
    accelerator.end_training()


if __name__ == "__main__":
    main()
    # Leave without the interpreter's teardown of Gloo work, which aborts now and then
    # (pytorch/pytorch#179291): barrier, destroy the process group, os._exit(0).
    from adacomp.workloads.training import exit_distributed

    exit_distributed(0)
