"""What the loop measures besides the losses: the MALA acceptance of a step, and whether a stopping target's
MCSE is met (``llc_fast.diagnostics`` holds the formulas)."""
from __future__ import annotations

import numpy as np
import torch

from ..diagnostics.convergence import chain_diagnostics
from ..diagnostics.mala import mala_log_acceptance, potential_and_gradient
from ..kernels.update_spec import RowMasks


def mala_acceptance(engine, B: int, batches: list, before: tuple, state, stat, update, counters,
                    step_args: dict) -> torch.Tensor:
    """log MALA acceptance [B] of the step the first B rows just took (one more forward/backward on the same
    batches). before: (w [B, N], grad [B, N], losses [B]) before the step; update: the ``SamplerSettings``."""
    w_old, grad_old, loss_old = before
    nbeta, gamma = step_args["nbeta"], step_args["gamma"]
    loss_new, grad_new = engine.loss_and_grad(B, batches)
    if grad_new is None:
        grad_new = state.grad[:B]
    u_old, g_old = potential_and_gradient(loss_old, grad_old, w_old, state.w_star, nbeta, gamma, update.weight_decay)
    u_new, g_new = potential_and_gradient(loss_new, grad_new, state.w[:B], state.w_star, nbeta, gamma,
                                          update.weight_decay)
    precond = 1.0
    if update.preconditioned:
        scale = update.statistic_scale(counters.stat_step)
        precond = 1.0 / (torch.sqrt(stat.to(torch.float64) * scale) + update.rmsprop_eps)
    mask = step_args["mask"]
    if isinstance(mask, RowMasks):
        mask = mask.dense(state.w.shape[1])
    return mala_log_acceptance(w_old, state.w[:B], g_old, g_new, u_old, u_new, step_args["lr"], precond, mask)


def target_met(y: np.ndarray, component: np.ndarray, control) -> bool:
    """Whether lambda_hat's MCSE meets ``control``'s target (a ``RunControl``) for every component.

    y: [R, D] nbeta * (draw loss - L(w*)) of every row; component: int [R], each row's component."""
    c = control
    for k in np.unique(component):
        yk = y[component == k]
        yk = yk[np.isfinite(yk).all(axis=1)]
        if yk.shape[0] == 0:
            return False
        target = c.target_stderr if c.target_stderr is not None else c.target_rel_error * abs(float(yk.mean()))
        if not chain_diagnostics(yk)["mcse"] <= target:
            return False
    return True
