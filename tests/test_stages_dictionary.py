"""Tests of the DirNet dictionary stage (adacomp.stages.dictionary), on tiny models."""

from __future__ import annotations

import copy
import io
import re
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from adacomp.stages import (
    DictionaryConfig,
    DictRNN,
    UnsupportedLayerError,
    compress_,
    load,
    module_bytes,
    set_inference,
)
from adacomp.stages.dictionary import _allocate, _Option, index_dtype, omp

FAST = {"atom_grid": (0.125, 0.25, 0.5, 1.0), "max_nonzeros": 16, "dl_epochs": 1, "inference": "dense"}
CACHE: dict = {}  # dictionaries and error curves, keyed by a hash of each matrix: shared to keep tests fast


def _wrap(module: nn.Module) -> nn.Sequential:
    model = nn.Sequential()
    model.net = module
    return model


def _lstm(seed=0, **kw) -> nn.Sequential:
    torch.manual_seed(seed)
    return _wrap(nn.LSTM(8, 16, num_layers=2, batch_first=True, **kw))


def _low_rank_(lstm: nn.LSTM, rank: int = 2) -> None:
    """Give every group matrix of the shared-projection layout rank ``rank``."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        b_x = torch.randn(rank, lstm.input_size, generator=g)
        lstm.weight_ih_l0.copy_(torch.randn(64, rank, generator=g) @ b_x / 4)
        b_h0 = torch.randn(rank, 16, generator=g)
        lstm.weight_hh_l0.copy_(torch.randn(64, rank, generator=g) @ b_h0 / 4)
        lstm.weight_ih_l1.copy_(torch.randn(64, rank, generator=g) @ b_h0 / 4)
        lstm.weight_hh_l1.copy_(torch.randn(64, rank, generator=g) @ torch.randn(rank, 16, generator=g) / 4)


def _out(model, x):
    model.eval()
    with torch.no_grad():
        return model.net(x)[0]


# --------------------------------------------------------------------------- reconstruction


def test_error_decreases_as_budget_grows():
    cache = CACHE
    errors, sizes = [], []
    for ratio in (5.0, 3.5, 2.5, 1.8, 1.3):
        model = _lstm()
        report = compress_(model, DictionaryConfig(ratio=ratio, **FAST), cache=cache)
        errors.append(report.info["relative_error"])
        sizes.append(report.layers[0].bytes_after)
        assert report.layers[0].bytes_after <= report.layers[0].bytes_before / ratio
    assert all(b >= a - 1e-12 for a, b in zip(errors[1:], errors[:-1])), errors
    assert errors[-1] < 0.5 * errors[0], errors
    assert sizes == sorted(sizes)


def test_exact_reconstruction_when_budget_allows():
    model = _lstm()
    _low_rank_(model.net, rank=2)
    x = torch.randn(3, 5, 8)
    ref = _out(model, x)
    report = compress_(model, DictionaryConfig(ratio=2.0, **FAST), cache=CACHE)
    assert report.info["relative_error"] < 1e-10
    for mode in ("dense", "codes"):
        set_inference(model, mode)
        assert torch.allclose(_out(model, x), ref, atol=1e-5)


def test_linear_selected_by_filter_fn_is_exact_at_low_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 5))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(40, 3) @ torch.randn(3, 24))
    x = torch.randn(7, 24)
    ref = model(x)
    report = compress_(model, DictionaryConfig(ratio=2.0, **FAST), filter_fn=lambda m, n: n == "0")
    assert [r.name for r in report.layers] == ["0"]
    assert report.layers[0].ratio >= 2.0
    for mode in ("dense", "codes"):
        set_inference(model, mode)
        with torch.no_grad():
            assert torch.allclose(model(x), ref, atol=1e-4)


def test_allocation_is_the_least_error_within_budget():
    # two groups; a brute force over all pairs must agree with the dynamic program
    a = [_Option(k, 1, "svd", False, nb, err) for k, nb, err in [(1, 100, 9.0), (2, 200, 4.0), (3, 300, 1.0)]]
    b = [_Option(k, 1, "svd", False, nb, err) for k, nb, err in [(1, 50, 5.0), (2, 250, 2.0), (3, 400, 0.5)]]
    for budget in (150, 300, 450, 550, 700):
        pairs = [(x, y) for x in a for y in b if x.nbytes + y.nbytes <= budget]
        best = min(pairs, key=lambda p: p[0].error + p[1].error)
        got = _allocate([a, b], budget)
        assert got[0].error + got[1].error == best[0].error + best[1].error
    assert _allocate([a, b], 120) is None


# --------------------------------------------------------------------------- inference paths


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.LSTM(6, 10, num_layers=2),
        lambda: nn.LSTM(6, 10, num_layers=2, bidirectional=True, batch_first=True),
        lambda: nn.GRU(6, 10, num_layers=2, bidirectional=True),
        lambda: nn.GRU(6, 10, num_layers=3, batch_first=True, bias=False),
        lambda: nn.RNN(6, 10, num_layers=2, nonlinearity="relu"),
        lambda: nn.RNN(6, 10, num_layers=1, bidirectional=True),
    ],
)
def test_codes_path_matches_dense_reconstruction(make):
    torch.manual_seed(0)
    rnn = make()
    model = _wrap(rnn)
    x = torch.randn(4, 3, 6)
    compress_(model, DictionaryConfig(ratio=1.5, **FAST), cache=CACHE)
    net = model.net
    assert isinstance(net, DictRNN)
    # the dense path is PyTorch's own kernel on the reconstructed weights
    for name in net.weight_names:
        if name.startswith("weight"):
            setattr(rnn, name, nn.Parameter(net.weight(name).detach().clone()))
        else:
            setattr(rnn, name, nn.Parameter(getattr(net, name).detach().clone()))
    rnn.eval()
    net.eval()
    with torch.no_grad():
        ref_out, ref_state = rnn(x)
        for mode in ("dense", "codes"):
            net.inference = mode
            out, state = net(x)
            assert torch.allclose(out, ref_out, atol=1e-5), mode
            ref_h = ref_state[0] if isinstance(ref_state, tuple) else ref_state
            h = state[0] if isinstance(state, tuple) else state
            assert torch.allclose(h, ref_h, atol=1e-5), mode
        # a given initial state and an unbatched input
        h0 = torch.randn(rnn.num_layers * (2 if rnn.bidirectional else 1), 10)
        hx = (h0, torch.randn_like(h0)) if isinstance(rnn, nn.LSTM) else h0
        seq = torch.randn(5, 6)
        ref_out, _ = rnn(seq, hx)
        for mode in ("dense", "codes"):
            net.inference = mode
            assert torch.allclose(net(seq, hx)[0], ref_out, atol=1e-5), mode


def test_auto_inference_times_both_and_keeps_the_faster():
    model = _lstm()
    report = compress_(model, DictionaryConfig(ratio=3.0, **{**FAST, "inference": "auto"}), cache=CACHE)
    times = report.info["inference_seconds"]["net"]
    assert set(times) == {"codes", "dense"} and all(t > 0 for t in times.values())
    assert model.net.inference == min(times, key=times.get)
    assert report.layers[0].choice["inference"] == model.net.inference


# --------------------------------------------------------------------------- storage, save and load


def test_stored_bytes_match_the_state_dict_and_file():
    model = _lstm()
    report = compress_(model, DictionaryConfig(ratio=4.0, **FAST), cache=CACHE)
    rec = report.layers[0]
    state = model.net.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    assert sum(v.numel() * v.element_size() for v in tensors.values()) == rec.bytes_after
    assert module_bytes(model.net) == rec.bytes_after
    choice = rec.choice
    assert (
        choice["dictionary_bytes"] + choice["value_bytes"] + choice["index_bytes"] + choice["bias_bytes"]
        == rec.bytes_after
    )
    assert choice["bias_bytes"] == 4 * 4 * 64  # four bias vectors of 4H = 64, fp32
    sparse = [k for k in tensors if k.endswith("indices")]
    assert sparse, "expected sparse codes at 4x"
    for key in sparse:
        assert tensors[key].dtype == torch.uint8  # k <= 256 atoms
        assert choice["index_bytes"] > 0
    buf = io.BytesIO()
    torch.save(state, buf)
    # the file holds the same bytes plus the zip/pickle framing (about 1 kB per tensor here)
    assert rec.bytes_after <= buf.getbuffer().nbytes <= rec.bytes_after + 1500 * (len(tensors) + 2)
    assert index_dtype(256) == torch.uint8 and index_dtype(257) == torch.int16


def test_save_load_round_trip(tmp_path):
    model = _lstm()
    compress_(model, DictionaryConfig(ratio=3.0, **FAST), cache=CACHE)
    set_inference(model, "codes")
    x = torch.randn(2, 6, 8)
    ref = _out(model, x)
    path = tmp_path / "small.pt"
    torch.save(model.state_dict(), path)
    torch.load(path, weights_only=True)  # loads without pickled code
    fresh = load(_lstm(seed=5), path)
    assert isinstance(fresh.net, DictRNN) and fresh.net.inference == "codes"
    assert torch.equal(_out(fresh, x), ref)
    # a checkpoint of another layout is refused with a clear message
    other = _lstm()
    compress_(other, DictionaryConfig(ratio=2.0, **FAST), cache=CACHE)
    with pytest.raises(ValueError, match="layout"):
        other.net.load_state_dict(model.net.state_dict())


def test_fixed_method_reproduces_a_choice_and_fine_tuning_keeps_the_support():
    model = _lstm()
    report = compress_(model, DictionaryConfig(ratio=4.0, **FAST), cache=CACHE)
    atoms, nonzeros = report.info["atoms"], report.info["nonzeros"]
    again = _lstm()
    torch.manual_seed(0)
    x = torch.randn(8, 12, 8)
    target = torch.randn(8, 12, 16)

    def step(m, batch):
        return ((m.net(batch[0])[0] - batch[1]) ** 2).mean()

    rep2 = compress_(
        again,
        DictionaryConfig(atoms=atoms, nonzeros=nonzeros, method="fixed", finetune_steps=30, lr=1e-2, **FAST),
        data=[(x, target)],
        train_step=step,
        cache=CACHE,
    )
    assert rep2.layers[0].bytes_after == report.layers[0].bytes_after
    ft = rep2.info["finetune"]
    assert ft["loss_last"] < ft["loss_first"]
    for a, b in zip(model.net.codes, again.net.codes):
        if a.indices is not None:
            assert torch.equal(a.indices, b.indices)  # the sparsity pattern is not trained


def test_uniform_and_svd_methods_meet_the_budget():
    cache = CACHE
    base = compress_(_lstm(), DictionaryConfig(ratio=4.0, **FAST), cache=cache)
    budget = base.layers[0].bytes_after
    for method in ("uniform", "svd"):
        rep = compress_(_lstm(), DictionaryConfig(budget_bytes=budget, method=method, **FAST), cache=cache)
        assert rep.layers[0].bytes_after <= budget
        assert rep.layers[0].bytes_after > 0.6 * budget
    ranks = {g["atoms"] for g in rep.info["group_choices"]}
    assert all(g["dense_codes"] for g in rep.info["group_choices"]) and ranks


def test_unshared_projection_has_one_group_per_matrix():
    rep = compress_(_lstm(), DictionaryConfig(ratio=3.0, shared_projection=False, **FAST), cache=CACHE)
    assert rep.info["groups"] == [
        "net:weight_ih_l0",
        "net:weight_hh_l0",
        "net:weight_ih_l1",
        "net:weight_hh_l1",
    ]
    rep = compress_(_lstm(), DictionaryConfig(ratio=3.0, **FAST), cache=CACHE)
    assert rep.info["groups"] == ["net:x", "net:h0", "net:h1"]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"ratio": 0.875}, r"ratio=8"),
        ({"ratio": 1.0}, "must be > 1"),
        ({}, "exactly one of ratio"),
        ({"ratio": 4, "budget_bytes": 100}, "exactly one of ratio"),
        ({"ratio": 4, "method": "kmeans"}, "method must be one of"),
        ({"method": "fixed"}, "needs atoms"),
        ({"method": "fixed", "atoms": {"x": 2}, "nonzeros": {"x": 3}}, "cannot exceed"),
        ({"ratio": 4, "atoms": {"x": 2}}, "only used by"),
        ({"ratio": 4, "inference": "fast"}, "inference must be"),
        ({"ratio": 4, "atom_grid": ()}, "atom_grid"),
        ({"ratio": 4, "max_nonzeros": 0}, "max_nonzeros"),
        ({"ratio": 4, "uniform_density": 0}, "uniform_density"),
        ({"budget_bytes": -5}, "budget_bytes"),
    ],
)
def test_bad_configs_raise_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        DictionaryConfig(**kw)


def test_bad_use_raises_clear_errors():
    with pytest.raises(ValueError, match="unreachable"):
        compress_(_lstm(), DictionaryConfig(ratio=14.0, **FAST), cache=CACHE)
    with pytest.raises(ValueError, match="dense biases"):
        compress_(_lstm(), DictionaryConfig(ratio=1000.0, **FAST), cache=CACHE)
    with pytest.raises(ValueError, match="finetune_steps needs data"):
        compress_(_lstm(), DictionaryConfig(ratio=4.0, finetune_steps=5, **FAST), cache=CACHE)
    with pytest.raises(ValueError, match="exactly the groups"):
        compress_(
            _lstm(), DictionaryConfig(method="fixed", atoms={"x": 2}, nonzeros={"x": 1}, **FAST), cache=CACHE
        )
    model = nn.Sequential(nn.Embedding(10, 8), nn.LSTM(8, 8, proj_size=4))
    with pytest.raises(UnsupportedLayerError, match="proj_size"):
        compress_(model, DictionaryConfig(ratio=4.0, **FAST), filter_fn=lambda m, n: n == "1")
    with pytest.raises(UnsupportedLayerError, match="nn.LSTM"):
        compress_(model, DictionaryConfig(ratio=4.0, **FAST), filter_fn=lambda m, n: n == "0")
    model = _lstm()
    compress_(model, DictionaryConfig(ratio=4.0, **FAST), cache=CACHE)
    with pytest.raises(TypeError, match="padded tensor"):
        model.net(nn.utils.rnn.pack_sequence([torch.randn(3, 8)]))
    with pytest.raises(ValueError, match="'codes' or 'dense'"):
        set_inference(model, "auto")


# --------------------------------------------------------------------------- issue 16


class _CharModel(nn.Module):
    """Embedding -> 2-layer LSTM -> Linear decoder (the shape of CharLSTM, tiny)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.dec = nn.Linear(16, 20)

    def forward(self, x):
        return self.dec(self.lstm(self.emb(x))[0])


def test_default_selects_recurrent_layers_only_linear_on_request():
    model = _CharModel()
    report = compress_(model, DictionaryConfig(ratio=3.0, **FAST), cache=CACHE)
    assert [r.name for r in report.layers] == ["lstm"]
    assert isinstance(model.lstm, DictRNN) and type(model.dec) is nn.Linear
    # an MLP has nothing DirNet compresses by default; the message says how to select a Linear
    mlp = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 5))
    with pytest.raises(ValueError, match=r"no layer selected for stage 'dirnet'.*nn.Linear only when filter"):
        compress_(mlp, DictionaryConfig(ratio=4, **FAST))
    assert all(type(m) is nn.Linear for m in mlp if not isinstance(m, nn.ReLU))
    report = compress_(mlp, DictionaryConfig(ratio=2, **FAST), filter_fn=lambda m, n: n == "2")
    assert [r.name for r in report.layers] == ["2"] and type(mlp[0]) is nn.Linear


def _quantize_dynamic(model, inplace=False):
    quantization = pytest.importorskip("torch.ao.quantization")
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        return quantization.quantize_dynamic(model, {nn.LSTM, nn.Linear}, dtype=torch.qint8, inplace=inplace)


def _quantized(module: nn.Module) -> list[str]:
    """Names of the dynamically quantized Linear modules in ``module``."""
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    return [n for n, m in module.named_modules() if isinstance(m, dynamic)]


@pytest.mark.parametrize("method", ["dirnet", "svd"])  # sparse codes; dense codes
def test_compressed_model_deepcopies_pickles_and_quantizes(method):
    model = _CharModel()
    config = (
        DictionaryConfig(ratio=3.0, **FAST)
        if method == "dirnet"
        else DictionaryConfig(budget_bytes=6000, method="svd", **FAST)
    )
    compress_(model, config, cache=CACHE)
    kinds = {c.dense for c in model.lstm.codes}
    assert kinds == ({False} if method == "dirnet" else {True})
    x = torch.randint(0, 20, (3, 7))
    model.eval()
    refs = {}
    for mode in ("codes", "dense"):  # the codes path caches a CSR matrix, which used to break copies
        set_inference(model, mode)
        with torch.no_grad():
            refs[mode] = model(x)
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)  # the whole module, pickled
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (twin, loaded):
        assert isinstance(other.lstm, DictRNN) and other.lstm.inference == "dense"
        for mode in ("codes", "dense"):
            set_inference(other, mode)
            with torch.no_grad():
                assert torch.equal(other(x), refs[mode]), mode
    # torch.ao dynamic int8 reaches the compressed layer's dictionaries (and dense codes) too
    quantized = _quantize_dynamic(model)
    expected = len(model.lstm.codes) * (2 if method == "svd" else 1)
    assert len(_quantized(quantized.lstm)) == expected and _quantized(quantized.dec) == [""]
    assert _quantized(model) == []  # not in place: the original is untouched
    for mode in ("codes", "dense"):
        set_inference(quantized, mode)
        with torch.no_grad():
            out = quantized(x)
        assert ((out - refs[mode]).norm() / refs[mode].norm()) < 0.05, mode
    same = _quantize_dynamic(twin, inplace=True)
    assert same is twin and len(_quantized(twin.lstm)) == expected
    copy.deepcopy(quantized)  # and the quantized model is an ordinary module again


def test_state_dicts_of_0_2_0_still_load():
    model = _CharModel()
    compress_(model, DictionaryConfig(budget_bytes=6000, method="svd", **FAST), cache=CACHE)  # dense codes
    x = torch.randint(0, 20, (2, 5))
    ref = _out_model(model, x)
    old = {}
    for key, value in model.state_dict().items():  # the keys of 0.2.0: plain parameters
        key = key.replace("dictionary.weight", "dictionary").replace("dense_codes.weight", "values")
        old[key] = value
    assert "lstm.codes.0.dictionary" in old and "lstm.codes.0.values" in old
    fresh = load(_CharModel(seed=3), old)
    assert torch.equal(_out_model(fresh, x), ref)


def _out_model(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_batched_omp_matches_scikit_learn():
    sklearn_omp = pytest.importorskip("sklearn.linear_model").orthogonal_mp_gram
    rng = np.random.default_rng(0)
    for rows, n, k, s in [(70, 12, 20, 9), (40, 16, 8, 8)]:
        d = rng.standard_normal((k, n))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        x = rng.standard_normal((rows, n))
        x[:5] = rng.standard_normal((5, 2)) @ d[:2]  # exact after two atoms: the path ends early
        errors, support, values = omp(d, x, s)
        z = np.zeros((rows, k))
        np.put_along_axis(z, support, values, axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "ended prematurely" on the exact rows
            ref = np.asarray(sklearn_omp(d @ d.T, d @ x.T, n_nonzero_coefs=s)).reshape(k, rows).T
            for i in range(rows):
                path = np.asarray(sklearn_omp(d @ d.T, d @ x[i], n_nonzero_coefs=s, return_path=True))
                path = path.reshape(k, -1)
                want = [((x[i] - path[:, min(t, path.shape[1] - 1)] @ d) ** 2).sum() for t in range(s)]
                np.testing.assert_allclose(np.minimum.accumulate(errors[i]), want, atol=1e-10)
        np.testing.assert_allclose(z, ref, atol=1e-10)
        assert all(len(set(row)) == s for row in support)  # s distinct atoms a row


def test_inference_batch_is_what_auto_times_and_a_forced_path_is_kept(monkeypatch):
    seen = []
    forward = DictRNN.forward

    def spy(self, input, hx=None):
        seen.append((self.inference, tuple(input.shape)))
        return forward(self, input, hx)

    monkeypatch.setattr(DictRNN, "forward", spy)
    config = DictionaryConfig(ratio=3.0, **{**FAST, "inference": "auto"}, inference_batch=[(2, 3), (4, 5)])
    assert config.inference_batch == ((2, 3), (4, 5))
    report = compress_(_lstm(), config, cache=CACHE)  # batch_first: (batch, steps, features)
    shapes = {shape for _, shape in seen}
    assert shapes == {(2, 3, 8), (4, 5, 8)}
    for mode in ("codes", "dense"):  # two warm-up calls and timing_repeats timed calls per shape
        assert sum(1 for m, s in seen if m == mode and s == (2, 3, 8)) == 2 + config.timing_repeats
    assert report.info["inference_batch"] == ((2, 3), (4, 5))
    assert set(report.info["inference_seconds"]["net"]) == {"codes", "dense"}
    # long calls: PyTorch's fused kernel on rebuilt weights beats the step-by-step codes path (one
    # thread: on a busy machine two threads waiting for each other can stall either path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _lstm()
        config = DictionaryConfig(ratio=3.0, **{**FAST, "inference": "auto"}, inference_batch=(8, 128))
        compress_(model, config, cache=CACHE)
    finally:
        torch.set_num_threads(threads)
    assert model.net.inference == "dense"
    # a forced path is kept without timing
    seen.clear()
    for mode in ("codes", "dense"):
        model = _lstm()
        report = compress_(model, DictionaryConfig(ratio=3.0, **{**FAST, "inference": mode}), cache=CACHE)
        assert model.net.inference == mode and report.info["inference_seconds"] == {}
    assert seen == []


def test_inference_batch_errors_and_the_old_spelling():
    for bad in [(0, 1), (1,), "1x1", [(1, 1), (2,)], (1.5, 2), []]:
        with pytest.raises(ValueError, match="inference_batch must be"):
            DictionaryConfig(ratio=4, inference_batch=bad)
    with pytest.warns(DeprecationWarning, match="inference_batch"):
        config = DictionaryConfig(ratio=4, timing_batch=20, timing_steps=250)
    assert config.inference_batch == (20, 250) and config.timing_batch is None
    assert DictionaryConfig(ratio=4, inference_batch=[3, 4]).inference_batch == (3, 4)  # from JSON


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize(
    "progress, stream, drawn",
    [
        (None, _Terminal, True),  # the default of compress_: a bar on a terminal only
        (None, io.StringIO, False),
        (True, io.StringIO, True),  # asked for
        (False, _Terminal, False),
    ],
)
def test_progress_bar_over_the_dictionaries(monkeypatch, progress, stream, drawn):
    err = stream()
    monkeypatch.setattr(sys, "stderr", err)
    compress_(_lstm(), DictionaryConfig(ratio=3.0, **FAST), progress=progress, cache=CACHE)
    text = err.getvalue()
    assert ("dirnet dictionaries" in text) == drawn
    if drawn:
        assert re.search(r"\d+/\d+ \[", text) and "dict" in text


def test_missing_scikit_learn_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.decomposition", None)  # as if not installed
    with pytest.raises(ImportError, match=r"learning needs the optional package 'sklearn'.*pip install"):
        compress_(_lstm(seed=11), DictionaryConfig(ratio=3.0, **FAST), cache={})


def test_default_grid_skips_full_size_dictionaries():
    grid = DictionaryConfig(ratio=4).atom_grid
    assert max(grid) == 0.75 and min(grid) == 1 / 32
