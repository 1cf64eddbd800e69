"""What a user would pick instead of a stage (issue 16): int8, fp16, plain SVD, and each stage + int8.

Every variant of a model is scored on its task, saved (``torch.save(model.state_dict())`` to a
buffer: the bytes on disk, the same way for all) and timed (median of repeats after warm-up, one
CPU thread, at batch 1 and batched). Each seed trains (or, for the char-LSTM, fine-tunes) its own
models; tables show the mean and its standard error over seeds. Baselines
(:mod:`adacomp.stages.baselines`):

* ``int8``: ``torch.ao`` dynamic int8 quantization of every ``nn.Linear`` / ``nn.LSTM``;
* ``fp16``: the weights stored at half precision (half the bytes), scored with the fp16-rounded
  weights; computes in fp32, so its latency is the dense model's;
* ``plain SVD`` (low-rank only): truncated SVD at the stage's parameter budget, small layers (the
  10-output head) dense and every other layer cut by the same factor, with the *same* fine-tuning
  steps as the stage;
* ``<stage> + int8``: ``quantize_dynamic`` applied after the stage (and its fine-tuning).

Stages and models:

* ``lowrank``: an MLP (64-256-256-10) on scikit-learn's digits (1438 training images, 300 of them
  held out to score BSR's candidates; 359 test images), trained per seed; BSR
  (``LowRankConfig(method="bsr")``, ``--regularize-steps`` of modified stable-rank training then
  plain fine-tuning, ``--ft-steps`` in all) vs plain SVD (``--ft-steps`` of plain fine-tuning)
  at each ``--ratios``; also BSR's allocation with plain fine-tuning only (``bsr alloc, plain ft``)
  and both allocations without any training (``no ft``).
* ``dirnet``: a 2-layer char-LSTM (embedding 64, hidden ``--lstm-hidden``) on Shakespeare, trained
  once (``--lstm-steps``, saved to ``--lstm-model`` and reused); each seed compresses it with
  DirNet (dictionary-learning seed) at ``--dirnet-ratios`` and fine-tunes every model, the dense
  one too, for ``--lstm-ft-steps`` (its own batch order); ``svd`` is DirNet's shared-projection
  SVD at DirNet's bytes. Validation bits per character (lower is better); batch 1 = one character
  at a time (streaming generation, state carried), batched = one call on 32 x 100 characters.
* ``embedding``: the joint BiLSTM on ATIS (``benchmarks/embedding.py``'s setting), trained per
  seed; the word table compressed by ``--atis-ratio`` with task-aware codes vs k-means PQ + the
  same ``--atis-steps`` of fine-tuning the rest, and row-wise int8 (74.7 %, its limit) + the same
  fine-tuning; ``+ int8 rest`` quantizes the BiLSTM and heads too. Batch 1 = one utterance of
  median length, batched = 64 test utterances.

Commands::

    python benchmarks/baselines.py --stage lowrank --seeds 0 1 2 3 4 --ratios 0.5 0.7 0.8 0.9 0.95 \
        --json results/baselines_lowrank.json                        # 4 min at load ~7-11, 1 thread
    python benchmarks/baselines.py --stage dirnet --json results/baselines_dirnet.json
        # 14 min at load 5-15, plus 11 min to train the LSTM the first time (saved, reused)
    python benchmarks/baselines.py --stage embedding --json results/baselines_embedding.json  # 14 min
    python benchmarks/baselines.py --stage lowrank --quick     # seconds: the smoke test's run
    python benchmarks/baselines.py --from-json results/baselines_*.json --markdown

``--stage all`` runs the three in turn. A ``--seeds 0`` rerun of a stage (3 minutes) times its
models again, all together; ``--from-json RUNS --timing-from RERUNS --json OUT`` combines runs and
takes the latencies from the reruns (``docs/stages_baselines.md`` does this).

The machine's 1-minute load average is recorded next to every timing (``load`` in the JSON and
the tables): latencies on a shared machine are only comparable within one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from adacomp.stages import (  # noqa: E402
    DictionaryConfig,
    EmbeddingConfig,
    LowRankConfig,
    compress_,
    finetune,
)
from adacomp.stages.baselines import (  # noqa: E402
    fp16_rounded,
    fp16_state_dict,
    mean_se,
    plain_svd_config,
    quantize_int8,
    saved_bytes,
)
from adacomp.workloads import data as datasets  # noqa: E402
from adacomp.workloads.models import accuracy  # noqa: E402

STAGES = ("lowrank", "dirnet", "embedding")
SPLIT_SEED = 0


def load1() -> float:
    """The machine's 1-minute load average."""
    return round(os.getloadavg()[0], 2)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="all", choices=(*STAGES, "all"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--quick", action="store_true", help="tiny settings (one seed): a smoke test, not evidence"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: fair timings on a shared machine)"
    )
    ap.add_argument("--json", default=None, help="write rows, summary and targets here")
    ap.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    ap.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        help="no run: print (and with --json write) the tables of these JSONs, combined",
    )
    ap.add_argument(
        "--timing-from",
        nargs="+",
        default=None,
        help="with --from-json: take the latencies from these JSONs (e.g. a --seeds 0 rerun "
        "whose models were all timed together)",
    )
    g = ap.add_argument_group("lowrank (MLP on digits)")
    g.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7, 0.8])
    g.add_argument("--hidden", type=int, nargs=2, default=[256, 256])
    g.add_argument("--epochs", type=int, default=40, help="training epochs of each seed's MLP")
    g.add_argument("--calib", type=int, default=300, help="held-out training images scoring BSR")
    g.add_argument("--ft-steps", type=int, default=200, help="training steps after compression, every method")
    g.add_argument("--regularize-steps", type=int, default=100, help="of --ft-steps, BSR's msr steps")
    g.add_argument("--ft-lr", type=float, default=0.01)
    g = ap.add_argument_group("dirnet (char-LSTM on Shakespeare)")
    g.add_argument("--lstm-model", default=None, help="default results/baselines_lstm_h{hidden}.pt")
    g.add_argument("--lstm-hidden", type=int, default=128)
    g.add_argument(
        "--lstm-steps", type=int, default=6000, help="training steps (32 x 100 chars) if not saved"
    )
    g.add_argument("--lstm-ft-steps", type=int, default=200)
    g.add_argument("--dirnet-ratios", type=float, nargs="+", default=[4.0, 8.0])
    g.add_argument("--val-chars", type=int, default=100_000)
    g.add_argument("--tokens", type=int, default=300, help="characters timed one at a time")
    g = ap.add_argument_group("embedding (joint BiLSTM on ATIS)")
    g.add_argument("--atis-epochs", type=int, default=12)
    g.add_argument("--atis-steps", type=int, default=300)
    g.add_argument("--atis-ratio", type=float, default=0.974)
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.epochs, args.ft_steps, args.regularize_steps = 8, 20, 10
        args.lstm_hidden, args.lstm_steps, args.lstm_ft_steps = 32, 60, 10
        args.dirnet_ratios, args.val_chars, args.tokens = [4.0], 5000, 30
        args.atis_epochs, args.atis_steps = 1, 10
    if args.lstm_model is None:
        tag = "_quick" if args.quick else ""
        args.lstm_model = os.path.join(ROOT, "results", f"baselines_lstm_h{args.lstm_hidden}{tag}.pt")
    if not 0 <= args.regularize_steps <= args.ft_steps:
        ap.error("--regularize-steps must lie in [0, --ft-steps]")
    return args


class Recorder:
    """Collects one row per (stage, setting, variant, seed) and prints a line for each."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, stage, setting, variant, seed, model_bytes, metrics, **extra):
        row = {
            "stage": stage,
            "setting": setting,
            "variant": variant,
            "seed": seed,
            "bytes": int(model_bytes),
            **metrics,
            **extra,
        }
        self.rows.append(row)
        vals = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"  [{stage} seed {seed}] {setting:>6} {variant:<22} {model_bytes:>10,} B  {vals}", flush=True)
        return row


class Timer:
    """Latencies of the first seed's models, measured together at the end of a stage.

    Every model registers two calls, one at batch 1 and one batched. :meth:`run` first warms each
    up, then goes round-robin over the models ``rounds`` times, timing ``b1_reps`` batch-1 calls
    and ``batch_reps`` batched calls of each per round, and writes the median of each model's
    samples into its row: load bursts on the shared machine hit all models alike, which timing
    them one after the other (minutes apart) would not.
    """

    def __init__(self, rounds, b1_reps, batch_reps, warmup=3):
        self.rounds, self.b1_reps, self.batch_reps, self.warmup = rounds, b1_reps, batch_reps, warmup
        self.jobs: list[tuple[dict, object, object]] = []

    def add(self, row, b1, batch):
        self.jobs.append((row, b1, batch))

    def run(self) -> dict:
        import statistics

        if not self.jobs:
            return {}
        loads = [load1()]
        samples = [([], []) for _ in self.jobs]
        start = time.perf_counter()
        with torch.no_grad():
            for _, b1, batch in self.jobs:
                for _ in range(self.warmup):
                    b1()
                    batch()
            for _ in range(self.rounds):
                for (_, b1, batch), (s1, sb) in zip(self.jobs, samples):
                    for fn, reps, out in ((b1, self.b1_reps, s1), (batch, self.batch_reps, sb)):
                        for _ in range(reps):
                            t = time.perf_counter()
                            fn()
                            out.append(time.perf_counter() - t)
                loads.append(load1())
        load = round(statistics.fmean(loads), 2)
        for (row, _, _), (s1, sb) in zip(self.jobs, samples):
            row.update(latency_b1=statistics.median(s1), latency_batch=statistics.median(sb), load=load)
            print(
                f"  timed {row['setting']:>6} {row['variant']:<26} batch 1 "
                f"{1e6 * row['latency_b1']:7.0f} us, batched {1e3 * row['latency_batch']:8.2f} ms"
                f" (load {load})",
                flush=True,
            )
        return {"timing_load": [min(loads), max(loads)], "timing_seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------- lowrank: MLP on digits


def mlp(hidden=(256, 256)) -> nn.Sequential:
    h1, h2 = hidden
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 10)
    )


def _xent(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _sgd(lr):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)


def run_lowrank(args, rec: Recorder) -> dict:
    train, test = datasets.load("digits", split="train"), datasets.load("digits", split="test")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(SPLIT_SEED))
    calib_idx, train_idx = perm[: args.calib], perm[args.calib :]
    xc, yc = train.x[calib_idx], train.y[calib_idx]
    x1, xb = test.x[:1], test.x[:256]
    timer = Timer(2, 10, 3) if args.quick else Timer(10, 30, 5)
    info = {"train": len(train_idx), "calib": len(calib_idx), "test": len(test), "load_start": load1()}

    def batches(seed):  # the same batch order for every model of a seed
        return datasets.image_batches(train, 64, generator=seed, indices=train_idx)

    def add(setting, variant, seed, model, state=None, timed=True):
        model.eval()
        row = rec.add(
            "lowrank",
            setting,
            variant,
            seed,
            saved_bytes(state if state is not None else model),
            {"acc": accuracy(model, test.x, test.y)},
        )
        if timed and seed == args.seeds[0]:
            timer.add(row, lambda: model(x1), lambda: model(xb))
        return row

    t0 = time.perf_counter()
    for seed in args.seeds:
        torch.manual_seed(seed)
        base = mlp(args.hidden)
        steps = args.epochs * len(batches(seed))
        start = time.perf_counter()
        finetune(base, steps, data=batches(seed), train_step=_xent, optimizer=_sgd(0.05), label="")
        base.eval()
        print(f"seed {seed}: MLP trained {steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
        add("-", "dense", seed, base)
        add("-", "fp16", seed, fp16_rounded(base), fp16_state_dict(base))
        add("-", "int8", seed, quantize_int8(base))
        ref = copy.deepcopy(base)
        finetune(ref, args.ft_steps, data=batches(seed + 1000), train_step=_xent, optimizer=_sgd(args.ft_lr))
        add("-", "dense + same ft", seed, ref, timed=False)
        for ratio in args.ratios:
            setting = f"{100 * ratio:.0f}%"
            bsr = copy.deepcopy(base)
            reg = args.regularize_steps
            report = compress_(
                bsr,
                LowRankConfig(
                    ratio=ratio,
                    method="bsr",
                    regularize_steps=reg,
                    finetune_steps=args.ft_steps - reg,
                    lr=args.ft_lr,
                ),
                evaluate=lambda m: accuracy(m, xc, yc),
                data=batches(seed + 1000),
                train_step=_xent,
            )
            ranks = report.info["ranks"]
            add(setting, "bsr", seed, bsr)
            rec.rows[-1].update(ranks=ranks, params=report.params_after)
            svd = copy.deepcopy(base)
            cfg = plain_svd_config(svd, ratio, finetune_steps=args.ft_steps, lr=args.ft_lr)
            srep = compress_(svd, cfg, data=batches(seed + 1000), train_step=_xent)
            add(setting, "plain svd", seed, svd)
            rec.rows[-1].update(ranks=cfg.ranks, params=srep.params_after)
            alloc = copy.deepcopy(base)
            compress_(
                alloc,
                LowRankConfig(method="fixed", ranks=ranks, finetune_steps=args.ft_steps, lr=args.ft_lr),
                data=batches(seed + 1000),
                train_step=_xent,
            )
            add(setting, "bsr alloc, plain ft", seed, alloc, timed=False)
            for variant, cfg in (
                ("bsr alloc, no ft", LowRankConfig(method="fixed", ranks=ranks)),
                ("plain svd, no ft", plain_svd_config(base, ratio)),
            ):
                untuned = copy.deepcopy(base)
                compress_(untuned, cfg)
                add(setting, variant, seed, untuned, timed=False)
            add(setting, "bsr + int8", seed, quantize_int8(bsr))
            add(setting, "plain svd + int8", seed, quantize_int8(svd))
    info.update(timer.run())
    info.update(seconds=time.perf_counter() - t0, load_end=load1())
    return info


# --------------------------------------------------------------------------- dirnet: char-LSTM on Shakespeare


def _dictionary_bench():
    import dictionary  # benchmarks/dictionary.py: training, bits per character, per-token timing

    return dictionary


def run_dirnet(args, rec: Recorder) -> dict:
    D = _dictionary_bench()
    train = datasets.load("shakespeare", split="train")
    val = datasets.load("shakespeare", split="val").data
    held = val[: args.val_chars]
    tokens = val[-(args.tokens + 40) :]
    xb = val[: 32 * 100].view(32, 100)
    info = {"load_start": load1()}
    spec = SimpleNamespace(
        model=args.lstm_model,
        retrain=False,
        seed=0,
        embed=64,
        hidden=args.lstm_hidden,
        train_steps=args.lstm_steps,
        batch_size=32,
        seq_len=100,
        lr=3e-3,
    )
    t0 = time.perf_counter()
    base, meta = D.dense_model(spec, train, lambda s: print(s, flush=True))
    info["model"] = {k: v for k, v in meta.items() if k != "vocab"}
    base.eval()

    timer = Timer(2, 5, 1) if args.quick else Timer(10, args.tokens // 10, 1)

    class Stream:
        """One character per call at batch 1, the state carried (streaming generation)."""

        def __init__(self, model):
            self.model, self.i, self.state = model, 0, None

        def __call__(self):
            t = tokens[self.i % tokens.numel()].view(1, 1)
            _, self.state = self.model(t, self.state)
            self.i += 1

    def batched(model):
        """One call on 32 x 100 characters; a dictionary-coded LSTM on its dense path (rebuild the
        weights once per call), which is faster than the codes path from about 32 steps per call."""
        coded = [m for m in model.modules() if hasattr(m, "inference")]

        def call():
            modes = [m.inference for m in coded]
            for m in coded:
                m.inference = "dense"
            model(xb)
            for m, mode in zip(coded, modes):
                m.inference = mode

        return call

    def ft(model, seed, label):
        D.train_lm(model, train, args.lstm_ft_steps, 32, 100, 1e-3, 1 + seed, lambda s: None, label)
        model.eval()

    def add(setting, variant, seed, model, state=None, timed=True):
        model.eval()
        row = rec.add(
            "dirnet",
            setting,
            variant,
            seed,
            saved_bytes(state if state is not None else model),
            {"bpc": D.eval_bpc(model, held)},
        )
        paths = sorted({m.inference for m in model.modules() if hasattr(m, "inference")})
        if paths:
            row.update(path_b1=paths, path_batch="dense")
        if timed and seed == args.seeds[0]:
            timer.add(row, Stream(model), batched(model))
        return row

    for seed in args.seeds:
        torch.manual_seed(seed)
        add("-", "dense", seed, base)
        add("-", "fp16", seed, fp16_rounded(base), fp16_state_dict(base))
        add("-", "int8", seed, quantize_int8(base))
        ref = copy.deepcopy(base)
        ft(ref, seed, "ft dense")
        add("-", "dense + same ft", seed, ref, timed=False)
        cache: dict = {}
        for ratio in args.dirnet_ratios:
            setting = f"{ratio:g}x"
            budget = None
            for method in ("dirnet", "svd"):
                model = copy.deepcopy(base)
                kw = dict(atom_grid=tuple(D.BENCH_GRID), seed=seed)
                if args.quick:
                    kw.update(max_nonzeros=8, dl_epochs=1)
                if method == "dirnet":
                    cfg = DictionaryConfig(ratio=ratio, **kw)
                else:
                    cfg = DictionaryConfig(budget_bytes=budget, method="svd", **kw)
                report = compress_(model, cfg, filter_fn=lambda m, n: n == "lstm", cache=cache)
                if method == "dirnet":
                    budget = report.layers[0].bytes_after
                ft(model, seed, f"ft {method} {setting}")
                add(setting, method, seed, model)
                rec.rows[-1].update(lstm_bytes=report.layers[0].bytes_after, choice=report.layers[0].detail)
                q = quantize_int8(model)
                add(setting, f"{method} + int8", seed, q)
    info.update(timer.run())
    info.update(seconds=time.perf_counter() - t0, load_end=load1())
    return info


# --------------------------------------------------------------------------- embedding: ATIS


def run_embedding(args, rec: Recorder) -> dict:
    from adacomp.workloads.nlu import (
        JointBiLSTM,
        atis_batches,
        evaluate_nlu,
        joint_loss,
        load_atis,
        train_nlu,
    )

    emb = _embedding_bench()
    train, test = load_atis()
    order = torch.argsort(test.lengths)
    i1 = int(order[len(order) // 2])
    one = (test.words[i1 : i1 + 1, : int(test.lengths[i1])], test.lengths[i1 : i1 + 1])
    lengths64 = test.lengths[:64]
    many = (test.words[:64, : int(lengths64.max())], lengths64)
    timer = Timer(2, 3, 1) if args.quick else Timer(10, 20, 3)
    info = {"load_start": load1(), "median_length": int(test.lengths[i1])}

    def add(setting, variant, seed, model, state=None, timed=True, **extra):
        model.eval()
        scores = evaluate_nlu(model, test)
        row = rec.add(
            "embedding",
            setting,
            variant,
            seed,
            saved_bytes(state if state is not None else model),
            {"intent_acc": scores["intent_acc"], "slot_f1": scores["slot_f1"]},
            **extra,
        )
        if timed and seed == args.seeds[0]:
            timer.add(row, lambda: model(*one), lambda: model(*many))
        return row

    def data(seed):  # a fresh generator per model: the same batch order for every method of a seed
        return atis_batches(train, 32, generator=seed + 1)

    def stage(base, seed, method, ratio, steps, codes=None):
        model = copy.deepcopy(base)
        torch.manual_seed(seed + 1)  # dropout draws from the global RNG
        kw = dict(ratio=ratio, method=method, steps=steps, seed=seed, **(codes or {}))
        report = compress_(
            model,
            EmbeddingConfig(**kw),
            data=data(seed),
            train_step=joint_loss,
            filter_fn=lambda m, name: name == "embedding",
        )
        return model, report.layers[0]

    t0 = time.perf_counter()
    setting = f"{100 * args.atis_ratio:.1f}%"
    for seed in args.seeds:
        torch.manual_seed(seed)
        base = JointBiLSTM(len(train.vocab), len(train.slot_tags), len(train.intent_names), hidden=64)
        summary = train_nlu(base, train, epochs=args.atis_epochs, seed=seed)
        print(
            f"seed {seed}: ATIS model trained {args.atis_epochs} epochs in {summary['seconds']:.0f} s",
            flush=True,
        )
        table = base.embedding.weight.numel() * 4
        add("-", "dense", seed, base, table_bytes=table)
        add("-", "fp16", seed, fp16_rounded(base), fp16_state_dict(base), table_bytes=table // 2)
        add("-", "int8 rest", seed, quantize_int8(base), table_bytes=table)
        torch.manual_seed(seed + 1)
        ref = emb._finetune_reference(copy.deepcopy(base), data(seed), args.atis_steps, EmbeddingConfig().lr)
        add("-", "dense + same ft", seed, ref, timed=False, table_bytes=table)
        int8, r8 = stage(base, seed, "int8", 0.74, args.atis_steps)
        add("74%", "int8 table +ft", seed, int8, table_bytes=r8.bytes_after)
        add("74%", "int8 table +ft + int8 rest", seed, quantize_int8(int8), table_bytes=r8.bytes_after)
        pq, rpq = stage(base, seed, "pq", args.atis_ratio, args.atis_steps)
        codes = {"num_codebooks": rpq.choice["num_codebooks"], "codebook_size": rpq.choice["codebook_size"]}
        add(setting, "pq +ft", seed, pq, table_bytes=rpq.bytes_after, choice=rpq.detail)
        add(setting, "pq +ft + int8 rest", seed, quantize_int8(pq), table_bytes=rpq.bytes_after)
        task, rt = stage(base, seed, "task_aware", args.atis_ratio, args.atis_steps, codes)
        add(setting, "task-aware", seed, task, table_bytes=rt.bytes_after, choice=rt.detail)
        add(setting, "task-aware + int8 rest", seed, quantize_int8(task), table_bytes=rt.bytes_after)
    info.update(timer.run())
    info.update(seconds=time.perf_counter() - t0, load_end=load1())
    return info


def _embedding_bench():
    import embedding  # benchmarks/embedding.py: the fine-tuned reference

    return embedding


# --------------------------------------------------------------------------- summary, targets, tables

METRICS = {
    "lowrank": [("acc", "test acc", True)],
    "dirnet": [("bpc", "val bpc", False)],
    "embedding": [("intent_acc", "intent acc", True), ("slot_f1", "slot F1", True)],
}


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (stage, setting, variant): mean and standard error over seeds of each metric
    and of the bytes; latencies (and the load) of the first seed, where measured."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["stage"], r["setting"], r["variant"]), []).append(r)
    out = []
    for (stage, setting, variant), rs in groups.items():
        entry = {"stage": stage, "setting": setting, "variant": variant, "seeds": len(rs)}
        for key, _, _ in METRICS[stage]:
            entry[key], entry[key + "_se"] = mean_se([r[key] for r in rs])
        entry["bytes"] = mean_se([r["bytes"] for r in rs])[0]
        for key in ("table_bytes", "lstm_bytes"):
            if key in rs[0]:
                entry[key] = mean_se([r[key] for r in rs])[0]
        timed = [r for r in rs if "latency_b1" in r]
        if timed:
            for key in ("latency_b1", "latency_batch", "load", "path_b1", "path_batch"):
                if key in timed[0]:
                    entry[key] = timed[0][key]
        out.append(entry)
    return out


def _find(summary, stage, variant, setting="-"):
    return next(
        (e for e in summary if e["stage"] == stage and e["variant"] == variant and e["setting"] == setting),
        None,
    )


def _paired(rows, stage, setting, a, b, key):
    """Mean and standard error over seeds of ``a - b`` (same seed, same base model)."""
    by = {(r["variant"], r["seed"]): r[key] for r in rows if r["stage"] == stage and r["setting"] == setting}
    diffs = [by[(a, s)] - by[(b, s)] for (v, s) in list(by) if v == a and (b, s) in by]
    return mean_se(diffs) if diffs else (float("nan"), float("nan"))


def check(rows, summary) -> dict:
    """The issue's targets, each with its figure."""
    out: dict = {}
    low = [e for e in summary if e["stage"] == "lowrank" and e["variant"] == "bsr"]
    for e in low:
        diff, se = _paired(rows, "lowrank", e["setting"], "bsr", "plain svd", "acc")
        out[f"lowrank {e['setting']}: bsr - plain svd (acc, paired)"] = {
            "diff": diff,
            "se": se,
            "met": bool(diff > se) if not math.isnan(se) else None,
        }
    dense = _find(summary, "dirnet", "dense")
    if dense is not None:
        ratios = sorted(
            {e["setting"] for e in summary if e["stage"] == "dirnet" and e["variant"] == "dirnet"},
            key=lambda s: float(s.rstrip("x")),
        )
        int8 = _find(summary, "dirnet", "int8")
        for setting in ratios:
            d = _find(summary, "dirnet", "dirnet", setting)
            dq = _find(summary, "dirnet", "dirnet + int8", setting)
            gap = d["bpc"] / dense["bpc"] - 1
            out[f"dirnet {setting}: bpc within 5 % of dense"] = {"vs_dense": gap, "met": bool(gap <= 0.05)}
            if int8 is not None and dq is not None:
                out[f"dirnet {setting} + int8: smaller than int8 at no worse bpc"] = {
                    "bytes": dq["bytes"],
                    "int8_bytes": int8["bytes"],
                    "bpc": dq["bpc"],
                    "int8_bpc": int8["bpc"],
                    "met": bool(dq["bytes"] < int8["bytes"] and dq["bpc"] <= int8["bpc"]),
                }
            if "latency_b1" in d and "latency_b1" in dense:
                out[f"dirnet {setting}: batch-1 latency no slower than dense"] = {
                    "us": 1e6 * d["latency_b1"],
                    "dense_us": 1e6 * dense["latency_b1"],
                    "met": bool(d["latency_b1"] <= dense["latency_b1"]),
                }
    base = _find(summary, "embedding", "dense")
    if base is not None:
        for e in summary:
            if e["stage"] == "embedding" and e["variant"] == "task-aware":
                loss = max(1 - e["intent_acc"] / base["intent_acc"], 1 - e["slot_f1"] / base["slot_f1"])
                out[f"embedding {e['setting']}: task-aware within 3.7 % of dense"] = {
                    "intent_rel": e["intent_acc"] / base["intent_acc"] - 1,
                    "slot_f1_rel": e["slot_f1"] / base["slot_f1"] - 1,
                    "table_reduction": 1 - e["table_bytes"] / base["table_bytes"],
                    "met": bool(loss < 0.037 and e["table_bytes"] <= 0.03 * base["table_bytes"]),
                }
    return out


def _pm(mean, se, scale=100.0, digits=2):
    if math.isnan(se):
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * se:.{digits}f}"


def _rows_for(summary, stage):
    entries = [e for e in summary if e["stage"] == stage]
    dense = _find(summary, stage, "dense")
    cols = ["setting", "variant"] + (["table bytes"] if stage == "embedding" else [])
    for _, label, _ in METRICS[stage]:
        cols += [label + (" %" if stage != "dirnet" else ""), "vs dense"]
    cols += ["bytes on disk", "x smaller", "batch 1", "batched", "load", "seeds"]
    lines = []
    for e in entries:
        row = [e["setting"], e["variant"]]
        if stage == "embedding":
            row.append(f"{e['table_bytes']:,.0f}")
        for key, _, _ in METRICS[stage]:
            if stage == "dirnet":
                row.append(_pm(e[key], e[key + "_se"], 1.0, 4))
                row.append(f"{100 * (e[key] / dense[key] - 1):+.1f}%" if dense else "")
            elif stage == "embedding":
                row.append(_pm(e[key], e[key + "_se"]))
                row.append(f"{100 * (e[key] / dense[key] - 1):+.2f}%" if dense else "")
            else:
                row.append(_pm(e[key], e[key + "_se"]))
                row.append(f"{100 * (e[key] - dense[key]):+.2f} pt" if dense else "")
        row.append(f"{e['bytes']:,.0f}")
        row.append(f"{dense['bytes'] / e['bytes']:.2f}x" if dense else "")
        if "latency_b1" in e:
            row.append(f"{1e6 * e['latency_b1']:.0f} µs")
            row.append(f"{1e3 * e['latency_batch']:.2f} ms")
            row.append(f"{e['load']:.1f}")
        else:
            row += ["", "", ""]
        row.append(str(e["seeds"]))
        lines.append(row)
    return cols, lines


CAPTIONS = {
    "lowrank": "MLP 64-256-256-10 on digits (359 test images); batch 1 = one image, batched = 256",
    "dirnet": "2-layer char-LSTM on Shakespeare, validation bits per character (lower is better); batch 1 = "
    "one character (streaming, per token), batched = one call on 32 x 100 characters",
    "embedding": "joint BiLSTM on ATIS test (893 utterances), relative change vs dense; batch 1 = one "
    "utterance, batched = 64 utterances",
}


def _aligned(cols, lines) -> list[str]:
    widths = [max(len(c), *(len(r[i]) for r in lines)) for i, c in enumerate(cols)]

    def fmt(r):
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))

    return [fmt(cols), "-" * len(fmt(cols))] + [fmt(r) for r in lines]


def tables(result, markdown=False) -> str:
    out = []
    for stage in STAGES:
        if not any(e["stage"] == stage for e in result["summary"]):
            continue
        cols, lines = _rows_for(result["summary"], stage)
        info = result["info"].get(stage, {})
        head = (
            f"{stage}: {CAPTIONS[stage]}. Mean ± standard error over seeds. Latency: median, 1 thread, the "
            f"first seed's models timed round-robin together; load = mean 1-min load average while timed "
            f"(run: load {info.get('load_start')} -> {info.get('load_end')}, "
            f"{info.get('seconds', 0) / 60:.1f} min"
            + (
                f"; timed in a separate run at load {info['timed_in'].get('timing_load')}"
                if "timed_in" in info
                else ""
            )
            + ")"
        )
        out.append(head)
        if markdown:
            out.append("| " + " | ".join(cols) + " |")
            out.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|")
            out += ["| " + " | ".join(r) + " |" for r in lines]
        else:
            out += _aligned(cols, lines)
        out.append("")
    if result.get("targets"):
        out.append("targets:")
        for name, t in result["targets"].items():
            met = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
            figs = ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in t.items() if k != "met"
            )
            out.append(f"  {met:6s} {name}: {figs}")
    return "\n".join(out)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    rec = Recorder()
    info = {}
    start = time.perf_counter()
    stages = STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        print(f"== {stage} (load {load1()})", flush=True)
        info[stage] = {"lowrank": run_lowrank, "dirnet": run_dirnet, "embedding": run_embedding}[stage](
            args, rec
        )
    summary = summarize(rec.rows)
    return {
        "args": vars(args),
        "command": "python " + " ".join([os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:]),
        "torch": torch.__version__,
        "rows": rec.rows,
        "summary": summary,
        "targets": check(rec.rows, summary),
        "info": info,
        "seconds": time.perf_counter() - start,
    }


TIMING_KEYS = ("latency_b1", "latency_batch", "load", "path_b1", "path_batch")


def combine(paths, timing_paths=()) -> dict:
    """The runs in ``paths`` as one result (rows, summaries and infos joined); with
    ``timing_paths``, every latency is replaced by the one of the same (stage, setting, variant)
    there, and the targets are recomputed."""
    results = []
    for path in paths:
        with open(path) as f:
            results.append(json.load(f))
    out = {
        "command": [r.get("command") for r in results],
        "torch": results[0].get("torch"),
        "rows": [row for r in results for row in r["rows"]],
        "summary": [e for r in results for e in r["summary"]],
        "info": {k: v for r in results for k, v in r["info"].items()},
        "seconds": sum(r["seconds"] for r in results),
    }
    for path in timing_paths or ():
        with open(path) as f:
            timed = json.load(f)
        out.setdefault("timing_from", []).append({"path": path, "command": timed.get("command")})
        for e in out["summary"]:
            t = _find(timed["summary"], e["stage"], e["variant"], e["setting"])
            if t is None:
                continue
            for key in TIMING_KEYS:
                e.pop(key, None)
                if key in t:
                    e[key] = t[key]
        for stage, info in timed["info"].items():
            if stage in out["info"]:
                out["info"][stage]["timed_in"] = {
                    k: v for k, v in info.items() if k.startswith(("timing", "load"))
                }
    out["targets"] = check(out["rows"], out["summary"])
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_json:
        result = combine(args.from_json, args.timing_from)
    else:
        result = run(args)
    print()
    print(tables(result))
    if args.markdown:
        print()
        print(tables(result, markdown=True))
    print(f"total {result['seconds'] / 60:.1f} min")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
