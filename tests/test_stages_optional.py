"""Optional dependencies load only when the stage that needs them runs (issue 16).

The base install (``pip install adacomp``: torch, numpy, tqdm) must import ``adacomp.stages`` and
run the ``adacomp`` command line; the image codec's entropy coder (``constriction``, extra
``codec``) and scikit-learn (DirNet, the embedding stage's k-means) are imported on first use and
then fail with an ``ImportError`` that says what to install. Each check runs in a fresh interpreter
whose ``sitecustomize`` makes the optional packages unimportable, as on a base install.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("constriction", "sklearn")

SITECUSTOMIZE = f"""
import sys
for _name in {BLOCKED!r}:
    sys.modules[_name] = None  # "import {{name}}" raises ModuleNotFoundError, as if not installed
"""


@pytest.fixture(scope="module")
def base_env(tmp_path_factory):
    """An environment whose Python cannot import constriction or scikit-learn, and finds this
    checkout's adacomp first."""
    site = tmp_path_factory.mktemp("base_install")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd=ROOT,
        timeout=300,
    )


def test_the_blocker_blocks(base_env):
    proc = _python(
        """
        for name in ("constriction", "sklearn.decomposition"):
            try:
                __import__(name)
            except ImportError:
                continue
            raise SystemExit(f"{name} imported")
        """,
        base_env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_stages_and_codec_import_without_optional_packages(base_env):
    proc = _python(
        """
        import sys
        import adacomp
        import adacomp.stages
        from adacomp.stages import DictionaryConfig, EmbeddingConfig, LowRankConfig, SGAConfig, encode
        from adacomp.workloads.codec import MeanScaleHyperprior
        assert sys.modules["constriction"] is None and sys.modules["sklearn"] is None
        print("imported")
        """,
        base_env,
    )
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr


def test_the_command_line_runs_without_optional_packages(base_env):
    commands = [[sys.executable, "-m", "adacomp.stages.cli", "--help"]]
    if shutil.which("adacomp", path=base_env.get("PATH")):  # the console script of the install
        commands.append(["adacomp", "--help"])
    for cmd in commands:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=base_env, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, (cmd, proc.stderr)
        assert "compress" in proc.stdout, cmd
        proc = subprocess.run(cmd[:-1] + ["stages"], capture_output=True, text=True, env=base_env, cwd=ROOT,
                              timeout=300)
        assert proc.returncode == 0 and "dirnet" in proc.stdout, (cmd, proc.stderr)


def test_sga_encode_names_the_codec_extra(base_env):
    proc = _python(
        """
        import torch
        from adacomp.stages import SGAConfig, encode
        from adacomp.workloads.codec import MeanScaleHyperprior

        torch.manual_seed(0)
        codec = MeanScaleHyperprior(N=8, M=8)
        codec.update()
        codec.lmbda = 0.01
        for refine in (SGAConfig(steps=2), None):
            try:
                encode(codec, torch.rand(3, 32, 32), refine=refine)
            except ImportError as exc:
                print("ImportError:", exc)
            else:
                raise SystemExit("encode ran without constriction")
        try:
            codec.compress(torch.rand(1, 3, 32, 32))
        except ImportError as exc:
            print("ImportError:", exc)
        """,
        base_env,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ImportError:")]
    assert len(lines) == 3, proc.stdout
    for line in lines:
        assert "constriction" in line and "pip install 'adacomp[codec]'" in line


def test_dirnet_and_embedding_kmeans_name_scikit_learn(base_env):
    proc = _python(
        """
        import torch
        from torch import nn
        from adacomp.stages import DictionaryConfig, EmbeddingConfig, compress_

        torch.manual_seed(0)
        cases = [
            (nn.Sequential(nn.LSTM(8, 16)), DictionaryConfig(ratio=3, dl_epochs=1)),
            (nn.Sequential(nn.Embedding(40, 8)), EmbeddingConfig(ratio=0.9, method="pq")),
        ]
        for model, config in cases:
            try:
                compress_(model, config)
            except ImportError as exc:
                print("ImportError:", exc)
        # what needs no scikit-learn still runs: the SVD baseline, the low-rank stage
        compress_(nn.Sequential(nn.LSTM(8, 16)), DictionaryConfig(ratio=3, method="svd"))
        print("svd ok")
        """,
        base_env,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ImportError:")]
    assert len(lines) == 2 and "svd ok" in proc.stdout, proc.stdout
    assert "DirNet's dictionary learning needs the optional package 'sklearn'" in lines[0]
    assert "k-means needs the optional package 'sklearn'" in lines[1]
    assert all("pip install scikit-learn" in ln for ln in lines)
