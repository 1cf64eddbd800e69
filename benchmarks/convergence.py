"""Convergence evidence: dense vs AdaComp on 4 workers, same seed, real data.

(a) the CNN on Fashion-MNIST for 2 epochs, (b) the char-LSTM on Shakespeare (first 1M
characters). Each runs ``launch/train.py`` under torchrun; this script collects the JSON,
checks the targets of issue 3 and writes a table, ``results/convergence.json`` and the
plots ``results/convergence_<case>.png``::

    python benchmarks/convergence.py                 # both cases (about 25 min on 2 cores)
    python benchmarks/convergence.py --cases cnn --workers 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    "cnn": ["--model", "cnn", "--data", "fashion-mnist", "--epochs", "2", "--batch-size", "32",
            "--lr", "0.02", "--log-every", "20"],
    "lstm": ["--model", "lstm", "--data", "shakespeare", "--max-chars", "1000000", "--epochs", "2",
             "--batch-size", "16", "--seq-len", "64", "--hidden", "256", "--lr", "1.0",
             "--momentum", "0.0", "--log-every", "20"],
}
TARGETS = {  # issue 3, item 8 (paper: 40x conv, 200x fully connected / recurrent)
    "cnn": {"accuracy_gap_points": 0.5, "conv_ratio": 40, "fc_ratio": 200},
    "lstm": {"loss_gap_relative": 0.02, "fc_ratio": 200},
}


def run_case(case: str, workers: int, out_dir: str, extra: list[str]) -> dict:
    path = os.path.join(out_dir, f"convergence_{case}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(workers),
           os.path.join(ROOT, "launch", "train.py"), *CASES[case], "--compressor", "none", "adacomp",
           "--json", path, "--plot", os.path.join(out_dir, f"convergence_{case}.png"), *extra]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(path) as f:
        return json.load(f)


def check(case: str, res: dict) -> dict:
    runs = {r["compressor"]: r for r in res["runs"]}
    dense, ada = runs["none"], runs["adacomp"]
    t = ada["traffic"]["total"]
    out = {"conv_ratio": t["conv"]["ratio"], "fc_ratio": t["fc"]["ratio"], "all_ratio": t["all"]["ratio"]}
    tg = TARGETS[case]
    if case == "cnn":
        acc_d, acc_a = dense["metrics"]["test_accuracy"], ada["metrics"]["test_accuracy"]
        gap = 100 * (acc_d - acc_a)
        out.update(dense_accuracy=acc_d, adacomp_accuracy=acc_a, accuracy_gap_points=gap)
        out["met"] = {"accuracy": gap <= tg["accuracy_gap_points"],
                      "conv": (out["conv_ratio"] or 0) >= tg["conv_ratio"],
                      "fc": (out["fc_ratio"] or 0) >= tg["fc_ratio"]}
    else:
        d, a = dense["metrics"]["val_loss"], ada["metrics"]["val_loss"]
        out.update(dense_val_loss=d, adacomp_val_loss=a, loss_gap_relative=(a - d) / d,
                   dense_bpc=dense["metrics"]["bits_per_char"], adacomp_bpc=ada["metrics"]["bits_per_char"])
        out["met"] = {"loss": out["loss_gap_relative"] <= tg["loss_gap_relative"],
                      "fc": (out["fc_ratio"] or 0) >= tg["fc_ratio"]}
    out["wall_s"] = {"none": dense["wall_s"], "adacomp": ada["wall_s"]}
    out["wire_MB"] = {k: r["traffic"]["total"]["all"]["wire_bytes"] / 1e6 for k, r in runs.items()}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(ROOT, "results"))
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="more train.py arguments after --")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    extra = [a for a in args.extra if a != "--"]
    summary = {}
    for case in args.cases:
        summary[case] = check(case, run_case(case, args.workers, args.out, extra))
        print(json.dumps({case: summary[case]}, indent=2), flush=True)
    with open(os.path.join(args.out, "convergence.json"), "w") as f:
        json.dump({"workers": args.workers, "cases": summary, "targets": TARGETS}, f, indent=2)
    print(f"wrote {os.path.join(args.out, 'convergence.json')}")


if __name__ == "__main__":
    main()
