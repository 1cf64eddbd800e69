"""SGA and bits-back refinement: the schedule, Gumbel rounding, loss never worse than amortized,
bit-exact round trips through the unchanged decompress(), bits returned, config and input errors."""

import math

import pytest
import torch

from adacomp.stages import BitsBackConfig, SGAConfig, TemperatureSchedule, encode, sga_round
from adacomp.workloads.codec import MeanScaleHyperprior, PosteriorFit, fit_posterior, reconstruct


@pytest.fixture(scope="module")
def codec():
    torch.set_num_threads(1)
    torch.manual_seed(2)
    c = MeanScaleHyperprior(N=8, M=8)
    c.update()
    c.lmbda = 0.01
    return c


def _smooth_image(h, w, seed):
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]


def test_temperature_schedule_is_the_papers():
    s = TemperatureSchedule()
    assert s(0, 2000) == 0.5 and s(700, 2000) == 0.5
    assert math.isclose(s(1700, 2000), 0.5 * math.exp(-1.0), rel_tol=1e-12)
    assert math.isclose(s(1999, 2000), 0.5 * math.exp(-0.001 * 1299), rel_tol=1e-12)
    assert s(10**8, 2000) == 1e-8  # clipped below
    assert math.isclose(s(850, 1000), s(1700, 2000))  # shorter runs: the same curve, compressed
    taus = [s(t, 500) for t in range(500)]
    assert all(a >= b for a, b in zip(taus, taus[1:]))
    with pytest.raises(ValueError):
        TemperatureSchedule(tau_min=1.0, tau_max=0.5)


def test_sga_round_stays_between_floor_and_ceil_and_hardens():
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(2000, dtype=torch.float32) * 3
    v = v[(v - v.floor() - 0.5).abs() > 0.05]  # away from ties
    r = sga_round(v, 0.5, gen)
    assert bool(((r >= v.floor() - 1e-5) & (r <= v.ceil() + 1e-5)).all())
    assert not torch.equal(r, torch.round(v))  # soft and random at tau = 0.5
    assert torch.equal(sga_round(v, 1e-6, gen), torch.round(v))  # hard rounding as tau -> 0
    x = v.clone().requires_grad_(True)
    sga_round(x, 0.3, gen).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_sga_lowers_the_loss_and_round_trips(codec):
    x = _smooth_image(50, 70, seed=0)
    info = {}
    data = encode(codec, x, refine=SGAConfig(steps=25, lr=0.05), info=info)
    (rec,) = info["images"]
    assert rec["loss_final"] < rec["loss_start"]  # an untrained encoder leaves a big gap
    x_hat = codec.decompress(data)
    assert x_hat.shape == (1, 3, 50, 70)
    assert torch.equal(x_hat, reconstruct(codec, rec["latents"]))  # bit for bit
    assert rec["bits"] + 10 * 8 <= 8 * len(data) <= rec["bits"] + 10 * 8 + 32


def test_refinement_never_ends_worse_than_its_start(codec):
    x = _smooth_image(64, 64, seed=1)
    # a learning rate far too large makes the iterates worse; the best hard-rounded latents are kept
    info = {}
    encode(codec, x, refine=SGAConfig(steps=6, lr=50.0), info=info)
    (rec,) = info["images"]
    assert rec["loss_final"] <= rec["loss_start"]
    info = {}
    encode(codec, x, refine=SGAConfig(steps=6, lr=50.0, keep_best=False), info=info)
    assert info["images"][0]["best_step"] == 6


def test_batch_refinement_equals_single_and_odd_sizes(codec):
    xs = [_smooth_image(33, 47, seed=s) for s in range(3)] + [_smooth_image(40, 20, seed=9)]
    cfg = SGAConfig(steps=8, lr=0.02)
    info = {}
    data = encode(codec, xs, refine=cfg, info=info)  # one stream, first three refined as a batch
    out = codec.decompress(data)
    assert isinstance(out, list) and [o.shape[-2:] for o in out] == [(33, 47)] * 3 + [(40, 20)]
    for rec, o in zip(info["images"], out):
        assert torch.equal(o, reconstruct(codec, rec["latents"]))
    separate = encode(codec, torch.stack(xs[:3]), refine=cfg, separate=True)
    assert isinstance(separate, list) and len(separate) == 3
    for s, o in zip(separate, out[:3]):
        torch.testing.assert_close(codec.decompress(s), o, atol=2e-2, rtol=0)  # batch vs single: float noise


def test_bits_back_round_trip_and_returned_bits(codec):
    xs = [_smooth_image(128, 128, seed=s) for s in range(3)]
    info = {}
    cfg = BitsBackConfig(steps=10, lr=0.02, posterior=PosteriorFit(steps=15, lr=0.05))
    data = encode(codec, xs, refine=cfg, info=info)
    out = codec.decompress(data)
    recs = info["images"]
    assert [r["bits_back"] for r in recs] == [True, True, False]  # the image coded first cannot borrow
    for rec, o in zip(recs, out):
        assert torch.equal(o, reconstruct(codec, rec["latents"]))
    for rec in recs[:2]:  # net bits = information content - returned bits (up to ANS word granularity)
        assert rec["returned_bits"] > 0
        assert abs(rec["bits"] - (rec["information_content"] - rec["returned_bits"])) <= 64
    assert recs[2]["returned_bits"] == 0
    total = sum(r["information_content"] for r in recs) - sum(r["returned_bits"] for r in recs)
    assert abs(8 * len(data) - total) <= 64 + 8 * (5 + 3 * 5 + 14)  # header: 5 + 5 per image + 14


def test_posterior_fit_is_deterministic(codec):
    y_hat = torch.round(torch.randn(1, 8, 4, 4) * 2)
    fit = PosteriorFit(steps=5)
    m1, s1 = fit_posterior(codec, y_hat, fit)
    m2, s2 = fit_posterior(codec, y_hat, fit)
    assert torch.equal(m1, m2) and torch.equal(s1, s2)
    assert all(p.grad is None for p in codec.parameters())  # the codec's gradients stay untouched


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"steps": -1}, ValueError),
        ({"steps": 1.5}, ValueError),
        ({"lr": 0}, ValueError),
        ({"lr": float("nan")}, ValueError),
        ({"lmbda": -1.0}, ValueError),
        ({"schedule": 0.5}, TypeError),
    ],
)
def test_bad_configs(kwargs, error):
    with pytest.raises(error):
        SGAConfig(**kwargs)


def test_bad_calls(codec):
    x = _smooth_image(32, 32, seed=0)
    with pytest.raises(TypeError, match="SGAConfig"):
        encode(codec, x, refine={"steps": 3})
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        encode(codec, x[:2], refine=SGAConfig(steps=1))
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        encode(codec, x * 3, refine=SGAConfig(steps=1))
    with pytest.raises(ValueError, match="empty"):
        encode(codec, [], refine=SGAConfig(steps=1))
    with pytest.raises(ValueError, match="empty"):
        encode(codec, torch.rand(3, 0, 5), refine=SGAConfig(steps=1))
    with pytest.raises(TypeError, match="PosteriorFit"):
        BitsBackConfig(posterior={"steps": 3})
    anonymous = MeanScaleHyperprior(N=8, M=8)
    anonymous.update()
    with pytest.raises(ValueError, match="lmbda"):
        encode(anonymous, x, refine=SGAConfig(steps=1))
