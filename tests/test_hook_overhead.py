"""benchmarks/hook_overhead.py: the figures are combined as documented (no processes), and a
``--quick`` run on 2 ranks (gloo on loopback, synthetic data) writes the expected JSON."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "hook_overhead.py")

_spec = importlib.util.spec_from_file_location("hook_overhead", SCRIPT)
hook_overhead = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hook_overhead)


def _rank_rows(times, variant, parts=None):
    return {"model": "cnn", "variant": variant, "world": 2, "rank": 0,
            "steps": [{"step": t, "fwd": t / 4, "bwd": t / 2, "opt": t / 4, "loss": 1.0, "load1": 2.0,
                       "parts": dict(parts or {})} for t in times]}


def test_combine_takes_the_slowest_rank_and_the_median():
    per_rank = [{"rows": [_rank_rows([0.10, 0.30, 0.20], "none"),
                          _rank_rows([0.20, 0.20, 0.20], "adacomp:allgather", {"compress": 0.01})]},
                {"rows": [_rank_rows([0.15, 0.10, 0.10], "none"),
                          _rank_rows([0.50, 0.10, 0.30], "adacomp:allgather", {"compress": 0.03})]}]
    rows = {r["variant"]: r for r in hook_overhead.combine(2, per_rank, ["none", "adacomp:allgather"])}
    # per step the slower rank: dense 150, 300, 200 -> 200 ms; adacomp 500, 200, 300 -> 300 ms
    assert rows["none"]["step_ms"] == pytest.approx(200.0)
    assert rows["adacomp:allgather"]["step_ms"] == pytest.approx(300.0)
    assert rows["adacomp:allgather"]["vs_dense"] == pytest.approx(1.5)
    assert rows["none"]["vs_dense"] == pytest.approx(1.0)
    assert rows["none"]["load1_median"] == 2.0
    assert rows["adacomp:allgather"]["breakdown_ms"]["compress"] == pytest.approx(20.0)  # mean over ranks
    assert set(rows["adacomp:allgather"]["breakdown_ms"]) == set(hook_overhead.PARTS)


def test_cli_rejects_too_short_warmup():
    with pytest.raises(SystemExit):
        hook_overhead.parse_args(["--warmup", "1"])


def test_quick_run_writes_the_figures(tmp_path):
    out = tmp_path / "h.json"
    variants = ["none", "bf16", "powersgd", "adacomp:allgather", "adacomp:sharded"]
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--models", "cnn", "--variants", *variants,
                           "--json", str(out)], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "ratio to dense" in proc.stdout and "load average" in proc.stdout
    res = json.loads(out.read_text())
    meta = res["meta"]
    assert meta["ranks"] == [2] and meta["synthetic"] and meta["steps"] >= 1
    assert len(meta["per_world"]["2"]["load_before"]) == 3
    assert meta["model_info"]["cnn"]["tensors"] == 10 and meta["interleaved"]
    assert len(meta["per_world"]["2"]["models"]["cnn"]["load_after"]) == 3
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == set(variants)
    for r in rows.values():
        assert r["model"] == "cnn" and r["world"] == 2
        assert r["step_ms"] > 0 and r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["vs_dense"] > 0
        assert len(r["step_ms_all"]) == meta["steps"] and r["load1_median"] >= 0
    assert rows["none"]["vs_dense"] == 1.0
    for v in ("adacomp:allgather", "adacomp:sharded"):
        b = rows[v]["breakdown_ms"]
        assert set(b) == set(hook_overhead.PARTS)
        assert b["compress"] > 0 and b["sizes"] > 0 and b["decode"] > 0
        assert rows[v]["ratio"] > 5 and rows[v]["exchanges"][v.split(":")[1]] > 0
    # allgather: one round of slots after the first exchange; sharded: sizes, then payloads
    assert rows["adacomp:allgather"]["breakdown_ms"]["slots"] > 0
    assert rows["adacomp:allgather"]["slots"]["one_round"] > 0
    assert rows["adacomp:sharded"]["breakdown_ms"]["payload"] > 0
    assert rows["adacomp:sharded"]["breakdown_ms"]["slots"] == 0
    assert rows["adacomp:sharded"]["breakdown_ms"]["a2a"] > 0
    assert rows["adacomp:sharded"]["breakdown_ms"]["owner"] > 0
    assert rows["adacomp:allgather"]["breakdown_ms"]["a2a"] == 0
