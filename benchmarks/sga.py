"""Evidence for the SGA / bits-back refinement (issue 9): rate-distortion curves on held-out photographs.

For every trained codec (``results/codec_lambda*.pt`` from ``benchmarks/train_codec.py``, one
per lambda) and every test photograph (``astronaut``, ``coffee``, ``chelsea``, ``china``,
``flower``; never seen in training), centre-cropped to ``--crop`` pixels:

* **amortized**: ``codec.compress`` (``y = g_a(x)``, ``z = h_a(y)``, rounded, coded);
* **SGA**: ``encode(codec, batch, SGAConfig(steps, lr))``, one stream per image;
* **SGA + bits-back**: ``encode``'s bits-back path (SGA with integer rounding of ``y``, then
  ``z`` drawn from the fitted posterior off the ANS stack). All images go into one chained
  stream, preceded (in coding order) by a copy of the first image that has nothing to borrow
  from; each image's rate is the number of bits it adds to the stack (its marginal cost in a
  chain). The whole chain's size, bootstrap copy included, is reported as well.

Rates are real bitstream sizes (bits per pixel, the 10-byte header included for the
single-image streams), quality the PSNR of the decoded 8-bit image. Every stream is decoded and
compared bit for bit with what the coded latents decode to. BD-rates (Bjontegaard, cubic fits)
against amortized encoding: of the curve averaged over the images (mean bpp and mean PSNR per
lambda), and the mean of the per-image BD-rates. ``--full-gap`` adds the amortized bits against
the model's information content on the full photographs (cropped to multiples of 64).

    python benchmarks/sga.py --json results/sga.json --plot results/sga.png

writes the table (stdout), the JSON and the plot. ``--steps`` is the SGA step count; the
temperature schedule is the paper's, compressed in time to the steps run.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from adacomp.stages import BitsBackConfig, SGAConfig, encode, refine_latents  # noqa: E402
from adacomp.workloads.codec import (  # noqa: E402
    TEST_PHOTOS,
    PosteriorFit,
    bd_psnr,
    bd_rate,
    bitstream,  # noqa: E402
    center_crop,
    information_content,
    load_checkpoint,
    load_photo,
    psnr,
    quantize,
    reconstruct,
    write_stream,
)

METHODS = ("amortized", "sga", "bits-back")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--checkpoints", nargs="*", default=None, help="codec checkpoints (default: results/codec_lambda*.pt)"
    )
    ap.add_argument("--images", nargs="+", default=list(TEST_PHOTOS))
    ap.add_argument("--crop", type=int, default=256, help="centre crop size (a multiple of 64)")
    ap.add_argument("--steps", type=int, default=2000, help="SGA steps (the paper: 2000)")
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--posterior-steps", type=int, default=100)
    ap.add_argument("--posterior-lr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full-gap", action="store_true", help="bits vs information content on full photos")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument(
        "--combine",
        nargs="+",
        default=None,
        metavar="JSON",
        help="no refinement: merge the runs of earlier --json outputs (e.g. one process per codec)",
    )
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    return ap.parse_args(argv)


def _mse255(x, x_hat):
    return float(torch.mean((x.clamp(0, 1) - x_hat) ** 2)) * 255.0**2


def _row(name, data: bytes, x, x_hat, ic: float, **extra) -> dict:
    """One image's result for a single-image stream: real size, PSNR, information content, gap."""
    bits, n = 8 * len(data), x.shape[-2] * x.shape[-1]
    return {
        "image": name,
        "bytes": len(data),
        "bpp": bits / n,
        "psnr": psnr(x, x_hat),
        "information_content": ic,
        "gap": (bits - ic) / ic,
        **extra,
    }


def run_codec(codec, names, xs, args) -> dict:
    lmbda = codec.lmbda
    pixels = [x.shape[-2] * x.shape[-1] for x in xs]
    rows = {m: [] for m in METHODS}
    # amortized
    for name, x, n in zip(names, xs, pixels):
        data = codec.compress(x)
        x_hat = codec.decompress(data)
        _, y, z = bitstream.analyse(codec, x.unsqueeze(0))
        lat = quantize(codec, y, z, *x.shape[-2:])
        assert torch.equal(x_hat, reconstruct(codec, lat)), "amortized stream does not decode bit for bit"
        ic = information_content(codec, lat)
        rows["amortized"].append(_row(name, data, x, x_hat, ic, loss=ic / n + lmbda * _mse255(x, x_hat)))
    batch = torch.stack(xs)
    # SGA, one stream per image
    info, t0 = {}, time.time()
    streams = encode(
        codec,
        batch,
        refine=SGAConfig(steps=args.steps, lr=args.lr),
        separate=True,
        progress=not args.no_progress,
        info=info,
    )
    sga_seconds = time.time() - t0
    for name, x, data, rec in zip(names, xs, streams, info["images"]):
        x_hat = codec.decompress(data)
        assert torch.equal(x_hat, reconstruct(codec, rec["latents"])), (
            "SGA stream does not decode bit for bit"
        )
        extra = {"loss_start": rec["loss_start"], "loss": rec["loss_final"], "best_step": rec["best_step"]}
        rows["sga"].append(_row(name, data, x, x_hat, rec["information_content"], **extra))
    # SGA + bits-back: refine with integer rounding, chain [copy of the first image (coded first), images...]
    cfg = BitsBackConfig(
        steps=args.steps, lr=args.lr, posterior=PosteriorFit(steps=args.posterior_steps, lr=args.posterior_lr)
    )
    t0 = time.time()
    xp = bitstream.pad_image(batch, codec.downsampling)
    height, width = batch.shape[-2:]
    y, z = refine_latents(codec, xp, height, width, cfg, integer_y=True, progress=not args.no_progress)
    lats = [
        quantize(codec, y[i : i + 1], z[i : i + 1], height, width, integer_y=True, bits_back=True)
        for i in range(len(xs))
    ]
    chain = [copy.deepcopy(lat) for lat in lats] + [copy.deepcopy(lats[0])]
    data, net_bits = write_stream(codec, chain, cfg.posterior)
    bb_seconds = time.time() - t0
    decoded = codec.decompress(data)
    for i, (name, x, n) in enumerate(zip(names, xs, pixels)):
        lat = chain[i]
        assert lat.bits_back
        x_hat = decoded[i]
        assert torch.equal(x_hat, reconstruct(codec, lat)), "bits-back stream does not decode bit for bit"
        ic = information_content(codec, lat)
        rows["bits-back"].append(
            {
                "image": name,
                "bits": net_bits[i],
                "bpp": net_bits[i] / n,
                "psnr": psnr(x, x_hat),
                "information_content": ic,
                "returned_bits": lat.returned_bits,
                "net_estimate": ic - lat.returned_bits,
                "gap": (net_bits[i] - (ic - lat.returned_bits)) / ic,
                "loss": (ic - lat.returned_bits) / n + lmbda * _mse255(x, x_hat),
            }
        )
    return {
        "lmbda": lmbda,
        "rows": rows,
        "sga_seconds": sga_seconds,
        "bits_back_seconds": bb_seconds,
        "bits_back_chain_bytes": len(data),
        "bits_back_chain_bpp": 8 * len(data) / (sum(pixels) + pixels[0]),
        "bits_back_chain_images": len(chain),
    }


def full_gap(codecs, names) -> list[dict]:
    out = []
    for codec in codecs:
        for name in names:
            x = load_photo(name)
            h, w = (x.shape[1] // 64) * 64, (x.shape[2] // 64) * 64
            x = center_crop(x, h, w)
            _, y, z = bitstream.analyse(codec, x.unsqueeze(0))
            lat = quantize(codec, y, z, h, w)
            data, _ = write_stream(codec, [lat])
            ic = information_content(codec, lat)
            out.append(
                {
                    "lmbda": codec.lmbda,
                    "image": name,
                    "size": [h, w],
                    "bits": 8 * len(data),
                    "information_content": ic,
                    "gap": (8 * len(data) - ic) / ic,
                    "bpp": 8 * len(data) / (h * w),
                }
            )
    return out


def summarize(runs: list[dict], names: list[str]) -> dict:
    runs = sorted(runs, key=lambda r: r["lmbda"])
    curves = {}
    for m in METHODS:
        bpp = np.array([[row["bpp"] for row in r["rows"][m]] for r in runs])  # (lambdas, images)
        ps = np.array([[row["psnr"] for row in r["rows"][m]] for r in runs])
        curves[m] = {"bpp": bpp, "psnr": ps}
    summary = {}
    a = curves["amortized"]
    for metric, fn in (("bd_rate", bd_rate), ("bd_psnr", bd_psnr)):
        for key in ("mean_curve", "per_image", "mean_of_images", "undefined"):
            summary[f"{metric}_{key}"] = {}
        for m in METHODS[1:]:
            c = curves[m]
            undefined = []
            try:
                mean = fn(a["bpp"].mean(1), a["psnr"].mean(1), c["bpp"].mean(1), c["psnr"].mean(1))
            except ValueError as e:  # the curves' PSNR (or rate) ranges do not overlap
                mean = None
                undefined.append(f"mean curve: {e}")
            per = {}
            for j, name in enumerate(names):
                try:
                    per[name] = fn(a["bpp"][:, j], a["psnr"][:, j], c["bpp"][:, j], c["psnr"][:, j])
                except ValueError as e:
                    per[name] = None
                    undefined.append(f"{name}: {e}")
            vals = [v for v in per.values() if v is not None]
            summary[f"{metric}_mean_curve"][m] = mean
            summary[f"{metric}_per_image"][m] = per
            summary[f"{metric}_mean_of_images"][m] = float(np.mean(vals)) if vals else None
            summary[f"{metric}_undefined"][m] = undefined
    summary["mean_curves"] = {
        m: {"bpp": curves[m]["bpp"].mean(1).tolist(), "psnr": curves[m]["psnr"].mean(1).tolist()}
        for m in METHODS
    }
    summary["loss_reduction_per_image"] = {
        m: {
            name: float(
                np.mean([1 - r["rows"][m][j]["loss"] / r["rows"]["amortized"][j]["loss"] for r in runs])
            )
            for j, name in enumerate(names)
        }
        for m in METHODS[1:]
    }
    sga_rows = [row for r in runs for row in r["rows"]["sga"]]
    summary["sga_lowers_loss_everywhere"] = all(row["loss"] < row["loss_start"] for row in sga_rows)
    summary["sga_loss_reduction_mean"] = float(
        np.mean([1 - row["loss"] / row["loss_start"] for row in sga_rows])
    )
    summary["bits_back_vs_sga_loss"] = float(
        np.mean(
            [
                rb["loss"] / rs["loss"] - 1
                for r in runs
                for rb, rs in zip(r["rows"]["bits-back"], r["rows"]["sga"])
            ]
        )
    )
    gaps = {m: [row["gap"] for r in runs for row in r["rows"][m]] for m in METHODS}
    summary["gap_max_abs"] = {m: float(np.max(np.abs(g))) for m, g in gaps.items()}
    summary["gap_mean"] = {m: float(np.mean(g)) for m, g in gaps.items()}
    return summary


def _fmt(value, unit: str) -> str:
    return "n/a" if value is None else f"{value:+.2f}{unit}"


def print_table(runs, summary, gap_rows):
    print(f"\n{'lambda':>7} {'method':>10} {'bpp':>7} {'PSNR':>7} {'R-D loss':>9} {'bits/est-1':>11}")
    for r in sorted(runs, key=lambda r: r["lmbda"]):
        for m in METHODS:
            rows = r["rows"][m]
            print(
                f"{r['lmbda']:7g} {m:>10} {np.mean([x['bpp'] for x in rows]):7.4f} "
                f"{np.mean([x['psnr'] for x in rows]):7.2f} {np.mean([x['loss'] for x in rows]):9.4f} "
                f"{np.mean([x['gap'] for x in rows]) * 100:10.2f}%"
            )
        print(
            f"{'':7} {'chain':>10} {r['bits_back_chain_bpp']:7.4f}   (bits-back stream incl. bootstrap image)"
        )
    for metric, unit in (("bd_rate", "%"), ("bd_psnr", " dB")):
        print(
            f"\n{metric.replace('_', '-').upper()} vs amortized "
            "(mean curve / mean of per-image; n/a: undefined):"
        )
        for m in METHODS[1:]:
            vals = [summary[f"{metric}_mean_curve"][m], summary[f"{metric}_mean_of_images"][m]]
            per = summary[f"{metric}_per_image"][m]
            print(
                f"  {m:>10}: "
                + " / ".join(_fmt(v, unit) for v in vals)
                + "   per image: "
                + ", ".join(f"{k} {_fmt(v, unit)}" for k, v in per.items())
            )
    print(
        f"SGA lowers the R-D loss on every image and lambda: {summary['sga_lowers_loss_everywhere']} "
        f"(mean reduction {summary['sga_loss_reduction_mean'] * 100:.1f}%)"
    )
    print(f"bits-back R-D loss vs SGA: {summary['bits_back_vs_sga_loss'] * 100:+.2f}% (mean over images)")
    print(
        "real bits vs estimated information content, max |gap|: "
        + ", ".join(f"{m} {v * 100:.2f}%" for m, v in summary["gap_max_abs"].items())
    )
    if gap_rows:
        g = [row["gap"] for row in gap_rows]
        print(
            f"full photographs (amortized): gap mean {np.mean(g) * 100:.3f}%, "
            f"max {np.max(np.abs(g)) * 100:.3f}%"
        )


def plot(path, runs, summary, names):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"amortized": ("k", "o"), "sga": ("tab:blue", "s"), "bits-back": ("tab:red", "^")}
    for m in METHODS:
        c = summary["mean_curves"][m]
        label = m
        if m != "amortized":
            label += f" (BD-PSNR {_fmt(summary['bd_psnr_mean_curve'][m], ' dB')}, "
            label += f"BD-rate {_fmt(summary['bd_rate_mean_curve'][m], '%')})"
        axes[0].plot(c["bpp"], c["psnr"], color=styles[m][0], marker=styles[m][1], label=label)
    axes[0].set_xlabel("bits per pixel (real bitstreams)")
    axes[0].set_ylabel("PSNR (dB)")
    axes[0].set_title(f"mean over {len(names)} held-out photographs")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    width = 0.38
    idx = np.arange(len(names))
    for k, m in enumerate(METHODS[1:]):
        vals = [-100 * summary["loss_reduction_per_image"][m][n] for n in names]
        axes[1].bar(idx + (k - 0.5) * width, vals, width, color=styles[m][0], label=m)
    axes[1].set_xticks(idx)
    axes[1].set_xticklabels(names)
    axes[1].set_ylabel("R-D loss vs amortized (%), mean over lambdas")
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].grid(alpha=0.3, axis="y")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = args.checkpoints or sorted(glob.glob(os.path.join(ROOT, "results", "codec_lambda*.pt")))
    if not paths:
        raise SystemExit("no codec checkpoints: run benchmarks/train_codec.py first")
    if args.crop % 64:
        raise SystemExit(f"--crop must be a multiple of 64, got {args.crop}")
    start = time.time()
    runs = []
    if args.combine:
        paths = []
        for part in args.combine:
            with open(part) as fh:
                loaded = json.load(fh)
            runs += loaded["runs"]
            paths += [os.path.join(ROOT, p) for p in loaded["checkpoints"]]
            for key in ("images", "crop", "steps", "lr", "posterior_steps", "posterior_lr"):
                setattr(args, key, loaded["args"][key])
        print(f"merged {len(runs)} runs from {len(args.combine)} files")
    codecs = [load_checkpoint(p) for p in paths]
    if not args.combine:
        xs = [center_crop(load_photo(n), args.crop) for n in args.images]
        for path, codec in zip(paths, codecs):
            print(f"codec {os.path.basename(path)} (lambda {codec.lmbda:g})", flush=True)
            runs.append(run_codec(codec, args.images, xs, args))
    if len(runs) < 2:
        print(json.dumps(runs, indent=1, default=float)[:2000])
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(
                    {
                        "args": vars(args),
                        "checkpoints": [os.path.relpath(p, ROOT) for p in paths],
                        "runs": runs,
                        "seconds": time.time() - start,
                    },
                    fh,
                    indent=1,
                    default=float,
                )
        return 0
    summary = summarize(runs, args.images)
    gap_rows = full_gap(codecs, args.images) if args.full_gap else []
    print_table(runs, summary, gap_rows)
    print(f"\ntotal {time.time() - start:.0f} s")
    result = {
        "args": vars(args),
        "checkpoints": [os.path.relpath(p, ROOT) for p in paths],
        "runs": runs,
        "summary": summary,
        "full_gap": gap_rows,
        "seconds": time.time() - start,
        "torch_threads": torch.get_num_threads(),
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, default=float)
    if args.plot:
        plot(args.plot, runs, summary, args.images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
