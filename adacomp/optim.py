"""Optimizers that keep error-feedback compression lossless.

AdaComp delivers an element's gradient late and in lumps: an element whose residue is
sent every k steps arrives as one value of about k steps' worth of gradient, with zeros in
between. SGD (with or without momentum) is linear in the gradient, so the sum of its updates
is the same either way, only delayed. Adam is not: its second-moment estimate ``v`` grows
with the square of each lump, so an element sent once every k steps moves about
``lr * (1 - beta1) / sqrt(1 - beta2) / (1 - rho)`` per lump (rho = beta1 / sqrt(beta2)),
about 6 x lr for betas (0.9, 0.95), instead of the k x lr that dense Adam moves over the
same k steps. At AdaComp's ratios (hundreds) the effective learning rate of most weights
collapses (docs/results.md, "GPT with AdamW in bf16").

:class:`FrozenVarianceAdamW` is the remedy of 1-bit Adam (Tang et al., "1-bit Adam:
Communication Efficient Large-Scale Training with Adam's Convergence Speed", ICML 2021,
section 3): train with exact gradients for a warm-up, then freeze ``v``. After the freeze
each step is ``m / sqrt(v_frozen)`` with ``m`` a linear filter of the gradients, so a lumped,
delayed gradient moves the weights as far as the dense gradients it stands for.
"""

from __future__ import annotations

import math

import torch

__all__ = ["FrozenVarianceAdamW"]


class FrozenVarianceAdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov and Hutter, ICLR 2019) whose second moment stops updating after
    ``freeze_step`` steps (1-bit Adam, Tang et al., ICML 2021, section 3).

    Steps ``1 .. freeze_step`` are exactly :class:`torch.optim.AdamW` (``amsgrad=False``,
    ``maximize=False``). From step ``freeze_step + 1`` on, ``exp_avg_sq`` and its bias
    correction stay as they were at ``freeze_step``; the first moment, the decoupled weight
    decay and the learning rate go on as in AdamW.

    Use it with gradient compression that starts after the freeze: the warm-up steps must
    see the exact (dense) gradients, since ``v`` is estimated from them. With
    :class:`adacomp.AdaCompState` (or the Horovod / mpi4py integrations) pass
    ``start_iter=freeze_step``.

    Args:
        params: parameters or parameter groups, as for :class:`torch.optim.AdamW`.
        lr: learning rate (float > 0).
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: added to ``sqrt(v_hat)`` (float >= 0).
        weight_decay: decoupled weight decay (float >= 0).
        freeze_step: the number of steps whose gradients update ``v`` (int >= 1; per group).

    Raises:
        ValueError: a hyperparameter out of range; at ``step()``, a sparse gradient.

    State per parameter: ``step`` (int), ``exp_avg`` and ``exp_avg_sq`` (like the
    parameter), so checkpoints of this optimizer load into :class:`torch.optim.AdamW` and
    back (``freeze_step`` is a group hyperparameter). After the freeze the optimizer also
    keeps ``sqrt(v_hat) + eps`` per parameter (one more parameter-sized tensor, not saved):
    a step then costs no square root.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, freeze_step: int = 100):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must each be in [0, 1), got {tuple(betas)}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if int(freeze_step) != freeze_step or freeze_step < 1:
            raise ValueError(f"freeze_step must be an int >= 1 (the dense warm-up steps that "
                             f"estimate the second moment), got {freeze_step!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, freeze_step=int(freeze_step)))
        # After the freeze, sqrt(v_hat) + eps per parameter, computed once (not saved: it is
        # recomputed from the state). Besides the arithmetic it saves, PyTorch's CPU sqrt
        # takes about 5x longer on zeros, and v is zero wherever a compressor never sent.
        self._frozen: dict = {}

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step; ``v`` is updated only while ``step <= freeze_step``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd, freeze = group["lr"], group["eps"], group["weight_decay"], group["freeze_step"]
            by_step: dict[int, list] = {}  # parameters at the same step go through foreach ops together
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise ValueError("FrozenVarianceAdamW does not take sparse gradients; use "
                                     "a dense embedding (sparse=False)")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                t = int(state["step"]) + 1  # AdamW checkpoints hold it as a tensor
                state["step"] = t
                by_step.setdefault(t, []).append((p, g, state["exp_avg"], state["exp_avg_sq"]))
            for t, items in by_step.items():
                ps, gs, ms, vs = (list(x) for x in zip(*items))
                if wd:
                    torch._foreach_mul_(ps, 1.0 - lr * wd)
                torch._foreach_lerp_(ms, gs, 1.0 - beta1)
                if t <= freeze:
                    torch._foreach_mul_(vs, beta2)
                    torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
                bias1 = 1.0 - beta1 ** t
                bias2 = 1.0 - beta2 ** min(t, freeze)
                if t <= freeze:
                    denom = self._denom(vs, bias2, eps)
                else:  # v is frozen: so is the denominator, computed once
                    key = (bias2, eps)
                    cached = [self._frozen.get(p) for p in ps]
                    if any(c is None or c[0] != key or c[1] is not v for c, v in zip(cached, vs)):
                        denom = self._denom(vs, bias2, eps)
                        for p, v, d in zip(ps, vs, denom):
                            self._frozen[p] = (key, v, d)
                    else:
                        denom = [c[2] for c in cached]
                torch._foreach_addcdiv_(ps, ms, denom, value=-lr / bias1)
        return loss

    @staticmethod
    def _denom(vs, bias2, eps):
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, math.sqrt(bias2))
        torch._foreach_add_(denom, eps)
        return denom

    def load_state_dict(self, state_dict):
        self._frozen.clear()
        super().load_state_dict(state_dict)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._frozen = {}
