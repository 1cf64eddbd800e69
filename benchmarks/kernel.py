"""Kernel benchmark: the AdaComp selection and decompress_sum on every available backend.

For fp32 tensors of 1M to 64M elements and bin sizes 50 and 500 it times, in the same run
and on the same tensors:

* each backend's compress step (the fused selection op: read dW and R, write R'),
* each backend's ``decompress_sum`` of 8 payloads,
* ``torch.clone`` of the gradient (the memory-bandwidth baseline: 8 bytes per element),
* ``torch.topk`` of ``|G|`` with k equal to the number of elements AdaComp sent,
* the pure-PyTorch reference selection.

Effective bandwidth of the selection counts 12 bytes per element (read dW and R, write
R'), the floor set by memory traffic. Ratios are against baselines timed in the same run,
since the machines are shared and noisy. Usage::

    python benchmarks/kernel.py                      # table
    python benchmarks/kernel.py --json results/kernel.json --sizes 1M 4M
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

import adacomp  # noqa: E402
from adacomp import _reference, ops, payload  # noqa: E402

SIZES = {"1M": 1 << 20, "4M": 1 << 22, "16M": 1 << 24, "64M": 1 << 26}


def parse_size(s: str) -> int:
    if s in SIZES:
        return SIZES[s]
    return int(float(s))


def timeit(fn, repeat: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_inputs(n: int, device: str, seed: int = 0):
    """A gradient and a residue in the regime AdaComp runs in after warm-up: the residue
    holds what earlier steps left behind and is larger than one step's gradient."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    d = torch.randn(n, generator=g).to(device)
    r = (torch.randn(n, generator=g) * 3.0).to(device)
    return d, r


def select_with(backend: str, d, r, out, L):
    os.environ["ADACOMP_BACKEND"] = backend
    try:
        return ops.select(d, r, out, L, 0, 0)
    finally:
        del os.environ["ADACOMP_BACKEND"]


def bench(n: int, L: int, device: str, backends, repeat: int, with_reference: bool):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    d, r = make_inputs(n, device)
    out = torch.empty_like(d)
    row = {"numel": n, "bin_size": L, "device": device}
    t_clone = timeit(lambda: d.clone(), repeat, sync)
    row["clone_s"] = t_clone
    row["clone_GBps"] = 8 * n / t_clone / 1e9
    # Selection size k (identical across backends; they are bit-identical).
    counts, offsets, values, scale, info = select_with(backends[0], d, r, out, L)
    k = int(info[0])
    row["n_sent"] = k
    g_abs = (r + d).abs()
    row["topk_s"] = timeit(lambda: torch.topk(g_abs, max(k, 1), sorted=False), repeat, sync)
    if with_reference:
        row["reference_s"] = timeit(lambda: _reference.select(d, r, L, 0, 0), max(1, repeat // 2), sync)
    # Eight payloads from eight "workers" for decompress_sum.
    plist = []
    for w in range(8):
        dw, rw = make_inputs(n, device, seed=100 + w)
        c, o, v, s, _ = select_with(backends[0], dw, rw, torch.empty_like(dw), L)
        plist.append(payload.encode((n,), L, c, o, v, float(s[0]), payload.KIND_TERNARY))
    row["payload_bytes"] = plist[0].nbytes
    row["ratio_bytes"] = 4 * n / plist[0].nbytes
    acc = torch.zeros(n, device=device)
    for b in backends:
        t = timeit(lambda b=b: select_with(b, d, r, out, L), repeat, sync)
        row[f"{b}_select_s"] = t
        row[f"{b}_select_GBps"] = 12 * n / t / 1e9
        row[f"{b}_vs_clone_bw"] = (12 * n / t) / (8 * n / t_clone)
        row[f"{b}_vs_topk"] = row["topk_s"] / t
        if with_reference:
            row[f"{b}_vs_reference"] = row["reference_s"] / t

        def dsum(b=b):
            acc.zero_()
            os.environ["ADACOMP_BACKEND"] = b
            try:
                adacomp.decompress_sum(plist, acc)
            finally:
                del os.environ["ADACOMP_BACKEND"]

        row[f"{b}_decompress_sum8_s"] = timeit(dsum, repeat, sync)

        # The public API every integration calls: selection, residue update and the payload
        # bytes (whole, and split into 4 shard pieces as the sharded and auto exchanges do).
        os.environ["ADACOMP_BACKEND"] = b
        try:
            # prepare + discard: the work of compress (whose commit is a pointer swap) on the
            # same residue r as the raw op; compress itself would let the residue drift from
            # call to call (the same d every time), and with it the number of elements sent.
            comp = adacomp.AdaComp(bin_size=L, min_numel=0)
            comp.set_residue("g", r)

            def api(comp=comp):
                _, pend = comp.prepare("g", d)
                comp.discard(pend)

            t = timeit(api, repeat, sync)
            row[f"{b}_compress_s"] = t
            row[f"{b}_compress_vs_clone_bw"] = (12 * n / t) / (8 * n / t_clone)
            row[f"{b}_compress_vs_topk"] = row["topk_s"] / t

            def split(comp=comp):
                _, pend = comp.prepare_split("g", d, 4)
                comp.discard(pend)

            row[f"{b}_split4_s"] = timeit(split, repeat, sync)
        finally:
            del os.environ["ADACOMP_BACKEND"]
    return row


def print_table(rows, backends):
    head = (f"{'numel':>9} {'bin':>4} {'sent%':>6} {'ratio':>6} {'clone GB/s':>10} "
            + " ".join(f"{b + ' GB/s':>10} {'/clone':>6} {'/topk':>6} {'/ref':>6} {'dsum8 ms':>9} "
                       f"{'API ms':>8} {'/clone':>6} {'/topk':>6} {'split4 ms':>9}" for b in backends))
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = [f"{r['numel']:>9} {r['bin_size']:>4} {100 * r['n_sent'] / r['numel']:>6.2f} "
                 f"{r['ratio_bytes']:>6.1f} {r['clone_GBps']:>10.2f}"]
        for b in backends:
            ref = r.get(f"{b}_vs_reference")
            cells.append(f"{r[f'{b}_select_GBps']:>10.2f} {r[f'{b}_vs_clone_bw']:>6.2f} "
                         f"{r[f'{b}_vs_topk']:>6.2f} {(f'{ref:.2f}' if ref else '-'):>6} "
                         f"{1e3 * r[f'{b}_decompress_sum8_s']:>9.2f} "
                         f"{1e3 * r[f'{b}_compress_s']:>8.2f} {r[f'{b}_compress_vs_clone_bw']:>6.2f} "
                         f"{r[f'{b}_compress_vs_topk']:>6.2f} {1e3 * r[f'{b}_split4_s']:>9.2f}")
        print(" ".join(cells))
    print("\nGB/s counts 12 bytes per element; /clone = bandwidth ratio to torch.clone (8 B/elem);"
          "\n/topk and /ref = speed-up over torch.topk(|G|, k=sent) and the PyTorch reference;"
          "\ndsum8 = decompress_sum of 8 payloads; ratio = dense bytes / payload bytes;"
          "\nAPI = AdaComp.prepare + discard, the work of compress (selection, new residue and"
          "\npayload bytes) on the raw op's residue; /clone at 12 B/elem, /topk = torch.topk time"
          "\nover it; split4 = AdaComp.prepare_split into 4 shard payloads.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["1M", "4M", "16M", "64M"])
    ap.add_argument("--bins", nargs="+", type=int, default=[50, 500])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", nargs="+", default=None, help="default: all available")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-reference", action="store_true", help="skip the slow reference timing")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads for torch and the kernels (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    backends = args.backends or [b for b in ops.available_backends(args.device) if b != "torch"]
    if not backends:
        backends = ["torch"]
    rows = []
    for s in args.sizes:
        n = parse_size(s)
        for L in args.bins:
            rows.append(bench(n, L, args.device, backends, args.repeat, not args.no_reference))
            print(f"  done numel={n} bin={L}", file=sys.stderr, flush=True)
    print_table(rows, backends)
    meta = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor(),
            "cuda_device": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "backends": backends}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
