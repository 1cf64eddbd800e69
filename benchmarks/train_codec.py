"""Train the small mean-scale hyperprior codec (adacomp.workloads.codec) at several R-D trade-offs.

Loss ``bpp + lambda * MSE`` (pixels on 0..255, as in Yang et al. 2020 and tensorflow-compression),
additive uniform noise for rounding, Adam (``--lr``, divided by 10 for the last 20 % of the
steps), gradients clipped at norm 1. Data: random ``--crop`` x ``--crop`` crops (random flips)
of the bundled *training* photographs (``adacomp.workloads.codec.TRAIN_PHOTOS``: rocket,
hubble_deep_field, retina, camera, stereo_motorcycle); the test photographs of
``benchmarks/sga.py`` are never seen. One checkpoint per lambda,
``<out-dir>/codec_lambda<lambda>.pt`` (``{"config", "state_dict", "lmbda", "log"}``, loadable
with ``adacomp.workloads.codec.load_checkpoint``), and a summary in ``<out-dir>/codec_train.json``.

    # one base model (warm-started from an earlier checkpoint), then one fine-tune per lambda
    python benchmarks/train_codec.py --lambdas 0.008 --init results/sga_first_run/codec_lambda0.015.pt \
        --steps 100000 --minutes 15 --warmup 100 --lr 1e-3 --threads 2 --out-dir /tmp/base
    cp /tmp/base/codec_lambda0.008.pt results/codec_base_lambda0.008.pt
    for l in 0.001 0.0028 0.008 0.022 0.06; do     # in parallel, one thread each
      python benchmarks/train_codec.py --lambdas $l --init results/codec_base_lambda0.008.pt \
          --steps 100000 --minutes 11 --warmup 50 --lr 5e-4 --threads 1 &
    done; wait

``--minutes`` trains for a wall-clock budget instead of a step count (the lr drops to a tenth
for the last 20 % of the time); ``--warmup`` ramps the lr up linearly (Adam's first steps at
lr ``2e-3`` from a trained checkpoint blew the MSE up 40-fold); ``--resume`` continues a
checkpoint, ``--init`` starts from another checkpoint's weights (its step count and log are
carried on). The codecs of ``docs/sga.md`` were trained this way on a 2-core machine shared
with other jobs. That is a tiny budget for a learned codec (published models train for
millions of steps): the codecs are weak, which the refinement benchmark states.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from adacomp.workloads.codec import TRAIN_PHOTOS, MeanScaleHyperprior, load_photo, random_crops, rd_loss  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.0025, 0.006, 0.015, 0.04])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128, help="crop size (a multiple of 64)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--N", type=int, default=48)
    ap.add_argument("--M", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "results"))
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument(
        "--resume",
        action="store_true",
        help="start from the existing checkpoint of each lambda and train --steps more",
    )
    ap.add_argument(
        "--init", default=None, help="start from this checkpoint's weights (e.g. a codec of a nearby lambda)"
    )
    ap.add_argument(
        "--save-every", type=int, default=100, help="also save the checkpoint every this many steps"
    )
    ap.add_argument("--warmup", type=int, default=0, help="linear lr warm-up over this many steps")
    ap.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-clock budget per lambda: train until it is spent (--steps is then an upper bound); "
        "the lr drops to a tenth for the last 20 %% of the time instead of the last 20 %% of the steps",
    )
    return ap.parse_args(argv)


def save(codec, lmbda: float, log: list, args) -> str:
    config = {"N": args.N, "M": args.M}
    path = os.path.join(args.out_dir, f"codec_lambda{lmbda:g}.pt")
    torch.save(
        {
            "config": config,
            "state_dict": codec.state_dict(),
            "lmbda": lmbda,
            "log": log,
            "steps": log[-1]["step"] if log else 0,
        },
        path,
    )
    return path


def train_one(lmbda: float, images, args) -> dict:
    torch.manual_seed(args.seed)  # weight init; the crops use their own generator below
    generator = torch.Generator().manual_seed(args.seed)
    codec = MeanScaleHyperprior(args.N, args.M)
    log, done = [], 0
    if args.resume or args.init:
        path = args.init or os.path.join(args.out_dir, f"codec_lambda{lmbda:g}.pt")
        ckpt = torch.load(path, weights_only=True)
        codec.load_state_dict(ckpt["state_dict"])
        done = ckpt["steps"]
        log = ckpt["log"] if args.resume else [{**e, "lmbda": ckpt["lmbda"]} for e in ckpt["log"]]
        generator.manual_seed(args.seed + done)  # fresh crops
    opt = torch.optim.Adam(codec.parameters(), lr=args.lr)
    start = time.time() - (log[-1]["seconds"] if log else 0.0)
    window = []
    t_begin, budget = time.time(), None if args.minutes is None else 60.0 * args.minutes
    decayed, step = False, 0
    for step in range(1, args.steps + 1):
        late = step > int(0.8 * args.steps) if budget is None else time.time() - t_begin > 0.8 * budget
        if step <= args.warmup:
            for group in opt.param_groups:
                group["lr"] = args.lr * step / args.warmup
        if late and not decayed:
            decayed = True
            for group in opt.param_groups:
                group["lr"] = args.lr / 10
        x = random_crops(images, args.crop, args.batch_size, generator)
        loss, bpp, mse = rd_loss(codec(x), x, lmbda)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(codec.parameters(), 1.0)
        opt.step()
        window.append((loss.item(), bpp.item(), mse.item()))
        last = step == args.steps or (budget is not None and time.time() - t_begin > budget)
        if step % args.log_every == 0 or last:
            step_total = done + step
            n = len(window)
            avg = [sum(v[i] for v in window) / n for i in range(3)]
            window = []
            entry = {
                "step": step_total,
                "loss": avg[0],
                "bpp": avg[1],
                "mse": avg[2],
                "seconds": time.time() - start,
            }
            log.append(entry)
            print(
                f"lambda={lmbda:g} step {step_total:5d}  loss {avg[0]:.4f}  bpp {avg[1]:.4f}  "
                f"mse {avg[2]:.2f}  "
                f"{entry['seconds']:.0f}s",
                flush=True,
            )
        if step % args.save_every == 0 or last:
            path = save(codec, lmbda, log, args)
        if last:
            break
    return {
        "lmbda": lmbda,
        "path": os.path.relpath(path, ROOT),
        "steps": done + step,
        "final": log[-1],
        "seconds": time.time() - start,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.crop % 64:
        raise SystemExit(f"--crop must be a multiple of 64, got {args.crop}")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # subnormal floats made some steps 10x slower
    os.makedirs(args.out_dir, exist_ok=True)
    images = [load_photo(name) for name in TRAIN_PHOTOS]
    runs = [train_one(lmbda, images, args) for lmbda in args.lambdas]
    print(f"\n{'lambda':>8} {'bpp':>7} {'mse':>8} {'psnr~':>7} {'minutes':>8}")
    for r in runs:
        f = r["final"]
        psnr = 10 * torch.log10(torch.tensor(255.0**2 / f["mse"])).item()
        print(f"{r['lmbda']:8g} {f['bpp']:7.3f} {f['mse']:8.2f} {psnr:7.2f} {r['seconds'] / 60:8.1f}")
    summary_path = os.path.join(args.out_dir, "codec_train.json")
    summary = {}
    if os.path.exists(summary_path):
        with open(summary_path) as fh:
            summary = json.load(fh)
    for r in runs:
        summary[f"{r['lmbda']:g}"] = {**r, "args": vars(args)}
    with open(summary_path, "w") as fh:
        json.dump(summary, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
