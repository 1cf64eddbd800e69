"""One call per bucket against one call per tensor: the compressor and decoder work of one
DDP bucket holding every parameter of a model.

For the models of ``benchmarks/hook_overhead.py`` (CNN 10 tensors, char-LSTM 11, GPT 78) it
times, on the same gradients (N(0, 1), after 4 steps of others so that the residues are in
their steady state) and in the same run:

* *per tensor*: the per-tensor compress path (selection op, body encoder, header and
  payload object in Python) for each compressed tensor, and on the receiving side
  ``Payload.from_tensor`` + ``decompress_sum`` of the ``W`` ranks' payloads per tensor (what
  the integrations ran before ``prepare_bucket`` / ``decode_bucket_``);
* *per bucket*: one ``AdaComp.prepare_bucket`` and one ``payload.decode_bucket_``;
* ``torch.clone`` of every gradient (the memory-bandwidth baseline) and a cast of every
  gradient to fp16 and back (what PyTorch's fp16 hook computes).

Tensors sent dense by rule (1-D, fewer than 1024 elements) are left out of both. Usage::

    python benchmarks/bucket_calls.py --json results/bucket_calls.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hook_overhead import build  # noqa: E402  (the same models, same sizes)

from adacomp import AdaComp, ops, payload  # noqa: E402


def median_ms(fns: dict, repeat: int) -> dict:
    """Median milliseconds of each function, timed round by round (each round calls every
    function once, starting at a different one), so that load changes hit all alike."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times = {k: [] for k in names}
    for i in range(repeat):
        for j in range(len(names)):
            k = names[(i + j) % len(names)]
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def shapes_of(model_name):
    torch.manual_seed(0)
    model = build(model_name)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def run_model(model_name, world, repeat):
    comp = AdaComp()
    named = [(n, s) for n, s in shapes_of(model_name)
             if comp.bin_size_for(n, torch.empty(s, device="meta")) is not None]
    names = [n for n, _ in named]
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(s, generator=g) for _, s in named]
    bins = [comp.bin_size_for(n, x) for n, x in zip(names, grads)]
    # W ranks' compressors, a few steps in so the residues are in their steady state
    comps = [AdaComp() for _ in range(world)]
    for _ in range(4):
        for c in comps:
            _, pend = c.prepare_bucket(names, [torch.randn(x.shape, generator=g) for x in grads], bins)
            for p in pend:
                c.commit(p)
    rows, sizes = [], []
    for c in comps:
        bp, pend = c.prepare_bucket(names, grads, bins)
        for p in pend:
            c.discard(p)
        rows.append(bp.data)
        sizes.append(bp.sizes[0].tolist())
    starts = [[sum(sz[:t]) for t in range(len(names))] for sz in sizes]
    entries = [(t, 0, grads[t].numel(), r, starts[r][t], sizes[r][t], tuple(grads[t].shape))
               for t in range(len(names)) for r in range(world)]
    outs = [torch.empty(x.numel()) for x in grads]
    c0 = comps[0]

    def per_tensor_compress():
        for n, x, b in zip(names, grads, bins):  # the per-tensor path (header built in Python)
            _, pend = c0._prepare_loop(n, x, None, b)
            c0.discard(pend)

    def per_bucket_compress():
        _, pend = c0.prepare_bucket(names, grads, bins)
        for p in pend:
            c0.discard(p)

    def per_tensor_decode():
        for t, x in enumerate(grads):
            plist = [payload.Payload.from_tensor(rows[r][starts[r][t]:starts[r][t] + sizes[r][t]],
                                                 shape=tuple(x.shape)) for r in range(world)]
            payload.decompress_sum(plist, outs[t].view(x.shape))

    def per_bucket_decode():
        payload.decode_bucket_(outs, rows, entries)

    def clone():
        for x in grads:
            x.clone()

    def fp16_round_trip():
        for x in grads:
            x.to(torch.float16).to(torch.float32)

    t = median_ms({"compress_per_tensor": per_tensor_compress, "compress_per_bucket": per_bucket_compress,
                   "decode_per_tensor": per_tensor_decode, "decode_per_bucket": per_bucket_decode,
                   "clone": clone, "fp16_round_trip": fp16_round_trip}, repeat)
    numel = sum(x.numel() for x in grads)
    return {"model": model_name, "world": world, "tensors": len(names), "numel": numel,
            "payload_bytes": sum(sizes[0]), **t}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cnn", "lstm", "gpt"], choices=["cnn", "lstm", "gpt"])
    p.add_argument("--world", type=int, default=4, help="ranks whose payloads are decoded (default 4)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, as a rank)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    rows = [run_model(m, args.world, args.repeat) for m in args.models]
    load1 = os.getloadavg()
    print(f"median ms per call over {args.repeat} repeats; {args.threads} thread(s); decode of "
          f"{args.world} ranks' payloads; backend {ops.backend('cpu')}, torch {torch.__version__}")
    head = (f"{'model':6} {'tensors':>7} {'Melem':>6} | {'compress/tensor':>15} {'/bucket':>8} {'x':>5} | "
            f"{'decode/tensor':>13} {'/bucket':>8} {'x':>5} | {'clone':>6} {'fp16 rt':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:6} {r['tensors']:>7} {r['numel'] / 1e6:>6.2f} | "
              f"{r['compress_per_tensor']:>15.2f} {r['compress_per_bucket']:>8.2f} "
              f"{r['compress_per_tensor'] / r['compress_per_bucket']:>5.2f} | "
              f"{r['decode_per_tensor']:>13.2f} {r['decode_per_bucket']:>8.2f} "
              f"{r['decode_per_tensor'] / r['decode_per_bucket']:>5.2f} | "
              f"{r['clone']:>6.2f} {r['fp16_round_trip']:>7.2f}")
    print(f"load average (1/5/15 min): {[round(x, 2) for x in load0]} before, "
          f"{[round(x, 2) for x in load1]} after")
    if args.json:
        meta = {"command": "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
                "torch": torch.__version__, "backend": ops.backend("cpu"), "threads": args.threads,
                "world": args.world, "repeat": args.repeat, "cpu_count": os.cpu_count(),
                "machine": platform.machine(), "load_before": load0, "load_after": load1,
                "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
