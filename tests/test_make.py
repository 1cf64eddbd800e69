"""The Makefile's install step: skipped when this checkout is installed and its build inputs
are older than the stamp, run otherwise (PIP=false makes any pip call fail, so a skipped
install is one that exits 0)."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _make_install(stamp):
    return subprocess.run(["make", "--no-print-directory", "install", f"PYTHON={sys.executable}", "PIP=false",
                           f"STAMP={stamp}"], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_install_is_skipped_when_nothing_changed(tmp_path):
    pytest.importorskip("adacomp._C", reason="the stamp check needs the built extension (make install)")
    stamp = tmp_path / "stamp"
    stamp.touch()
    proc = _make_install(stamp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "up to date" in proc.stdout


def test_install_runs_without_a_stamp(tmp_path):
    proc = _make_install(tmp_path / "missing-stamp")
    assert proc.returncode != 0 and "false install" in proc.stdout + proc.stderr


def test_install_runs_when_a_build_input_is_newer(tmp_path):
    stamp = tmp_path / "stamp"
    stamp.touch()
    os.utime(stamp, (1_000_000, 1_000_000))  # 1970: every build input is newer
    proc = _make_install(stamp)
    assert proc.returncode != 0 and "false install" in proc.stdout + proc.stderr
