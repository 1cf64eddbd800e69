"""The network testbed of benchmarks/netbench.py: namespaces, links, rate limit, clean-up.

These build real network namespaces (root only); each test removes what it made.
"""

import importlib.util
import os
import re
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "netbench.py")

_spec = importlib.util.spec_from_file_location("netbench", SCRIPT)
netbench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(netbench)


def _netns_refusal() -> str | None:
    """Why this machine cannot build a testbed, or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root)"
    probe = f"nbprobe{os.getpid()}"
    try:
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    except FileNotFoundError:
        return "`ip` (iproute2) is not installed"
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


_REFUSAL = _netns_refusal()
needs_netns = pytest.mark.skipif(_REFUSAL is not None, reason=str(_REFUSAL))


def _leftovers(prefix: str) -> tuple[list[str], list[str]]:
    """Namespaces, and links in the root namespace, whose name starts with ``prefix``."""
    spaces = [n for n in netbench.list_netns() if n.startswith(prefix)]
    links = [line.split()[0] for line in subprocess.run(["ip", "-br", "link"], capture_output=True,
                                                        text=True).stdout.splitlines()
             if line.startswith(prefix)]
    return spaces, links


# ------------------------------------------------------------------------------ no root needed

def test_parse_rate():
    assert netbench.parse_rate("100mbit") == 100_000_000
    assert netbench.parse_rate("1gbit") == 1_000_000_000
    assert netbench.parse_rate("2.5Mbit") == 2_500_000
    assert netbench.parse_rate("1mbps") == 8_000_000  # bytes per second, as tc reads "bps"
    assert netbench.parse_rate("none") is None
    for bad in ("fast", "100 furlongs", "10bit"):
        with pytest.raises(ValueError, match="rate"):
            netbench.parse_rate(bad)


def test_parse_variant():
    assert netbench.parse_variant("none") == ("none", ["--compressor", "none"])
    assert netbench.parse_variant("powersgd", 4)[1] == ["--compressor", "powersgd", "--powersgd-rank", "4"]
    assert netbench.parse_variant("adacomp:sharded")[1] == ["--compressor", "adacomp",
                                                           "--exchange", "sharded"]
    with pytest.raises(ValueError, match="only adacomp"):
        netbench.parse_variant("fp16:sharded")
    with pytest.raises(ValueError, match="exchange must be one of"):
        netbench.parse_variant("adacomp:ring")
    with pytest.raises(ValueError, match="compressor must be one of"):
        netbench.parse_variant("topk")


def test_variants_follow_what_train_py_offers(monkeypatch):
    monkeypatch.setattr(netbench, "_train_help", lambda: "--compressor --link-mbps")
    with pytest.raises(ValueError, match="no --exchange option"):
        netbench.check_variants(["none", "adacomp:sharded"], 4)
    monkeypatch.setattr(netbench, "_train_help", lambda: "--compressor --exchange --link-mbps")
    parsed = dict(netbench.check_variants(["none", "adacomp:auto"], 4, rate_bps=100_000_000))
    assert parsed["none"] == ["--compressor", "none"]  # the link speed goes to AdaComp's cost model only
    assert parsed["adacomp:auto"] == ["--compressor", "adacomp", "--exchange", "auto", "--link-mbps", "100"]


def test_bf16_and_fsdp_variants():
    assert netbench.parse_variant("bf16") == ("bf16", ["--compressor", "bf16"])
    assert netbench.parse_variant("fsdp:none") == ("fsdp:none", ["--backend", "fsdp", "--compressor", "none"])
    assert netbench.parse_variant("fsdp:adacomp")[1] == ["--backend", "fsdp", "--compressor", "adacomp"]
    for bad in ("fsdp", "fsdp:powersgd", "fsdp:bf16", "fsdp:adacomp:sharded"):
        with pytest.raises(ValueError, match="FSDP2 backend takes"):
            netbench.parse_variant(bad)
    assert netbench.dense_variant("fsdp:adacomp") == "fsdp:none"
    assert netbench.dense_variant("adacomp:auto") == netbench.dense_variant("bf16") == "none"
    # the link's speed goes to the cost model of the DDP exchange only
    parsed = dict(netbench.check_variants(["fsdp:adacomp", "adacomp"], 4, rate_bps=100_000_000))
    assert parsed["fsdp:adacomp"] == ["--backend", "fsdp", "--compressor", "adacomp"]
    assert parsed["adacomp"][-2:] == ["--link-mbps", "100"]
    args = netbench.parse_args(["--models", "gpt", "--variants", "fsdp:none", "fsdp:adacomp", "bf16"])
    assert args.models == ["gpt"] and args.variants == ["fsdp:none", "fsdp:adacomp", "bf16"]
    with pytest.raises(SystemExit):
        netbench.parse_args(["--variants", "fsdp:fp16"])


def test_gpt_commands_are_what_train_py_accepts():
    """The arguments netbench hands to launch/train.py for the GPT parse there, as meant."""
    from adacomp.workloads import training
    from adacomp.workloads.models import build_model

    spec = netbench.MODELS["gpt"]
    for variant in ("none", "bf16", "powersgd", "adacomp:auto", "fsdp:none", "fsdp:adacomp"):
        _, vargs = netbench.parse_variant(variant)
        a = training.parse_args([*spec["args"], "--batch-size", str(spec["batch_size"]), "--max-steps", "60",
                                 *vargs, "--plot", ""])
        assert (a.model, a.data, a.optimizer, a.autocast) == ("gpt", "shakespeare", "adamw", "bf16")
        assert (a.gpt_layers, a.gpt_embd, a.gpt_heads, a.seq_len, a.batch_size) == (4, 192, 6, 64, 16)
        assert a.backend == ("fsdp" if variant.startswith("fsdp:") else "ddp")
    a = training.parse_args([*spec["args"], "--gpt-layers", "6"])  # arguments after `--` come last and win
    assert a.gpt_layers == 6
    model = build_model("gpt", vocab_size=65, n_layer=4, n_embd=192, n_head=6)  # Shakespeare: 65 characters
    assert 1.8e6 < sum(p.numel() for p in model.parameters()) < 1.9e6


def _row(variant, ms, rx, loss=1.5, dense_bytes=8e6):
    return {"model": "gpt", "variant": variant, "time_per_step_s": ms / 1e3, "mean_time_per_step_s": ms / 1e3,
            "rx_bytes_per_step_mean": rx, "script_dense_bytes_per_step": dense_bytes,
            "metrics": {"val_loss": loss}}


def test_fsdp_target_and_cap():
    """Cap = dense bytes / all-gather bytes; the all-gathers are what the AdaComp run received
    less its compressed reduce-scatter (nominal: what the dense run received beyond
    (W-1)/W x the fp32 gradient)."""
    rows = [_row("fsdp:none", 1000.0, 18e6), _row("fsdp:adacomp", 450.0, 6.1e6, loss=1.55)]
    rows[1]["script_received_bytes_per_step"] = 2e6  # whole run, dense warm-up included: not used
    rows[1]["script_wire_bytes_per_step_steady"] = 0.4e6 / 3  # 0.1 MB received in the steady window
    out = netbench.check_targets(rows, 100_000_000, 4)["issue17_fsdp"]
    assert out["applies"]
    t = out["gpt"]
    assert t["collective_unit_bytes"] == pytest.approx(6e6)
    assert t["cap_nominal"] == pytest.approx(18 / 12)
    assert t["allgather_bytes_per_step"] == pytest.approx(6e6)
    assert t["reduce_scatter_units"] == pytest.approx(2.0)
    assert t["cap"] == pytest.approx(3.0)
    assert t["speedup_vs_dense"] == pytest.approx(1000 / 450) and t["speedup_met"]
    assert t["bytes_ratio_measured"] == pytest.approx(18 / 6.1)
    assert t["loss_gap_relative"] == pytest.approx(0.05 / 1.5)
    rows[1]["time_per_step_s"] = 0.7
    assert not netbench.check_targets(rows, 100_000_000, 4)["issue17_fsdp"]["gpt"]["speedup_met"]
    assert not netbench.check_targets(rows, 1_000_000_000, 4)["issue17_fsdp"]["applies"]


def test_auto_targets():
    times = {"none": 100.0, "fp16": 60.0, "bf16": 60.0, "powersgd": 40.0, "adacomp:allgather": 30.0,
             "adacomp:sharded": 35.0, "adacomp:auto": 31.0}
    rows = [_row(v, ms, 1e6) for v, ms in times.items()]
    fast = netbench.check_targets(rows, 1_000_000_000, 4)["issue18_gpt"]["gpt"]
    assert fast["faster_than_all_baselines_met"] and fast["best_fixed"] == "adacomp:allgather"
    assert fast["vs_best_fixed"] == pytest.approx(1 / 30) and fast["within_5pct_of_best_fixed_met"]
    slow = netbench.check_targets(rows, 100_000_000, 4)["issue18_gpt"]["gpt"]
    assert not slow["speedup_5x_met"] and slow["faster_than_powersgd_met"]
    rows[-1]["time_per_step_s"] = 0.0325  # 8 % behind allgather
    behind = netbench.check_targets(rows, 100_000_000, 4)["issue18_gpt"]["gpt"]
    assert not behind["within_5pct_of_best_fixed_met"]
    table = netbench.compare_table({"rows": [_table_row(v, ms) for v, ms in
                                             (("none", 100), ("fsdp:none", 300), ("fsdp:adacomp", 150))],
                                    "workers": 4, "rate": "100 Mbit/s"})
    speedups = {line.split()[1]: line.split()[4] for line in table.splitlines()[2:5]}
    assert speedups == {"none": "1.0x", "fsdp:none": "1.0x", "fsdp:adacomp": "2.0x"}  # vs its backend's dense


def _table_row(variant, ms):
    return dict(_row(variant, ms, 1e6), tx_bytes_per_step_mean=1e6, total_rx_bytes_per_worker=1e7,
                script_wire_bytes_per_worker=1e6)


def test_testbed_arguments_are_checked():
    with pytest.raises(ValueError, match="workers"):
        netbench.Testbed(0)
    with pytest.raises(TypeError, match="workers"):
        netbench.Testbed(2.0)
    with pytest.raises(ValueError, match="prefix"):
        netbench.Testbed(2, prefix="eth")
    with pytest.raises(ValueError, match="delay_ms"):
        netbench.Testbed(2, delay_ms=-1)


def test_link_figures_use_the_steady_state():
    """Per-step figures span the first to the last progress snapshot, not the whole launch."""
    def snap(t, step, rx0, rx1):
        return {"t": t, "step": step, "counters": [{"rx_bytes": rx0, "tx_bytes": rx1},
                                                   {"rx_bytes": rx1, "tx_bytes": rx0}]}
    before = [{"rx_bytes": 0, "tx_bytes": 0}] * 2
    after = [{"rx_bytes": 5000, "tx_bytes": 5000}] * 2
    snaps = [snap(10.0, 10, 1000, 1000), snap(11.0, 20, 2000, 2000), snap(14.0, 30, 3000, 3000)]
    out = netbench.link_figures(before, after, snaps, steps=40, elapsed=20.0)
    assert out["steady_steps"] == 20
    assert out["rx_bytes_per_step"] == [100.0, 100.0]
    assert out["time_per_step_s"] == pytest.approx(0.2)
    assert out["median_time_per_step_s"] == pytest.approx(0.2)  # median of 0.1 and 0.3
    assert out["total_rx_bytes"] == [5000, 5000]


def test_link_figures_skip_a_dense_warm_up():
    """With ``from_step`` (a run's dense warm-up), the window starts at the first snapshot at or
    after it: the figures are those of the compressed steps only."""
    def snap(t, step, rx):
        return {"t": t, "step": step, "counters": [{"rx_bytes": rx, "tx_bytes": rx}]}
    snaps = [snap(1.0, 5, 1000), snap(3.0, 10, 11000), snap(4.0, 15, 12000), snap(5.0, 20, 13000)]
    before, after = [{"rx_bytes": 0, "tx_bytes": 0}], [{"rx_bytes": 20000, "tx_bytes": 20000}]
    dense = netbench.link_figures(before, after, snaps, steps=20, elapsed=9.0)
    assert dense["steady_from_step"] == 5 and dense["rx_bytes_per_step"] == [800.0]
    out = netbench.link_figures(before, after, snaps, steps=20, elapsed=9.0, from_step=10)
    assert (out["steady_from_step"], out["steady_to_step"], out["from_step"]) == (10, 20, 10)
    assert out["rx_bytes_per_step"] == [200.0] and out["time_per_step_s"] == pytest.approx(0.2)
    late = netbench.link_figures(before, after, snaps, steps=20, elapsed=9.0, from_step=25)
    assert late["time_per_step_s"] is None  # no window left: whole-launch figures
    assert netbench.parse_args(["--steady-from", "30"]).steady_from == 30
    assert netbench.parse_args([]).steady_from is None


# ------------------------------------------------------------------------------ real namespaces

@needs_netns
def test_testbed_connects_limits_rate_and_cleans_up():
    payload = 2_000_000
    with netbench.Testbed(2, rate_bps=netbench.parse_rate("20mbit")) as bed:
        prefix = bed.prefix
        assert set(bed.namespaces()) <= set(netbench.list_netns())
        assert bed.subnet.subnet_of(netbench.ipaddress.ip_network(netbench.SUBNET_BASE))
        root_addrs = subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True).stdout
        assert bed.addr(0) not in root_addrs and bed.addr(1) not in root_addrs
        server = bed.spawn(1, [sys.executable, "-c", (
            "import socket,sys\n"
            f"s = socket.create_server(('{bed.addr(1)}', 5001))\n"
            "print('ready', flush=True)\n"
            "c, _ = s.accept(); n = 0\n"
            "while (b := c.recv(65536)): n += len(b)\n"
            "c.sendall(b'k'); print(n, flush=True)\n")], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        before = bed.counters()
        client = subprocess.run(bed.exec_argv(0, [sys.executable, "-c", (
            "import socket,time\n"
            f"s = socket.create_connection(('{bed.addr(1)}', 5001)); t = time.time()\n"
            f"s.sendall(bytes({payload})); s.shutdown(socket.SHUT_WR); s.recv(1)\n"
            "print(time.time() - t)\n")]), capture_output=True, text=True, timeout=30)
        assert client.returncode == 0, client.stderr
        seconds = float(client.stdout)
        assert int(server.stdout.readline()) == payload
        after = bed.counters()
        # 2 MB at 20 Mbit/s: 0.8 s (less the tbf burst); unshaped veths move it in milliseconds
        assert 0.6 <= seconds <= 5.0, f"2 MB took {seconds:.3f} s on a 20 Mbit/s link"
        received = after[1]["rx_bytes"] - before[1]["rx_bytes"]
        assert payload <= received <= 1.1 * payload  # the payload plus TCP/IP headers
        assert after[0]["tx_bytes"] - before[0]["tx_bytes"] == pytest.approx(received, rel=0.01)
        assert bed.counters()[0]["rx_bytes"] - before[0]["rx_bytes"] < 0.1 * payload  # ACKs only
    assert _leftovers(prefix) == ([], [])
    assert server.poll() is not None


@needs_netns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_removes_its_testbed(sig):
    proc = subprocess.Popen([sys.executable, SCRIPT, "--hold", "60", "--workers", "2", "--rate", "50mbit"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not (lines and lines[-1].startswith("ready")):
            line = proc.stdout.readline()
            assert line, f"netbench --hold exited early: {proc.stderr.read()}"
            lines.append(line)
        spaces = re.findall(r"namespace (nb\d+-\d+)", "".join(lines))
        assert len(spaces) == 2 and set(spaces) <= set(netbench.list_netns())
        prefix = spaces[0].split("-")[0]
        proc.send_signal(sig)
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert _leftovers(prefix) == ([], [])


@needs_netns
def test_cleanup_removes_what_a_killed_run_left():
    proc = subprocess.Popen([sys.executable, SCRIPT, "--hold", "60", "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not proc.stdout.readline().startswith("ready"):
            assert proc.poll() is None, proc.stderr.read()
    finally:
        proc.kill()  # SIGKILL: no handler runs, the namespaces stay behind
        proc.wait()
    prefix = f"nb{proc.pid}"
    assert len(_leftovers(prefix)[0]) == 3  # two ranks and the switch
    out = subprocess.run([sys.executable, SCRIPT, "--cleanup"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"{prefix}-sw" in out.stdout
    assert _leftovers(prefix) == ([], [])
