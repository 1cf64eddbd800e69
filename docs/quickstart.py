#!/usr/bin/env python
"""Regenerate (or check) the sample output of the README's quick start from a fresh run.

The README shows what ``make train`` prints. That block is not typed by hand: this script runs
the same command (``python -m torch.distributed.run --standalone --nproc_per_node 2
launch/train.py --exchange allgather``), cuts the summary table out of its output and writes it between the
markers ``<!-- quickstart-output:begin -->`` and ``<!-- quickstart-output:end -->``::

    python docs/quickstart.py --update README.md     # what `make readme` runs
    python docs/quickstart.py --check README.md      # exit 1 if the README is stale

The check allows what differs from one CPU to the next (see :func:`differences`) and ignores
the wall time; ``tests/test_docs.py`` runs it in CI, so the README cannot go stale unnoticed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- quickstart-output:begin -->", "<!-- quickstart-output:end -->"
COMMAND = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join("launch", "train.py"), "--exchange", "allgather"]


def run_main_job(timeout: float = 600, plot: bool = True) -> str:
    """Run the quick start's main job; return the summary block it printed (title to legend).
    ``plot=False`` writes no plot (a check leaves the user's ``results/`` alone).

    Raises:
        RuntimeError: the job failed (its output tail is in the message) or printed no table.
    """
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = COMMAND if plot else [*COMMAND, "--plot", ""]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the main job failed ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    lines = proc.stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"^\w+ on \w+, \d+ workers", line)), None)
    end = next((i for i, line in enumerate(lines) if line.startswith("(") and "workers;" in line), None)
    if start is None or end is None or end < start:
        raise RuntimeError(f"no summary table in the main job's output:\n{proc.stdout[-3000:]}")
    return "\n".join(lines[start:end + 1])


def readme_block(text: str) -> str:
    """The sample output between the markers (without the code fence).

    Raises:
        ValueError: the markers or the fenced block between them are missing.
    """
    m = re.search(re.escape(BEGIN) + r"\s*```[a-z]*\n(.*?)\n```\s*" + re.escape(END), text, re.S)
    if m is None:
        raise ValueError(f"no fenced block between {BEGIN} and {END}")
    return m.group(1)


def replace_block(text: str, block: str) -> str:
    """``text`` with the block between the markers replaced by ``block``."""
    readme_block(text)  # raises if the markers are missing
    return re.sub(re.escape(BEGIN) + r".*?" + re.escape(END),
                  lambda _: f"{BEGIN}\n```\n{block}\n```\n{END}", text, count=1, flags=re.S)


def _rows(block: str) -> dict[str, list[str]]:
    """The run rows of a summary block: compressor label -> its cells after the label."""
    rows = {}
    for line in block.splitlines():
        cells = line.split()
        if len(cells) >= 9 and cells[1].endswith("%"):
            rows[cells[0]] = cells[1:]
    return rows


def _number(cell: str) -> float:
    return float(cell.rstrip("%x"))


def differences(shown: str, fresh: str) -> list[str]:
    """Where the README's block and a fresh run's disagree beyond what the CPU explains.

    The run is deterministic on one machine, but the CPU's float kernels (oneDNN, BLAS) sum in
    an order that depends on the instruction set, so two machines train to slightly different
    models. Allowed: 1.0 point of accuracy and 5 % of bytes and ratios; the wall time (column 2)
    is not compared. Everything else (title, header, compressors, legend) must be equal.
    """
    out = []
    a, b = shown.splitlines(), fresh.splitlines()
    for name, i in (("title", 0), ("header", 1), ("legend", -1)):
        if not a or not b or a[i] != b[i]:
            out.append(f"{name}: {a[i] if a else ''!r} != {b[i] if b else ''!r}")
    ra, rb = _rows(shown), _rows(fresh)
    if list(ra) != list(rb):
        out.append(f"compressors: {list(ra)} != {list(rb)}")
    for label in set(ra) & set(rb):
        x, y = ra[label], rb[label]
        if abs(_number(x[0]) - _number(y[0])) > 1.0:
            out.append(f"{label}: accuracy {x[0]} vs {y[0]} (more than 1 point apart)")
        for col, (u, v) in enumerate(zip(x[2:], y[2:]), start=2):
            if abs(_number(u) - _number(v)) > 0.05 * max(abs(_number(v)), 1e-9) + 0.005:
                out.append(f"{label}: column {col + 1}: {u} vs {v} (more than 5 % apart)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--update", metavar="README", help="write a fresh run's table into README")
    mode.add_argument("--check", metavar="README", help="exit 1 if README's table differs from a fresh run")
    args = p.parse_args(argv)
    path = args.update or args.check
    with open(path) as f:
        text = f.read()
    fresh = run_main_job(plot=bool(args.update))
    if args.update:
        with open(path, "w") as f:
            f.write(replace_block(text, fresh))
        print(f"wrote the quick-start output into {path}:\n{fresh}")
        return 0
    shown = readme_block(text)
    diff = differences(shown, fresh)
    if diff:
        print(f"{path} is stale ({'; '.join(diff)}): run `make readme`.\nREADME shows:\n{shown}\n"
              f"A fresh run prints:\n{fresh}", file=sys.stderr)
        return 1
    print(f"{path}: the quick-start output matches a fresh run (within the CPU's rounding; wall time aside)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
