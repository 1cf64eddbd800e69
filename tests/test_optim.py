"""adacomp.optim.FrozenVarianceAdamW: AdamW up to the freeze, then a second moment that no
longer moves, so that lumped, delayed gradients (what error feedback delivers) move the
weights as far as the dense gradients they stand for."""

import copy

import pytest
import torch

from adacomp.optim import FrozenVarianceAdamW

HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(7, 5, generator=g)),
            torch.nn.Parameter(torch.randn(5, generator=g))]


def _grads(step, params):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


def test_equals_adamw_up_to_the_freeze_and_freezes_v_after():
    a, b = _params(), _params()
    ref = torch.optim.AdamW(a, foreach=False, **HP)
    ours = FrozenVarianceAdamW(b, freeze_step=4, **HP)
    grads = [_grads(s, a) for s in range(4)]
    _run(ref, a, grads)
    _run(ours, b, grads)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
        assert torch.equal(ref.state[pa]["exp_avg_sq"], ours.state[pb]["exp_avg_sq"])
    frozen = [ours.state[p]["exp_avg_sq"].clone() for p in b]
    _run(ref, a, [_grads(9, a)])
    _run(ours, b, [_grads(9, b)])
    for pa, pb, v in zip(a, b, frozen):
        assert torch.equal(ours.state[pb]["exp_avg_sq"], v)
        assert not torch.equal(ref.state[pa]["exp_avg_sq"], v)  # AdamW's moves on
        assert not torch.equal(pa, pb)


def _displacement(opt_cls, lump: bool, k=20, tail=200, **kw):
    """Weights moved by ``k`` steps of a constant gradient g after a 100-step warm-up (which
    also lets AdamW's first-moment bias correction reach 1 - 0.9**100): either
    g every step (dense) or k * g once, then zeros (what error feedback delivers), followed
    by ``tail`` zero-gradient steps so that momentum has played out."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = opt_cls([p], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, **kw)
    g = torch.tensor([0.5, -1.0, 2.0])
    for _ in range(100):  # the dense warm-up that estimates v
        p.grad = g.clone()
        opt.step()
    start = p.detach().clone()
    for i in range(k + tail):
        if lump:
            p.grad = k * g if i == 0 else torch.zeros_like(g)
        else:
            p.grad = g.clone() if i < k else torch.zeros_like(g)
        opt.step()
    return p.detach() - start


def test_lumped_gradients_move_as_far_as_dense_ones_after_the_freeze():
    dense = _displacement(FrozenVarianceAdamW, lump=False, freeze_step=100)
    lumped = _displacement(FrozenVarianceAdamW, lump=True, freeze_step=100)
    torch.testing.assert_close(lumped, dense, rtol=1e-4, atol=1e-7)
    # Plain AdamW, the reason for the freeze: the same lump moves the weights far less.
    adam_dense = _displacement(torch.optim.AdamW, lump=False)
    adam_lumped = _displacement(torch.optim.AdamW, lump=True)
    assert (adam_lumped.abs() < 0.5 * adam_dense.abs()).all(), (adam_lumped, adam_dense)


def test_checkpoint_round_trip_with_torch_adamw():
    a = _params()
    ours = FrozenVarianceAdamW(a, freeze_step=3, **HP)
    _run(ours, a, [_grads(s, a) for s in range(5)])
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    adamw = torch.optim.AdamW(b, **HP)
    adamw.load_state_dict(copy.deepcopy(ours.state_dict()))
    assert int(adamw.state[b[0]]["step"]) == 5
    c = [torch.nn.Parameter(p.detach().clone()) for p in a]
    back = FrozenVarianceAdamW(c, freeze_step=3, **HP)
    back.load_state_dict(copy.deepcopy(adamw.state_dict()))  # a tensor step from AdamW
    _run(back, c, [_grads(7, c)])
    _run(ours, a, [_grads(7, a)])
    for pa, pc in zip(a, c):
        assert torch.equal(pa, pc)
    assert back.state[c[0]]["step"] == 6


@pytest.mark.parametrize("kw, match", [(dict(freeze_step=0), "freeze_step"),
                                       (dict(freeze_step=2.5), "freeze_step"), (dict(lr=0.0), "lr"),
                                       (dict(betas=(0.9, 1.0)), "betas"),
                                       (dict(eps=-1.0), "eps"), (dict(weight_decay=-0.1), "weight_decay")])
def test_bad_hyperparameters_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        FrozenVarianceAdamW(_params(), **kw)


def test_sparse_gradient_raises():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        FrozenVarianceAdamW(emb.parameters(), freeze_step=1).step()


def test_frozen_denominator_is_computed_once_and_changes_nothing():
    """After the freeze sqrt(v_hat) + eps is kept per parameter instead of recomputed: the
    steps are bit-identical to recomputing it every step (a fresh cache each step), it is
    rebuilt after load_state_dict, and it is not part of the saved state."""
    a, b = _params(), _params()
    cached = FrozenVarianceAdamW(a, freeze_step=3, **HP)
    fresh = FrozenVarianceAdamW(b, freeze_step=3, **HP)
    grads = [_grads(s, a) for s in range(9)]
    for gs in grads:
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = g.clone(), g.clone()
        cached.step()
        fresh._frozen.clear()
        fresh.step()
        for p, q in zip(a, b):
            assert torch.equal(p, q)
    assert len(cached._frozen) == len(a)
    denom = [cached._frozen[p][2] for p in a]
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in cached.state_dict()["state"].values())
    state = copy.deepcopy(cached.state_dict())
    cached.load_state_dict(state)
    assert not cached._frozen
    for p, g in zip(a, _grads(50, a)):
        p.grad = g
    cached.step()
    for p, d in zip(a, denom):
        assert torch.equal(cached._frozen[p][2], d)
