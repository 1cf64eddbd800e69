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
