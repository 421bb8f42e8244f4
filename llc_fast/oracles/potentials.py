"""Potentials whose tempered posterior expectation E[nβ·K] is known exactly or by accurate quadrature.

Target density throughout: p(w) ∝ exp(−nβ·K(w) − γ/2·‖w‖²), with K(0) = 0 at the centre w* = 0, so
E_p[nβ·K] is what an LLC sampler's estimate λ̂ = nβ·(E[L] − L(w*)) should converge to. Where the text
writes t it means nβ.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike

from llc_fast.oracles.dln import as_int

# Relative mass neglected at each end of a quadrature range: exp(-40) ≈ 4e-18.
_TAIL_LOG = 40.0
# Step in s = log|w|. The integrands are entire in s and decay at both ends, so the trapezoid rule
# converges geometrically; its relative error is about exp(-π²/(2·k·step)): 1e-18 for k = 3, 5e-11 for k = 5.
_LOG_STEP = 0.04


def quadratic_posterior_expectation(h: ArrayLike, nbeta: float, gamma: float) -> float:
    """E[nβ·K] for K(w) = ½·Σ_j h_j·w_j² under the exact posterior: Σ_j nβ·h_j / (2·(nβ·h_j + γ)).

    Args:
        h: Hessian eigenvalues, shape (d,), each >= 0.
        nbeta: inverse temperature times sample size, > 0.
        gamma: localization strength, >= 0 (the posterior must be proper: nβ·h_j + γ > 0 for all j).
    """
    h, a = _quadratic_terms(h, nbeta, gamma)
    return float(np.sum(nbeta * h / (2.0 * a)))


def quadratic_sgld_expectation(h: ArrayLike, nbeta: float, gamma: float, lr: float,
                               preconditioner: ArrayLike | None = None) -> float:
    """E[nβ·K] under the stationary law of the discretised SGLD chain on K(w) = ½·Σ_j h_j·w_j².

    The chain is w ← w − (ε_j/2)·(nβ·h_j·w + γ·w) + √ε_j·ξ with ε_j = lr·G_j. Each coordinate is an AR(1)
    process with stationary variance 1/(a_j·(1 − ε_j·a_j/4)), a_j = nβ·h_j + γ, hence
    E[nβ·K] = Σ_j nβ·h_j / (2·a_j·(1 − ε_j·a_j/4)).

    Args:
        h: Hessian eigenvalues, shape (d,), each >= 0.
        nbeta, gamma: as in `quadratic_posterior_expectation`.
        lr: step size ε, > 0.
        preconditioner: diagonal preconditioner G (> 0), broadcastable against h; None means G = 1.

    Raises:
        ValueError: if some ε_j·a_j >= 4, where the chain has no stationary law (it diverges).
    """
    h, a, eps_a = _sgld_terms(h, nbeta, gamma, lr, preconditioner)
    return float(np.sum(nbeta * h / (2.0 * a * (1.0 - eps_a / 4.0))))


def quadratic_sgld_transient_expectation(h: ArrayLike, nbeta: float, gamma: float, lr: float, steps: ArrayLike,
                                         preconditioner: ArrayLike | None = None) -> float:
    """The mean over the steps t in ``steps`` of E[nβ·K(w_t)] for the discretised SGLD chain of
    `quadratic_sgld_expectation` started at w_0 = 0 (= w*): what an estimate from the draws at those steps
    converges to over many chains, transient included.

    From w_0 = 0 each coordinate's variance after t steps is v_j·(1 − ρ_j^(2t)), with ρ_j = 1 − ε_j·a_j/2 and
    v_j = 1/(a_j·(1 − ε_j·a_j/4)) the stationary variance, so the answer is
    Σ_j nβ·h_j·v_j/2 · mean_t (1 − ρ_j^(2t)); 1 − ρ^(2t) is computed as −expm1(t·log1p(ρ² − 1)), exact to
    rounding also when ε·a is tiny. As the steps grow it tends to `quadratic_sgld_expectation`.

    Args:
        h, nbeta, gamma, lr, preconditioner: as in `quadratic_sgld_expectation`.
        steps: the step indices t >= 0 of the draws (the update count since w*), e.g. burn-in B and one draw
            per step: B, B+1, ..., B+D−1.

    Raises:
        ValueError: if some ε_j·a_j >= 4 (unstable), or a step is negative or not an integer.
    """
    h, a, eps_a = _sgld_terms(h, nbeta, gamma, lr, preconditioner)
    t = np.atleast_1d(np.asarray(steps, dtype=np.float64))
    if t.size == 0 or np.any(t < 0) or np.any(t != np.round(t)):
        raise ValueError(f"steps must be a non-empty list of integers >= 0 (update counts since w*), got {steps!r}")
    rho2_minus_1 = eps_a * (eps_a / 4.0 - 1.0)  # ρ² − 1, in (−1, 0]
    with np.errstate(invalid="ignore", divide="ignore"):  # ρ = 0 (ε·a = 2): log1p(−1) = −inf, and 0·(−inf)
        relaxed = -np.expm1(t[None, :] * np.log1p(rho2_minus_1)[:, None])
    relaxed = np.where(t[None, :] == 0, 0.0, relaxed).mean(axis=1)
    return float(np.sum(nbeta * h * relaxed / (2.0 * a * (1.0 - eps_a / 4.0))))


def quadratic_sgnht_expectation(h: ArrayLike, nbeta: float, gamma: float, lr: float,
                                diffusion: float) -> tuple[float, float]:
    """(E[nβ·K], the thermostat z*) under the stationary law of the discretised SGNHT chain on K = ½·Σ_j h_j·w_j²
    (``llc_fast.kernels.reference.sgnht_step`` with exact gradients, every coordinate j one element of a row).

    With the thermostat held at z, coordinate j is the linear chain p ← (1−z)(p − lr·a_j·w) + √(2·A·lr)·ξ,
    w ← w + p (a_j = nβ·h_j + γ), whose stationary covariance solves a 2×2 Lyapunov equation; the thermostat
    settles where the mean kinetic energy over the coordinates is lr (its update z ← z + mean p² − lr has zero
    mean), found by bisection. Its fluctuation about z* is O(1/√count) and neglected. The positions run hotter
    than the momenta by about 1/(1 − z*/2): an O(A) bias that does not vanish as lr → 0 at fixed A.
    """
    h, a = _quadratic_terms(h, nbeta, gamma)
    if not (lr > 0 and diffusion > 0):
        raise ValueError(f"need lr > 0 and diffusion > 0, got lr={lr!r}, diffusion={diffusion!r}")

    def moments(z: float) -> tuple[np.ndarray, np.ndarray]:
        out = []
        for theta in lr * a:
            m = np.array([[1 - (1 - z) * theta, 1 - z], [-(1 - z) * theta, 1 - z]])
            if np.max(np.abs(np.linalg.eigvals(m))) >= 1:
                return np.full_like(a, np.inf), np.full_like(a, np.inf)
            q = 2 * diffusion * lr * np.ones(4)
            out.append(np.linalg.solve(np.eye(4) - np.kron(m, m), q).reshape(2, 2))
        return np.array([s[0, 0] for s in out]), np.array([s[1, 1] for s in out])

    lo, hi = 0.0, 1.0
    for _ in range(200):
        z = 0.5 * (lo + hi)
        lo, hi = (z, hi) if np.mean(moments(z)[1]) > lr else (lo, z)
    z = 0.5 * (lo + hi)
    return float(np.sum(nbeta * h * moments(z)[0] / 2)), z


def _sgld_terms(h: ArrayLike, nbeta: float, gamma: float, lr: float,
                preconditioner: ArrayLike | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(h, a = nβ·h + γ, ε·a) with ε = lr·G per coordinate, every argument checked and the chain stable."""
    h, a = _quadratic_terms(h, nbeta, gamma)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    g = np.ones_like(h) if preconditioner is None else np.asarray(preconditioner, dtype=np.float64)
    h, a, g = np.broadcast_arrays(h, a, g)
    if np.any(g <= 0):
        raise ValueError("preconditioner entries must all be > 0")
    eps_a = lr * g * a
    if np.any(eps_a >= 4.0):
        j = int(np.argmax(eps_a))
        raise ValueError(f"unstable chain: ε_j·(nβ·h_j + γ) = {eps_a[j]:.6g} >= 4 at j = {j}; "
                         f"pass lr < {4.0 / (g[j] * a[j]):.6g}")
    return h, a, eps_a


def _quadratic_terms(h: ArrayLike, nbeta: float, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    h = np.atleast_1d(np.asarray(h, dtype=np.float64))
    if np.any(h < 0):
        raise ValueError("h (the Hessian eigenvalues) must all be >= 0")
    if not nbeta > 0 or not gamma >= 0:
        raise ValueError(f"need nbeta > 0 and gamma >= 0, got nbeta={nbeta!r}, gamma={gamma!r}")
    a = nbeta * h + gamma
    if np.any(a == 0):
        raise ValueError("improper posterior: a direction with h_j = 0 needs gamma > 0")
    return h, a


def sum_of_powers_expectation(k: ArrayLike) -> float:
    """E[nβ·K] = Σ_j 1/(2·k_j) for K(w) = Σ_j c_j·w_j^(2k_j) with a flat prior (γ = 0).

    Exact for every nβ > 0 and every c_j > 0 (each coordinate's density is a generalized Gaussian).
    k: powers, shape (d,), each > 0.
    """
    k = np.atleast_1d(np.asarray(k, dtype=np.float64))
    if np.any(k <= 0):
        raise ValueError(f"every power k_j must be > 0, got {k!r}")
    return float(np.sum(0.5 / k))


def one_variable_expectation(k: float, t: float, gamma: float = 1.0) -> float:
    """E[t·w^(2k)] under p(w) ∝ exp(−t·w^(2k) − γ/2·w²), by quadrature in s = log|w| (float64).

    Args:
        k: power, > 0 (K = |w|^(2k)).
        t: nβ, > 0.
        gamma: localization strength, >= 0.

    Relative error below 1e-10 for k <= 5. With γ = 0 the answer is exactly 1/(2k) for every t.
    """
    if not k > 0 or not t > 0 or not gamma >= 0:
        raise ValueError(f"need k > 0, t > 0 and gamma >= 0, got k={k!r}, t={t!r}, gamma={gamma!r}")
    # Below the density's scale it is flat, so the mass under |w| is ~|w|: start exp(-40) below the scale.
    # Above, stop once either term of the exponent exceeds 40.
    log_scale = -np.log(t) / (2.0 * k)
    log_end = np.log(_TAIL_LOG / t) / (2.0 * k)
    if gamma > 0:
        log_scale = min(log_scale, -0.5 * np.log(gamma))
        log_end = min(log_end, 0.5 * np.log(2.0 * _TAIL_LOG / gamma))
    s = _log_grid(log_scale - _TAIL_LOG - 1.0, log_end + 1.0)
    log_tk = np.log(t) + 2.0 * k * s
    tk = np.exp(np.minimum(log_tk, 700.0))  # clipped values carry weight exp(-e^700) = 0 anyway
    weight = np.exp(s - tk - 0.5 * gamma * np.exp(2.0 * s))  # density times dw/ds = w
    return float(np.sum(tk * weight) / np.sum(weight))


def product_expectation(k1: float, k2: float, t: float, gamma: float = 1.0) -> float:
    """E[t·w1^(2k1)·w2^(2k2)] under p(w) ∝ exp(−t·w1^(2k1)·w2^(2k2) − γ/2·(w1² + w2²)), by 2-D quadrature.

    The mass concentrates along the axes at distance ~t^(−1/(2k)), so the grid is uniform in
    s = log|w| for both coordinates (about 1300² points, ~30 ms). Relative error below 1e-10 for k <= 5.

    Args:
        k1, k2: powers, > 0.
        t: nβ, > 0.
        gamma: localization strength, > 0 (with γ = 0 the density is not normalizable).
    """
    if not k1 > 0 or not k2 > 0 or not t > 0 or not gamma > 0:
        raise ValueError(f"need k1, k2, t > 0 and gamma > 0 (γ = 0 is not normalizable), got "
                         f"k1={k1!r}, k2={k2!r}, t={t!r}, gamma={gamma!r}")
    # Z is at least ~t^(-1/(2k))·min(1, γ^(-1/2)) (a box at the origin), and the mass with |w_i| < δ is
    # at most ~δ, so start exp(-40) below that. Only the prior bounds a coordinate from above.
    log_scale = -np.log(t) / (2.0 * min(k1, k2)) + min(0.0, -0.5 * np.log(gamma))
    s = _log_grid(log_scale - _TAIL_LOG - 1.0, 0.5 * np.log(2.0 * _TAIL_LOG / gamma) + 1.0)
    gauss = np.exp(s - 0.5 * gamma * np.exp(2.0 * s))  # per-axis prior times dw/ds
    log_tk = np.log(t) + 2.0 * k1 * s[:, None] + 2.0 * k2 * s[None, :]
    tk = np.exp(np.minimum(log_tk, 700.0))
    weight = np.exp(-tk) * gauss[:, None] * gauss[None, :]
    return float(np.sum(tk * weight) / np.sum(weight))


def _log_grid(lo: float, hi: float) -> np.ndarray:
    """Uniform abscissae in s = log|w| from lo to hi (inclusive) with step `_LOG_STEP`."""
    return np.arange(lo, hi + _LOG_STEP, _LOG_STEP)


def normal_crossing_coefficient(k: Sequence[int], h: Sequence[int] | None = None) -> tuple[Fraction, int]:
    """(λ, m) for K(w) = Π_j w_j^(2k_j) with prior ∝ Π_j |w_j|^(h_j).

    λ = min_j (h_j + 1)/(2k_j) over the j with k_j > 0, and m = how many j attain the minimum.

    Args:
        k: powers, non-negative ints, at least one > 0 (k_j = 0 means w_j does not appear in K).
        h: prior exponents, non-negative ints, same length as k; None means all 0 (a smooth positive prior).
    """
    k = [as_int(x, f"k[{j}]") for j, x in enumerate(k)]
    h = [0] * len(k) if h is None else [as_int(x, f"h[{j}]") for j, x in enumerate(h)]
    if len(h) != len(k):
        raise ValueError(f"k and h must have the same length, got {len(k)} and {len(h)}")
    if any(x < 0 for x in k) or not any(x > 0 for x in k) or any(x < 0 for x in h):
        raise ValueError(f"need non-negative ints with at least one k_j > 0, got k={k}, h={h}")
    ratios = [Fraction(hj + 1, 2 * kj) for kj, hj in zip(k, h) if kj > 0]
    lam = min(ratios)
    return lam, ratios.count(lam)


__all__ = ["quadratic_posterior_expectation", "quadratic_sgld_expectation", "quadratic_sgld_transient_expectation",
           "sum_of_powers_expectation", "one_variable_expectation", "product_expectation", "normal_crossing_coefficient"]
