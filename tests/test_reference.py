"""The reference selection against a small example worked out on paper (docs/algorithm.md section 1)."""

import math
import random

import numpy as np
import pytest
import torch

from adacomp import _reference as ref

# Bins of 4 over 11 elements: [0:4], [4:8], [8:11] (the last bin is shorter).
DW = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 0.0, 0.0, -1.0, 4.0, 1.0, 0.0])
R = torch.tensor([0.5, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -4.0, 0.0, 0.0])
# G = R + dW = [1.5, -2, .5, 0 | 2, 0, 0, -1 | 0, 1, 0]
# H = G + dW = [2.5, -4, 1, 0 | 5, 0, 0, -2 | 4, 2, 0]
# gmax = [2, 2, 1]; sent: |H| >= gmax and G != 0 -> {0, 1} {4, 7} {9}
# (element 8 has |H| = 4 >= 1 but G = 0: nothing to send)
SENT = [0, 1, 4, 7, 9]


def test_hand_worked_binmax_mean():
    residue, counts, offsets, values, scale, info = ref.select(DW, R, 4, 0, 0)
    s = float(np.float32(5.0 / 3.0))  # mean of the maxima of the three sending bins
    assert counts.tolist() == [2, 2, 1]
    assert offsets.tolist() == [0, 1, 0, 3, 1]
    assert values.tolist() == [s, -s, s, -s, s]
    assert scale.item() == s
    assert info.tolist() == [5, 0]
    g = (R + DW).tolist()
    expect = list(g)
    for i, v in zip(SENT, values.tolist()):
        expect[i] = float(np.float32(g[i]) - np.float32(v))
    assert residue.tolist() == expect


def test_hand_worked_selected_mean_and_values():
    residue, _, _, values, scale, _ = ref.select(DW, R, 4, 1, 0)
    assert scale.item() == 1.5  # mean |G| over sent = (1.5 + 2 + 2 + 1 + 1) / 5
    assert values.tolist() == [1.5, -1.5, 1.5, -1.5, 1.5]
    assert residue.tolist() == [0.0, -0.5, 0.5, 0.0, 0.5, 0.0, 0.0, 0.5, 0.0, -0.5, 0.0]
    residue, _, _, values, scale, _ = ref.select(DW, R, 4, 0, 2)  # fp32 values: send G
    assert values.tolist() == [1.5, -2.0, 2.0, -1.0, 1.0]
    assert scale.item() == 0.0
    assert residue.tolist() == [0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_all_zero_bin_sends_nothing():
    d = torch.zeros(10)
    d[7] = 1.0
    _, counts, offsets, _, _, info = ref.select(d, torch.zeros(10), 5, 0, 0)
    assert counts.tolist() == [0, 1]
    assert offsets.tolist() == [2]
    assert info.tolist() == [1, 0]


def test_nonfinite_flag():
    d = torch.randn(100)
    d[37] = float("inf")
    assert ref.select(d, torch.zeros(100), 10)[5].tolist()[1] == 1
    d[37] = float("nan")
    assert ref.select(d, torch.zeros(100), 10)[5].tolist()[1] == 1


def test_fp16_values_saturate_and_stay_lossless():
    d = torch.tensor([1e6, -3.0, 1e-9, 2.0])
    residue, _, _, values, _, _ = ref.select(d, torch.zeros(4), 1, 0, 1)
    assert values[0].item() == 65504.0
    assert residue[0].item() == float(np.float32(1e6) - np.float32(65504.0))
    assert torch.equal(values + residue[[0, 1, 2, 3]], d)


@pytest.mark.parametrize("seed", range(5))
def test_exact_mean_is_order_independent_and_accurate(seed):
    rnd = random.Random(seed)
    vals = [abs(rnd.gauss(0, 1)) * 10 ** rnd.uniform(-30, 30) for _ in range(2000)]
    vals += [1e-45, 1.4e-45, 3e38]  # subnormals and the top of the range
    t = torch.tensor(vals, dtype=torch.float32)
    m = ref.exact_mean(t)
    perm = torch.randperm(t.numel())
    assert m == ref.exact_mean(t[perm])
    exact = math.fsum(float(x) for x in t.tolist()) / t.numel()
    assert m == pytest.approx(exact, rel=1e-6)
    assert ref.exact_mean(torch.empty(0)) == 0.0
