"""Evidence for the DirNet dictionary stage (issue 7): a 2-layer char LSTM on Shakespeare.

Trains (or loads, ``--model``) a 2-layer character LSTM language model (``adacomp.workloads.models.CharLSTM``:
embedding 64, hidden 256) on the Shakespeare corpus, then compresses its ``nn.LSTM`` by each
method at each ratio (default 4x and 8x of the LSTM's stored bytes, weights and biases):

* ``dirnet``: ``DictionaryConfig(ratio=r)``, atoms per layer and sparsity across layers chosen by
  the stage (shared projection dictionaries);
* ``uniform``: DirNet without the adaptive choices, one atom fraction and one code density
  (``s = k / 4``) for every group, at DirNet's stored bytes;
* ``svd``: the shared-projection SVD baseline (Prabhavalkar et al. 2016) at DirNet's stored bytes.

Every compressed model, and the dense model, then gets the same short fine-tuning (``--ft-steps``
of Adam, cosine decay from ``--ft-lr``, gradient clipping at 1). Validation bits per character
are measured on the first ``--val-chars`` characters of the validation split (state carried
across windows). Finally the per-token inference time of the dense and the 8x DirNet model is
measured on one CPU thread, feeding one character at a time (streaming generation), with the
compressed LSTM in each inference mode, and one call of the compressed LSTM alone is timed in
both modes at four input shapes.

Prints a table (and the same as Markdown), writes ``--json`` and ``--plot``::

    python benchmarks/dictionary.py --json results/dictionary.json --plot results/dictionary.png

    python benchmarks/dictionary.py --ratios 8 --methods dirnet svd --ft-steps 600 \
        --json results/dictionary_ft600.json --plot results/dictionary_ft600.png

The stage's own running time (no data, random weights; issue 16)::

    python benchmarks/dictionary.py --time-stage --ratios 4

The dense model is saved to ``--model`` (default ``results/dictionary_lstm.pt``) and reused.
About 5 minutes on 2 idle cores with the model saved (17 on a busy machine); training it adds
a few minutes idle (27 on the busy machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from adacomp.stages import DictionaryConfig, compress_, module_bytes, set_inference  # noqa: E402
from adacomp.workloads import data as datasets  # noqa: E402
from adacomp.workloads.models import CharLSTM  # noqa: E402

METHODS = ("dirnet", "uniform", "svd")
BENCH_GRID = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "results", "dictionary_lstm.pt"))
    ap.add_argument("--retrain", action="store_true", help="train even if --model exists")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--embed", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=1800)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate of the dense model")
    ap.add_argument("--ratios", type=float, nargs="+", default=[4.0, 8.0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument(
        "--atom-grid",
        type=float,
        nargs="+",
        default=None,
        help="DirNet's candidate atom counts, fractions of the input size (default here: "
        f"{' '.join(f'{g:g}' for g in BENCH_GRID)}, fewer than the stage's default to fit the CPU "
        "budget; 3/4 and 1 are never chosen at 4x and 8x here; with --time-stage: the stage's default)",
    )
    ap.add_argument(
        "--time-stage",
        action="store_true",
        help="only time compress_ at each --ratios on a 2-layer nn.LSTM(--embed, --hidden) with random "
        "weights (no data, no training) and exit",
    )
    ap.add_argument("--ft-steps", type=int, default=200, help="fine-tuning steps of every model")
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    ap.add_argument(
        "--no-dense-ft", action="store_true", help="skip fine-tuning the dense model (its row shows no ft)"
    )
    ap.add_argument("--val-chars", type=int, default=100_000)
    ap.add_argument("--tokens", type=int, default=300, help="tokens timed per model (per-token latency)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- training and evaluation


def lm_loss(model, batch, state=None):
    x, y = batch
    logits, state = model(x, state)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)), state


def train_lm(model, train, steps, batch, seq, lr, seed, log=print, label="train"):
    """Adam with cosine decay to 0, gradient clipping at 1, hidden state carried across batches."""
    gen = torch.Generator().manual_seed(seed)
    batches = datasets.char_batches(train, batch, seq, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    step, start, losses = 0, time.perf_counter(), []
    every = max(1, min(100, steps // 4))
    while step < steps:
        state = None
        for b in batches:
            if state is not None:
                state = tuple(s.detach() for s in state)
            loss, state = lm_loss(model, b, state)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
            if step % every == 0 or step == steps:
                bpc = sum(losses[-every:]) / len(losses[-every:]) / math.log(2)
                log(f"  {label} step {step}/{steps}: {bpc:.3f} bpc, {time.perf_counter() - start:.0f} s")
            if step >= steps:
                break
    model.eval()
    return losses


def bits_per_char(model, tokens, streams=20, window=250):
    """Validation bits per character, ``streams`` contiguous streams, state carried across windows."""
    model.eval()
    n = (tokens.numel() - 1) // streams
    x = tokens[: streams * n].view(streams, n)
    y = tokens[1 : streams * n + 1].view(streams, n)
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for i in range(0, n, window):
            logits, state = model(x[:, i : i + window], state)
            total += float(
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), y[:, i : i + window].reshape(-1), reduction="sum"
                )
            )
            count += y[:, i : i + window].numel()
    return total / count / math.log(2)


def eval_bpc(model, tokens):
    """bpc with the compressed LSTM on its dense path (same numbers as codes, faster for long input)."""
    modes = {m: getattr(m, "inference", None) for m in model.modules()}
    set_inference(model, "dense")
    try:
        return bits_per_char(model, tokens)
    finally:
        for m, mode in modes.items():
            if mode is not None:
                m.inference = mode


def per_token_seconds(model, tokens, count):
    """Median seconds per token when feeding one character at a time (batch 1), state carried
    (the median, since the machine is shared and a mean would count other jobs' bursts)."""
    model.eval()
    times = []
    with torch.no_grad():
        state = None
        for t in range(20):  # warm-up
            _, state = model(tokens[t : t + 1].view(1, 1), state)
        state = None
        for t in range(count):
            start = time.perf_counter()
            _, state = model(tokens[t : t + 1].view(1, 1), state)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def build(vocab_size, args):
    return CharLSTM(vocab_size, embed=args.embed, hidden=args.hidden, layers=2)


def dense_model(args, train, log):
    if os.path.exists(args.model) and not args.retrain:
        ckpt = torch.load(args.model, weights_only=True)
        model = CharLSTM(
            len(ckpt["vocab"]), embed=ckpt["embed"], hidden=ckpt["hidden"], layers=ckpt["layers"]
        )
        model.load_state_dict(ckpt["state_dict"])
        log(f"loaded the dense model from {args.model} ({ckpt['steps']} training steps)")
        return model, {k: v for k, v in ckpt.items() if k != "state_dict"}
    torch.manual_seed(args.seed)
    model = build(train.vocab_size, args)
    log(f"training the dense model ({args.train_steps} steps of {args.batch_size} x {args.seq_len})")
    start = time.perf_counter()
    train_lm(model, train, args.train_steps, args.batch_size, args.seq_len, args.lr, args.seed, log)
    meta = {
        "vocab": train.vocab,
        "embed": args.embed,
        "hidden": args.hidden,
        "layers": 2,
        "steps": args.train_steps,
        "batch": args.batch_size,
        "seconds": time.perf_counter() - start,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.model)), exist_ok=True)
    torch.save({"state_dict": model.state_dict(), **meta}, args.model)
    return model, meta


# --------------------------------------------------------------------------- the run


def run(args, log=print):
    torch.set_num_threads(args.threads)
    train = datasets.load("shakespeare", split="train")
    val = datasets.load("shakespeare", split="val").data[: args.val_chars]
    base, meta = dense_model(args, train, log)
    lstm_bytes = module_bytes(base.lstm)
    result = {
        "args": vars(args),
        "model": {k: v for k, v in meta.items() if k != "vocab"},
        "lstm_bytes": lstm_bytes,
        "model_bytes": module_bytes(base),
        "rows": [],
    }
    dense_bpc = eval_bpc(base, val)
    result["dense"] = {"bpc": dense_bpc, "bpc_ft": None, "bytes": lstm_bytes}

    def finetune(model, label):  # the same short fine-tuning for every model
        train_lm(
            model, train, args.ft_steps, args.batch_size, args.seq_len, args.ft_lr, args.seed + 1, log, label
        )

    if not args.no_dense_ft:
        tuned = copy.deepcopy(base)
        finetune(tuned, "ft dense")
        result["dense"]["bpc_ft"] = eval_bpc(tuned, val)
    ft = result["dense"]["bpc_ft"]
    ft_text = "not fine-tuned" if ft is None else f"{ft:.4f} after the same fine-tuning"
    log(f"dense: {dense_bpc:.4f} bpc, {ft_text}; LSTM {lstm_bytes:,} bytes")
    cache: dict = {}  # dictionaries and error curves, shared by all ratios and methods
    grid = tuple(args.atom_grid or BENCH_GRID)
    keep = {}
    for ratio in args.ratios:
        budget = None
        for method in args.methods:
            model = copy.deepcopy(base)
            if method == "dirnet":
                config = DictionaryConfig(ratio=ratio, atom_grid=grid)
            else:
                if budget is None:
                    raise ValueError("list dirnet first: the other methods use its stored bytes")
                config = DictionaryConfig(budget_bytes=budget, method=method, atom_grid=grid)
            log(f"{method} at {ratio:g}x ...")
            report = compress_(model, config, filter_fn=lambda m, n: n == "lstm", cache=cache, log=log)
            rec = report.layers[0]
            if method == "dirnet":
                budget = rec.bytes_after
            bpc = eval_bpc(model, val)
            finetune(model, f"ft {method} {ratio:g}x")
            bpc_ft = eval_bpc(model, val)
            row = {
                "ratio_target": ratio,
                "method": method,
                "bytes": rec.bytes_after,
                "ratio": rec.ratio,
                "relative_error": report.info["relative_error"],
                "bpc": bpc,
                "bpc_ft": bpc_ft,
                "vs_dense_ft": bpc_ft / result["dense"]["bpc"] - 1,
                "seconds": report.seconds,
                "inference": rec.choice["inference"],
                "inference_seconds": report.info["inference_seconds"].get("lstm"),
                "storage": {
                    k: rec.choice[k] for k in ("dictionary_bytes", "value_bytes", "index_bytes", "bias_bytes")
                },
                "groups": report.info["group_choices"],
            }
            result["rows"].append(row)
            log(
                f"  {method} {ratio:g}x: {rec.bytes_after:,} bytes ({rec.ratio:.2f}x), rel. error "
                f"{row['relative_error']:.4f}, {bpc:.4f} bpc, {bpc_ft:.4f} after fine-tuning, "
                f"{report.seconds:.0f} s"
            )
            keep[(method, ratio)] = model
    # per-token latency on CPU (one thread), dense vs the most compressed DirNet model
    torch.set_num_threads(1)
    tokens = val[: args.tokens + 40]
    timing = {"dense": per_token_seconds(base, tokens, args.tokens)}
    top = max(args.ratios)
    if ("dirnet", top) in keep:
        small = keep[("dirnet", top)]
        for mode in ("codes", "dense"):
            set_inference(small, mode)
            timing[f"dirnet {top:g}x, {mode}"] = per_token_seconds(small, tokens, args.tokens)
    result["per_token_seconds"] = timing
    if ("dirnet", top) in keep:  # one call of the compressed LSTM alone, per input shape and mode
        from adacomp.stages.dictionary import _time_modes

        lstm = keep[("dirnet", top)].lstm
        result["lstm_call_seconds"] = [
            {"batch": b, "steps": t, **_time_modes(lstm, b, t, repeats=50 if t == 1 else 5)}
            for b, t in ((1, 1), (1, 32), (20, 1), (20, 250))
        ]
    torch.set_num_threads(args.threads)
    return result


# --------------------------------------------------------------------------- output


def table(result) -> str:
    d = result["dense"]
    lines = [
        "| ratio | method | LSTM bytes | achieved | rel. error | val bpc | val bpc ft | vs dense |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
        f"| 1x | dense | {d['bytes']:,} | 1.00x | 0 | {d['bpc']:.4f} | "
        + (
            "- | - |"
            if d["bpc_ft"] is None
            else f"{d['bpc_ft']:.4f} | {100 * (d['bpc_ft'] / d['bpc'] - 1):+.1f}% |"
        ),
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['ratio_target']:g}x | {r['method']} | {r['bytes']:,} | {r['ratio']:.2f}x | "
            f"{r['relative_error']:.4f} | {r['bpc']:.4f} | {r['bpc_ft']:.4f} | "
            f"{100 * r['vs_dense_ft']:+.1f}% |"
        )
    return "\n".join(lines)


def choices_table(result) -> str:
    lines = [
        "| ratio | method | group | shape | atoms k | non-zeros s | dict bytes | value bytes | index bytes |"
        " rel. error |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        for g in r["groups"]:
            s = "dense" if g["dense_codes"] else g["nonzeros"]
            lines.append(
                f"| {r['ratio_target']:g}x | {r['method']} | {g['group']} | "
                f"{g['shape'][0]}x{g['shape'][1]} | {g['atoms']} | {s} | {g['dictionary_bytes']:,} | "
                f"{g['value_bytes']:,} | {g['index_bytes']:,} | "
                f"{g['relative_error']:.4f} |"
            )
    return "\n".join(lines)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    d = result["dense"]
    ax.axhline(d["bpc"], color="k", lw=1, label=f"dense {d['bpc']:.3f}")
    ax.axhline(d["bpc"] * 1.05, color="k", lw=1, ls=":", label="dense + 5 %")
    colors = {"dirnet": "C0", "uniform": "C1", "svd": "C2"}
    for method in colors:
        rows = [r for r in result["rows"] if r["method"] == method]
        if not rows:
            continue
        x = [r["ratio"] for r in rows]
        ax.plot(x, [r["bpc"] for r in rows], "o--", color=colors[method], alpha=0.5, label=f"{method}, no ft")
        ax.plot(x, [r["bpc_ft"] for r in rows], "o-", color=colors[method], label=f"{method}, fine-tuned")
    ax.set_xlabel("compression of the LSTM's stored bytes (x)")
    ax.set_ylabel("validation bits per character")
    ax.set_title("2-layer char LSTM on Shakespeare")
    ax.legend(fontsize=8)
    t = result["per_token_seconds"]
    bx.barh(list(t), [1e6 * v for v in t.values()], color=["k"] + ["C0"] * (len(t) - 1))
    bx.set_xlabel("µs per token (batch 1, 1 CPU thread)")
    bx.set_title("streaming inference")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def time_stage(args, log=print) -> dict:
    """Seconds of ``compress_`` (DirNet, each ratio, a fresh cache) on a 2-layer
    ``nn.LSTM(embed, hidden)`` with PyTorch's random initialization: the stage's own cost,
    without data or training (issue 16: 682 s at 4x with 0.2.0's default grid)."""
    out = {"args": vars(args), "runs": []}
    for ratio in args.ratios:
        torch.manual_seed(args.seed)
        model = torch.nn.Sequential()
        model.lstm = torch.nn.LSTM(args.embed, args.hidden, num_layers=2)
        extra = {"atom_grid": tuple(args.atom_grid)} if args.atom_grid else {}
        config = DictionaryConfig(ratio=ratio, inference="dense", **extra)
        start = time.perf_counter()
        report = compress_(model, config, log=log)
        seconds = time.perf_counter() - start
        log(str(report))
        log(
            f"{ratio:g}x, atom grid {' '.join(f'{g:g}' for g in config.atom_grid)}: {seconds:.1f} s "
            f"(dictionaries and error curves {report.info['selection_seconds']:.1f} s), relative error "
            f"{report.info['relative_error']:.4f}"
        )
        out["runs"].append(
            {
                "ratio": ratio,
                "atom_grid": list(config.atom_grid),
                "seconds": seconds,
                "selection_seconds": report.info["selection_seconds"],
                "relative_error": report.info["relative_error"],
                "choice": report.layers[0].detail,
            }
        )
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.time_stage:
        result = time_stage(args, log=lambda s: print(s, flush=True))
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return
    start = time.perf_counter()
    result = run(args, log=lambda s: print(s, flush=True))
    result["seconds"] = time.perf_counter() - start
    print()
    print(table(result))
    print()
    print(choices_table(result))
    print()
    for k, v in result["per_token_seconds"].items():
        print(f"per token, {k}: {1e6 * v:.0f} µs")
    for row in result.get("lstm_call_seconds", []):
        print(
            f"one call of the {max(args.ratios):g}x DirNet LSTM, batch {row['batch']} x {row['steps']} "
            f"steps: "
            f"codes {1e3 * row['codes']:.2f} ms, dense rebuild {1e3 * row['dense']:.2f} ms"
        )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot(result, args.plot)
    print(f"total {result['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
