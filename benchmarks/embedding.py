"""Evidence for the embedding stage: task-aware vs post-hoc compression of an NLU model's word table.

Trains the joint BiLSTM intent/slot model (:mod:`adacomp.workloads.nlu`, 300-d embeddings) on ATIS, then
compresses its embedding table at each ratio with every method and scores intent accuracy and
slot F1 (conlleval spans) on the official ATIS test split (893 utterances):

* ``task_aware``: compact codes learned with the task loss for ``--steps`` steps (rest of the
  model trained too);
* ``pq`` / ``svd``: post-hoc, and ``+ft``: the same ``--steps`` of fine-tuning the rest of the
  model with the compressed table frozen (the fair comparison);
* ``int8``: row-wise 8-bit, which cannot go past ~74.7 %: run once at its own ratio.

An uncompressed model fine-tuned for the same steps is the reference for the ``+ft`` rows
(``ref ft``). With ``--quantize-rest`` every compressed model is also scored with the LSTM and
linear heads in dynamic int8 (``torch.ao``), and the whole model's stored bytes are reported.

    python benchmarks/embedding.py --quantize-rest --json results/embedding.json \
        --plot results/embedding.png

``--dev N`` scores on the last ``N`` training utterances instead (the model trains on the rest), and
``--grid logit_lr:codebook_lr,...`` runs task-aware once per setting: a check of the learning
rates that does not look at the test split.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adacomp.stages import EmbeddingConfig, compress_, module_bytes  # noqa: E402
from adacomp.workloads.data import DataNotFound  # noqa: E402
from adacomp.workloads.nlu import (  # noqa: E402
    JointBiLSTM,
    atis_batches,
    evaluate_nlu,
    joint_loss,
    load_atis,
    quantize_rest_,
    storage_bytes,
)

TARGET_RATIO, TARGET_LOSS = 0.974, 0.037


def _finetune_reference(model, data, steps, lr):
    """The uncompressed model trained ``steps`` more steps (Adam, cosine), as the +ft rows are."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    it = iter(())
    for _ in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(data)
            batch = next(it)
        loss = joint_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model


def _run(base, method, ratio, steps, data, test, args, codes=None, rates=None):
    model = copy.deepcopy(base)
    kw = dict(ratio=ratio, method=method, steps=steps, seed=args.seed)
    if codes:
        kw.update(codes)
    if rates:
        kw.update(rates)
    start = time.perf_counter()
    report = compress_(
        model,
        EmbeddingConfig(**kw),
        data=data,
        train_step=joint_loss,
        filter_fn=lambda m, name: name == "embedding",
    )
    seconds = time.perf_counter() - start
    rec = report.layers[0]
    row = {
        "ratio": ratio,
        "method": method,
        "variant": "task" if method == "task_aware" else ("+ft" if steps else "post-hoc"),
        "steps": steps,
        "choice": rec.detail + (" lr {logit_lr:g}/{codebook_lr:g}".format(**rates) if rates else ""),
        "table_bytes": rec.bytes_after,
        "achieved": rec.choice["achieved"],
        "model_bytes": storage_bytes(model),
        "seconds": seconds,
        **evaluate_nlu(model, test),
    }
    for key in ("num_codebooks", "codebook_size", "rank", "changed_codes"):
        if rec.choice.get(key) is not None:
            row[key] = rec.choice[key]
    if args.quantize_rest:
        quantize_rest_(model)
        scores = evaluate_nlu(model, test)
        row.update(
            q_model_bytes=storage_bytes(model), q_intent_acc=scores["intent_acc"], q_slot_f1=scores["slot_f1"]
        )
    return row


def _split(data, cut, tail=False):
    """The first ``cut`` utterances of ``data`` (or the rest, ``tail=True``), same vocabulary."""
    sl = slice(cut, None) if tail else slice(0, cut)
    return dataclasses.replace(
        data,
        words=data.words[sl],
        slots=data.slots[sl],
        lengths=data.lengths[sl],
        intents=data.intents[sl],
        intent_sets=data.intent_sets[sl],
        tokens=data.tokens[sl],
    )


def _rel(x, base):
    return (x - base) / base


def _table(rows, base, quantize_rest):
    head = (
        "| ratio | method | choice | table bytes | achieved | model bytes | intent acc | vs base "
        "| slot F1 | vs base |"
    )
    sep = "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"
    if quantize_rest:
        head += " model bytes (int8 rest) | intent acc | slot F1 |"
        sep += "---:|---:|---:|"
    lines = [head, sep]
    for r in rows:
        name = r["method"] + (" +ft" if r["variant"] == "+ft" else "")
        line = (
            f"| {100 * r['ratio']:.1f}% | {name} | {r['choice']} | {r['table_bytes']:,} | "
            f"{100 * r['achieved']:.2f}% | {r['model_bytes']:,} | {100 * r['intent_acc']:.2f}% | "
            f"{100 * _rel(r['intent_acc'], base['intent_acc']):+.2f}% | {100 * r['slot_f1']:.2f}% | "
            f"{100 * _rel(r['slot_f1'], base['slot_f1']):+.2f}% |"
        )
        if quantize_rest:
            line += (
                f" {r['q_model_bytes']:,} | {100 * r['q_intent_acc']:.2f}% | {100 * r['q_slot_f1']:.2f}% |"
            )
        lines.append(line)
    return "\n".join(lines)


def _plot(rows, base, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {
        ("task_aware", "task"): ("task-aware", "C3", "o", "-"),
        ("pq", "post-hoc"): ("PQ (k-means)", "C0", "s", "--"),
        ("pq", "+ft"): ("PQ + fine-tune rest", "C0", "s", "-"),
        ("svd", "post-hoc"): ("SVD", "C2", "^", "--"),
        ("svd", "+ft"): ("SVD + fine-tune rest", "C2", "^", "-"),
        ("int8", "post-hoc"): ("int8 rows", "C1", "D", ""),
        ("int8", "+ft"): ("int8 rows + fine-tune rest", "C1", "d", ""),
    }
    for ax, key, title in zip(axes, ("intent_acc", "slot_f1"), ("intent accuracy", "slot F1 (spans)")):
        for (method, variant), (label, color, marker, ls) in styles.items():
            pts = sorted(
                (r["achieved"], r[key]) for r in rows if r["method"] == method and r["variant"] == variant
            )
            if pts:
                xs = [100 * (1 - a) for a, _ in pts]
                ax.plot(
                    xs, [100 * v for _, v in pts], color=color, marker=marker, ls=ls or "none", label=label
                )
        ax.axhline(100 * base[key], color="k", lw=1, label="uncompressed")
        ax.axhline(100 * base[key] * (1 - TARGET_LOSS), color="k", lw=1, ls=":", label="-3.7 % (relative)")
        ax.axvline(100 * (1 - TARGET_RATIO), color="grey", lw=0.8, ls="-.")
        ax.set_xscale("log")
        ax.set_xticks([1, 2.6, 5, 10, 25.3], ["1", "2.6", "5", "10", "25.3"])
        ax.minorticks_off()
        ax.set_xlabel("table size kept (% of fp32 bytes, log)")
        ax.set_ylabel(f"{title} (%)")
        ax.set_title(f"ATIS test {title}")
        lo = min(100 * r[key] for r in rows if r["variant"] != "post-hoc" or r["method"] == "pq")
        ax.set_ylim(max(0.0, lo - 3), 100 * base[key] + 2)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.9,0.95,0.974,0.99")
    ap.add_argument("--methods", default="task_aware,pq,svd,int8")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300, help="task-aware steps = fine-tuning steps of +ft rows")
    ap.add_argument("--no-ft", action="store_true", help="skip the +ft variants of the post-hoc methods")
    ap.add_argument("--quantize-rest", action="store_true", help="also score with the LSTM/heads in int8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--dev",
        type=int,
        default=0,
        help="hold out the last N training utterances and score on them instead of the test split",
    )
    ap.add_argument(
        "--grid",
        default="",
        help="task-aware (logit_lr:codebook_lr) settings to compare, e.g. 0.01:0.001,0.1:0.003",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--save-model", default=None, help="save the trained uncompressed model here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = args.methods.split(",")
    try:
        train, test = load_atis()
        if args.dev:
            train, test = (
                _split(train, len(train) - args.dev),
                _split(train, len(train) - args.dev, tail=True),
            )
            print(f"scoring on {len(test)} held-out training utterances (--dev), training on {len(train)}")
    except DataNotFound as exc:
        print(f"ATIS not available: {exc}", file=sys.stderr)
        return 2
    from adacomp.workloads.nlu import train_nlu

    torch.manual_seed(args.seed)
    base_model = JointBiLSTM(
        len(train.vocab), len(train.slot_tags), len(train.intent_names), hidden=args.hidden
    )
    share = module_bytes(base_model.embedding) / module_bytes(base_model)
    print(
        f"vocabulary {len(train.vocab)}, {len(train.slot_tags)} slot tags, {len(train.intent_names)} "
        f"intents; table {module_bytes(base_model.embedding):,} of {module_bytes(base_model):,} bytes "
        f"({100 * share:.1f}%)"
    )
    start = time.perf_counter()
    summary = train_nlu(base_model, train, epochs=args.epochs, seed=args.seed)
    base = evaluate_nlu(base_model, test)
    print(
        f"trained {args.epochs} epochs in {summary['seconds']:.0f} s: intent "
        f"{100 * base['intent_acc']:.2f}%, slot F1 {100 * base['slot_f1']:.2f}%",
        flush=True,
    )
    if args.save_model:
        torch.save(base_model.state_dict(), args.save_model)
    data = atis_batches(train, 32, generator=args.seed + 1)
    ref_model = _finetune_reference(copy.deepcopy(base_model), data, args.steps, EmbeddingConfig().lr)
    ref_ft = evaluate_nlu(ref_model, test)
    print(
        f"uncompressed + {args.steps} steps: intent {100 * ref_ft['intent_acc']:.2f}%, "
        f"slot F1 {100 * ref_ft['slot_f1']:.2f}%",
        flush=True,
    )
    quantized_base = None
    if args.quantize_rest:
        qb = copy.deepcopy(base_model)
        quantize_rest_(qb)
        quantized_base = {"model_bytes": storage_bytes(qb), **evaluate_nlu(qb, test)}
    rows = []

    def done(row):
        rows.append(row)
        print(
            f"  {100 * row['ratio']:.1f}% {row['method']:<10} {row['variant']:<8} {row['choice']:<18} "
            f"achieved {100 * row['achieved']:.2f}%  intent {100 * row['intent_acc']:.2f}%  "
            f"slot F1 {100 * row['slot_f1']:.2f}%  ({row['seconds']:.0f} s)",
            flush=True,
        )

    for ratio in ratios:
        codes = None
        if "pq" in methods:
            done(_run(base_model, "pq", ratio, 0, data, test, args))
            codes = {"num_codebooks": rows[-1]["num_codebooks"], "codebook_size": rows[-1]["codebook_size"]}
            if not args.no_ft:
                done(_run(base_model, "pq", ratio, args.steps, data, test, args, codes))
        if "svd" in methods:
            done(_run(base_model, "svd", ratio, 0, data, test, args))
            if not args.no_ft:
                done(_run(base_model, "svd", ratio, args.steps, data, test, args))
        if "task_aware" in methods:
            grid = [
                dict(zip(("logit_lr", "codebook_lr"), map(float, g.split(":"))))
                for g in args.grid.split(",")
                if g
            ]
            for rates in grid or [None]:
                done(_run(base_model, "task_aware", ratio, args.steps, data, test, args, codes, rates))
    if "int8" in methods:
        done(_run(base_model, "int8", 0.74, 0, data, test, args))
        if not args.no_ft:
            done(_run(base_model, "int8", 0.74, args.steps, data, test, args))
    total = time.perf_counter() - start

    print()
    print(
        f"uncompressed: intent {100 * base['intent_acc']:.2f}%, slot F1 {100 * base['slot_f1']:.2f}%, "
        f"{storage_bytes(base_model):,} bytes (table {100 * share:.1f}%)"
    )
    print(_table(rows, base, args.quantize_rest))
    checks = {}
    at = [r for r in rows if abs(r["ratio"] - TARGET_RATIO) < 1e-9]
    task = [r for r in at if r["method"] == "task_aware"]
    if task:
        t = task[0]
        others = [r for r in at if r["method"] != "task_aware"]
        checks = {
            "loss_intent": -_rel(t["intent_acc"], base["intent_acc"]),
            "loss_slot_f1": -_rel(t["slot_f1"], base["slot_f1"]),
            "within_3.7%": max(
                -_rel(t["intent_acc"], base["intent_acc"]), -_rel(t["slot_f1"], base["slot_f1"])
            )
            < TARGET_LOSS,
            "beats_all_baselines_both_metrics": all(
                t["intent_acc"] > r["intent_acc"] and t["slot_f1"] > r["slot_f1"] for r in others
            ),
            "beats_all_baselines_on_slot_f1": all(t["slot_f1"] > r["slot_f1"] for r in others),
            "at_least_ties_all_baselines_on_intent": all(t["intent_acc"] >= r["intent_acc"] for r in others),
        }
        print(f"\ntargets at {100 * TARGET_RATIO:.1f}%: {json.dumps(checks)}")
    print(f"total {total / 60:.1f} min")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "vocab_size": len(train.vocab),
                    "table_share": share,
                    "base": {**base, "model_bytes": storage_bytes(base_model), "train": summary},
                    "reference_ft": ref_ft,
                    "quantized_base": quantized_base,
                    "rows": rows,
                    "targets": checks,
                    "seconds": total,
                },
                indent=1,
            )
        )
    if args.plot:
        _plot(rows, base, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
