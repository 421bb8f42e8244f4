"""MALA acceptance of an SGLD step: how far a step is from what an exact Metropolis-adjusted
Langevin sampler would accept (oracles: Lau et al.; practitioners aim for about 0.9).

    U(w) = nbeta*L_batch(w) + gamma/2*|w - w*|^2 + wd/2*|w|^2,   g = grad U
    q(w'|w) = N(w - (lr/2)*G*g(w), lr*G)   per coordinate
    A = min(1, exp(U(w) - U(w') + log q(w|w') - log q(w'|w)))
"""
from __future__ import annotations

import torch


def mala_log_acceptance(
    w: torch.Tensor,
    w_new: torch.Tensor,
    grad_u: torch.Tensor,
    grad_u_new: torch.Tensor,
    u: torch.Tensor,
    u_new: torch.Tensor,
    lr: torch.Tensor | float,
    precond: torch.Tensor | float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """log A for each chain, float64 [C].

    w, w_new: [C, N] states before and after the step; grad_u, grad_u_new: [C, N] gradients of U
    at them (same batch); u, u_new: [C] potentials; lr: scalar or [C]; precond: the diagonal G
    used by the step, scalar or [C, N]; mask: [N] 0/1, coordinates with 0 (which never move) are
    left out. Computed in float64.
    """
    f64 = torch.float64
    w, w_new, grad_u, grad_u_new = (t.to(f64) for t in (w, w_new, grad_u, grad_u_new))
    lr = torch.as_tensor(lr, dtype=f64, device=w.device).reshape(-1, 1)
    step = lr * torch.as_tensor(precond, dtype=f64, device=w.device)  # lr * G, broadcast to [C, N]
    forward = w_new - w + 0.5 * step * grad_u
    backward = w - w_new + 0.5 * step * grad_u_new
    log_ratio = (forward**2 - backward**2) / (2 * step)  # log q(w|w') - log q(w'|w), per coordinate
    if mask is not None:
        log_ratio = log_ratio * mask.to(f64)
    log_a = u.to(f64) - u_new.to(f64) + log_ratio.sum(dim=1)
    return torch.clamp(log_a, max=0.0)


def potential_and_gradient(loss: torch.Tensor, grad_loss: torch.Tensor, w: torch.Tensor, w_star: torch.Tensor,
                           nbeta: torch.Tensor, gamma: torch.Tensor, weight_decay: float):
    """U [C] and grad U [C, N] of the localized tempered target from the minibatch loss and its gradient."""
    f64 = torch.float64
    w, w_star, grad_loss = w.to(f64), w_star.to(f64), grad_loss.to(f64)
    nbeta, gamma = nbeta.to(f64).reshape(-1, 1), gamma.to(f64).reshape(-1, 1)
    diff = w - w_star
    u = nbeta[:, 0] * loss.to(f64) + 0.5 * gamma[:, 0] * (diff**2).sum(1)
    g = nbeta * grad_loss + gamma * diff
    if weight_decay:
        u = u + 0.5 * weight_decay * (w**2).sum(1)
        g = g + weight_decay * w
    return u, g
