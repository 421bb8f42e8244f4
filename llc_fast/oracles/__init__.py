"""Exact answers an LLC sampler must reproduce, and the models and data to reproduce them on.

Learning coefficients (exact rationals):
* `dln_learning_coefficient` — deep linear networks of any depth, Aoyagi (2024), Neural Networks
  172:106132, Theorem 1. Checks λ̂ on DLN teachers built by `make_dln` / `make_random_rank_dln`.
* `reduced_rank_regression_coefficient` — two-layer linear networks, Aoyagi & Watanabe (2005), Neural
  Networks 18(7); an independent derivation that cross-checks Theorem 1.
* `normal_crossing_coefficient` — K = Π w_j^(2k_j) with prior Π |w_j|^(h_j): λ = min (h_j+1)/(2k_j).

Finite-temperature expectations E[nβ·K] (closed forms or float64 quadrature), which test the sampler's
conventions (ε/2 on the drift, noise variance ε, the localization term γ) rather than an asymptotic limit:
* `quadratic_posterior_expectation` — exact posterior of a quadratic potential.
* `quadratic_sgld_expectation` — stationary law of the discretised SGLD chain on that quadratic (exact,
  including the O(ε) bias and a diagonal preconditioner).
* `quadratic_sgld_transient_expectation` — the same chain started at w*, averaged over given steps: what a
  finite run's draws converge to, transient included.
* `sum_of_powers_expectation` — Σ c_j w_j^(2k_j) with a flat prior: Σ 1/(2k_j) at every temperature.
* `one_variable_expectation`, `product_expectation` — w^(2k) and w1^(2k1)·w2^(2k2) with a Gaussian
  localizer, by quadrature.

Builders (torch): `make_dln`, `make_random_rank_dln` (the Lau et al. 2025 protocol), `dln_dataset`,
`dln_hessian_eigenvalues` (the exact Hessian spectrum of a DLN teacher's mean squared error, for the quadratic
oracles), `mse_loss` (the `loss_fn(model, batch)` convention) and `make_regression_example` (a regular model, λ = 1).
"""

from llc_fast.oracles.builders import (
    dln_dataset,
    dln_hessian_eigenvalues,
    make_dln,
    make_random_rank_dln,
    make_regression_example,
    mse_loss,
)
from llc_fast.oracles.dln import DLNCoefficient, dln_learning_coefficient, reduced_rank_regression_coefficient
from llc_fast.oracles.potentials import (
    normal_crossing_coefficient,
    one_variable_expectation,
    product_expectation,
    quadratic_posterior_expectation,
    quadratic_sgld_expectation,
    quadratic_sgld_transient_expectation,
    quadratic_sgnht_expectation,
    sum_of_powers_expectation,
)

__all__ = [
    "DLNCoefficient",
    "dln_learning_coefficient",
    "reduced_rank_regression_coefficient",
    "normal_crossing_coefficient",
    "quadratic_posterior_expectation",
    "quadratic_sgld_expectation",
    "quadratic_sgld_transient_expectation",
    "quadratic_sgnht_expectation",
    "sum_of_powers_expectation",
    "one_variable_expectation",
    "product_expectation",
    "make_dln",
    "make_random_rank_dln",
    "dln_dataset",
    "dln_hessian_eigenvalues",
    "mse_loss",
    "make_regression_example",
]
