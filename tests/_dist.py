"""Spawning real worker processes (gloo) from inside pytest."""

from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException as exc:  # report, do not hang the other ranks
        torch.save({"ok": False, "error": f"{type(exc).__name__}: {exc}", "type": type(exc).__name__,
                    "trace": traceback.format_exc()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        try:
            import gc

            gc.collect()
            dist.barrier()  # nobody tears down gloo while a peer still talks to it
            dist.destroy_process_group()
        except Exception:
            pass
    # The outcome is on disk. Leave without interpreter finalization, where Gloo threads
    # still holding finished work can abort the process (see adacomp.workloads.training.run_and_exit).
    os._exit(0)


def run(fn, world: int, *args, out_dir: str, timeout: float = 240.0):
    """Run ``fn(rank, world, *args)`` on ``world`` spawned processes; return per-rank outcomes
    (dicts with ``ok`` and ``result`` or ``error``)."""
    ctx = mp.start_processes(_entry, args=(world, free_port(), fn, args, out_dir), nprocs=world,
                             join=False, start_method="spawn")
    import time

    deadline = time.time() + timeout
    while not ctx.join(timeout=1.0):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"distributed workers did not finish within {timeout}s (hang?)")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def results(outcomes):
    """The per-rank results, or an assertion error with the workers' tracebacks."""
    bad = [o for o in outcomes if not o["ok"]]
    assert not bad, "\n".join(o["trace"] for o in bad)
    return [o["result"] for o in outcomes]
