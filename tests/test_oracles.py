"""Tests of llc_fast.oracles against published exact values.

DLN values: Aoyagi (2024) Theorem 1 worked by hand and cross-checked against Aoyagi & Watanabe (2005).
Potential values: closed forms and independent quadrature, to the digits printed in the project's notes.
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from llc_fast.oracles import (
    DLNCoefficient,
    dln_dataset,
    dln_hessian_eigenvalues,
    dln_learning_coefficient,
    make_dln,
    make_random_rank_dln,
    make_regression_example,
    mse_loss,
    normal_crossing_coefficient,
    one_variable_expectation,
    product_expectation,
    quadratic_posterior_expectation,
    quadratic_sgld_expectation,
    quadratic_sgld_transient_expectation,
    reduced_rank_regression_coefficient,
    sum_of_powers_expectation,
)

# (widths, rank, λ, m)
DLN_WORKED_VALUES = [
    ((5, 3, 5), 0, Fraction(13, 2), 2),
    ((5, 4, 5), 0, Fraction(8), 1),
    ((4, 3, 8), 0, Fraction(6), 1),
    ((3, 8, 4), 0, Fraction(6), 1),
    ((2, 2, 2), 1, Fraction(2), 2),
    ((5, 5, 5), 1, Fraction(21, 2), 1),  # the pitfall: r(H+K-r)/2 would give 9/2
    ((5, 5, 5), 2, Fraction(23, 2), 2),
    ((5, 5, 5), 3, Fraction(12), 1),
    ((5, 1, 5), 1, Fraction(9, 2), 1),
    ((10, 5, 10), 2, Fraction(29), 2),
    ((10, 10, 10), 0, Fraction(75, 2), 1),
    ((10, 10, 10), 5, Fraction(47), 2),
    ((10, 10, 10), 10, Fraction(50), 1),
    ((100, 100, 100, 100), 0, Fraction(6667, 2), 3),
    ((100, 100, 100, 100), 50, Fraction(9167, 2), 3),
    ((1000,) * 11, 0, Fraction(275_000), 1),
    ((1000,) * 11, 500, Fraction(443_750), 1),
    ((455, 395, 125, 350, 277, 261, 297), 28, Fraction(41093, 2), 3),
    ((41, 9, 21, 12), 7, Fraction(166), 1),
    ((812, 556, 372), 369, Fraction(150_648), 1),
    ((1710, 709, 1150, 562, 545, 552, 1830, 1608, 518, 1280), 221, Fraction(681077, 2), 1),
    ((10, 10, 10, 10), 3, Fraction(42), 3),  # the formula value (the local value at full-rank ends is 50)
]


@pytest.mark.parametrize("widths, rank, llc, multiplicity", DLN_WORKED_VALUES)
def test_dln_worked_values(widths, rank, llc, multiplicity):
    result = dln_learning_coefficient(widths, rank)
    assert result == DLNCoefficient(llc, multiplicity)
    assert isinstance(result.llc, Fraction)
    assert dln_learning_coefficient(widths[::-1], rank) == result  # orientation does not matter


def test_dln_agrees_with_reduced_rank_regression_on_full_grid():
    count = 0
    for m in range(1, 13):
        for h in range(1, 13):
            for n in range(1, 13):
                for r in range(min(m, h, n) + 1):
                    expected = reduced_rank_regression_coefficient(m, h, n, r)
                    assert dln_learning_coefficient((m, h, n), r).llc == expected, (m, h, n, r)
                    count += 1
    assert count == 7812


@pytest.mark.parametrize("widths, rank", [((3, 4), 0), ((3, 4), 2), ((7, 7), 7), ((1, 1), 1), ((1000, 11), 5)])
def test_single_layer_is_regular(widths, rank):
    assert dln_learning_coefficient(widths, rank) == (Fraction(widths[0] * widths[1], 2), 1)


@pytest.mark.parametrize("widths, rank", [
    ((5,), 0),           # one width only
    ((), 0),
    ((5, 0, 5), 0),      # non-positive width
    ((5, -1, 5), 0),
    ((5, 2.5, 5), 1),    # non-integer width
    ((5, 3, 5), 4),      # rank above the narrowest width
    ((5, 3, 5), -1),
    ((5, 3, 5), 1.0),    # non-integer rank
    ((5, 3, 5), True),
    (5, 0),              # not a sequence
])
def test_dln_bad_inputs_raise(widths, rank):
    with pytest.raises(ValueError):
        dln_learning_coefficient(widths, rank)


def test_reduced_rank_regression_bad_inputs_raise():
    with pytest.raises(ValueError, match="rank"):
        reduced_rank_regression_coefficient(3, 2, 4, 3)
    with pytest.raises(ValueError):
        reduced_rank_regression_coefficient(0, 2, 4, 0)


# --- potentials -----------------------------------------------------------------------------------

def test_quadratic_check_values():
    h, nbeta, gamma = (1.0, 0.2, 3.0), 100.0, 1.0
    assert quadratic_sgld_expectation(h, nbeta, gamma, 0.01) == pytest.approx(3.17834, abs=5e-6)
    assert quadratic_posterior_expectation(h, nbeta, gamma) == pytest.approx(1.46958, abs=5e-6)
    # A preconditioner G is the same as a step lr·G.
    g = [0.5, 2.0, 0.25]
    expected = sum(nbeta * hj / (2 * (nbeta * hj + gamma) * (1 - 0.01 * gj * (nbeta * hj + gamma) / 4))
                   for hj, gj in zip(h, g))
    assert quadratic_sgld_expectation(h, nbeta, gamma, 0.01, preconditioner=g) == pytest.approx(expected)
    # As lr -> 0 the chain's answer tends to the posterior's.
    assert quadratic_sgld_expectation(h, nbeta, gamma, 1e-9) == pytest.approx(1.46958, abs=5e-6)


def test_quadratic_regression_example_value():
    # The regular example of the notes: nβ = 100/ln 100, ε = 0.002, γ = 1 gives 0.9719.
    x = torch.linspace(-1.0, 1.0, 100, dtype=torch.float64)
    hessian = 2 * torch.tensor([[(x * x).mean(), x.mean()], [x.mean(), 1.0]], dtype=torch.float64)
    h = torch.linalg.eigvalsh(hessian).numpy()
    nbeta = 100 / math.log(100)
    assert quadratic_sgld_expectation(h, nbeta, 1.0, 0.002) == pytest.approx(0.9719, abs=5e-5)


def test_quadratic_transient_from_w_star():
    """Started at w* = 0: no variance at step 0, exactly lr·G after one step, the variance recursion
    v_(t+1) = ρ² v_t + ε step by step, and the stationary answer after many steps."""
    h, nbeta, gamma, lr = np.array([1.0, 0.2, 3.0, 0.0]), 100.0, 1.0, 0.01
    assert quadratic_sgld_transient_expectation(h, nbeta, gamma, lr, [0]) == 0.0
    assert quadratic_sgld_transient_expectation(h, nbeta, gamma, lr, [1]) == pytest.approx(
        float(np.sum(nbeta * h * lr / 2)), rel=1e-12)
    g = np.array([0.5, 2.0, 0.25, 1.0])
    eps = lr * g
    rho2 = (1 - eps * (nbeta * h + gamma) / 2) ** 2
    v, per_step = np.zeros_like(h), []
    for _ in range(60):
        per_step.append(float(np.sum(nbeta * h * v / 2)))
        v = rho2 * v + eps
    steps = list(range(7, 60, 3))
    assert quadratic_sgld_transient_expectation(h, nbeta, gamma, lr, steps, preconditioner=g) == pytest.approx(
        np.mean([per_step[t] for t in steps]), rel=1e-12)
    assert quadratic_sgld_transient_expectation(h, nbeta, gamma, lr, [10**7, 10**8]) == pytest.approx(
        quadratic_sgld_expectation(h, nbeta, gamma, lr), rel=1e-12)
    tiny = quadratic_sgld_transient_expectation([1e-6], 1.0, 0.0, 1e-9, [1])  # 1 − ρ² ≈ 1e-15, no cancellation
    assert tiny == pytest.approx(1e-6 * 1e-9 / 2, rel=1e-12)
    assert quadratic_sgld_transient_expectation([1.0], 1.0, 1.0, 1.0, [0, 1, 2]) == pytest.approx(2 / 3 * 0.5)  # ρ = 0
    with pytest.raises(ValueError, match="steps must be"):
        quadratic_sgld_transient_expectation(h, nbeta, gamma, lr, [-1])
    with pytest.raises(ValueError, match="unstable"):
        quadratic_sgld_transient_expectation(h, nbeta, gamma, 0.014, [5])


def test_quadratic_unstable_chain_raises():
    # a_3 = 301, so lr·a_3 >= 4 once lr >= 4/301.
    with pytest.raises(ValueError, match="unstable"):
        quadratic_sgld_expectation((1.0, 0.2, 3.0), 100.0, 1.0, 0.014)
    with pytest.raises(ValueError, match="unstable"):
        quadratic_sgld_expectation((1.0, 0.2, 3.0), 100.0, 1.0, 0.01, preconditioner=2.0)
    with pytest.raises(ValueError):
        quadratic_posterior_expectation((1.0, 0.0), 100.0, 0.0)  # improper along the flat direction


def test_sum_of_powers():
    assert sum_of_powers_expectation([1, 2, 3]) == pytest.approx(0.5 + 0.25 + 1 / 6)
    assert sum_of_powers_expectation([2] * 10**6) == pytest.approx(10**6 / 4)
    with pytest.raises(ValueError):
        sum_of_powers_expectation([1, 0])


ONE_VARIABLE_TABLE = {  # k: E[t·w^(2k)] at t = 10, 1e2, 1e3, 1e4, 1e6 (γ = 1)
    1: [0.47619, 0.49751, 0.49975, 0.49998],
    2: [0.22490, 0.24172, 0.24734, 0.24916, 0.24992],
    3: [0.14378, 0.15562, 0.16144, 0.16422, 0.16614],
}


@pytest.mark.parametrize("k", sorted(ONE_VARIABLE_TABLE))
def test_one_variable_table(k):
    for t, expected in zip([10.0, 1e2, 1e3, 1e4, 1e6], ONE_VARIABLE_TABLE[k]):
        assert round(one_variable_expectation(k, t), 5) == pytest.approx(expected, abs=1e-12), (k, t)


def test_one_variable_exact_cases():
    # k = 1 is a Gaussian of precision 2t + γ, so E[t·w²] = t/(2t + γ).
    for t in (0.3, 10.0, 1e5):
        assert one_variable_expectation(1, t, gamma=2.0) == pytest.approx(t / (2 * t + 2.0), rel=1e-10)
    # A flat prior gives exactly 1/(2k) at every temperature.
    for k in (1, 2, 3):
        assert one_variable_expectation(k, 7.0, gamma=0.0) == pytest.approx(1 / (2 * k), rel=1e-10)


T0 = 1000 / math.log(1000)
PRODUCT_TABLE = {  # (k1, k2): E[t·K] at t = 1000/ln 1000, 1e3, 1e4, 1e6 (γ = 1)
    (1, 1): [0.3614, 0.3903, 0.4123, 0.4375],
    (1, 2): [0.2095, 0.2249, 0.2358, 0.2455],
    (2, 2): [0.1504, 0.1652, 0.1785, 0.1960],
}


@pytest.mark.parametrize("k1, k2", sorted(PRODUCT_TABLE))
def test_product_table(k1, k2):
    for t, expected in zip([T0, 1e3, 1e4, 1e6], PRODUCT_TABLE[(k1, k2)]):
        assert round(product_expectation(k1, k2, t), 4) == pytest.approx(expected, abs=1e-12), (k1, k2, t)
    assert product_expectation(k2, k1, 1e4) == pytest.approx(product_expectation(k1, k2, 1e4), rel=1e-9)


def test_normal_crossing():
    assert normal_crossing_coefficient([1, 1]) == (Fraction(1, 2), 2)
    assert normal_crossing_coefficient([1, 2]) == (Fraction(1, 4), 1)
    assert normal_crossing_coefficient([2, 2]) == (Fraction(1, 4), 2)
    assert normal_crossing_coefficient([1, 2, 0], h=[0, 1, 5]) == (Fraction(1, 2), 2)
    with pytest.raises(ValueError):
        normal_crossing_coefficient([0, 0])
    with pytest.raises(ValueError):
        normal_crossing_coefficient([1, 1], h=[0])


# --- builders -------------------------------------------------------------------------------------

def _float32_rank(matrix: torch.Tensor) -> int:
    """Rank in float64, with the tolerance float32 storage allows (rounding adds ~1e-7 relative noise)."""
    tol = max(matrix.shape) * torch.finfo(torch.float32).eps
    return int(torch.linalg.matrix_rank(matrix.detach().double(), rtol=tol))


@pytest.mark.parametrize("widths, rank", [((5, 4, 6, 3), 2), ((8, 8, 8), 8), ((6, 3, 7), 0), ((4, 9), 1)])
def test_make_dln_layer_ranks(widths, rank):
    model = make_dln(widths, rank, seed=3)
    assert isinstance(model, torch.nn.Sequential) and len(model) == len(widths) - 1
    for layer, (fan_in, fan_out) in zip(model, zip(widths[:-1], widths[1:])):
        assert isinstance(layer, torch.nn.Linear) and layer.bias is None
        assert layer.weight.shape == (fan_out, fan_in) and layer.weight.dtype == torch.float32
        assert _float32_rank(layer.weight) == rank
        if rank:  # a clear gap: the (rank+1)-th singular value is rounding noise
            s = torch.linalg.svdvals(layer.weight.detach().double())
            assert s[rank - 1] > 1e-3 * s[0]
            assert rank == len(s) or s[rank] < 1e-6 * s[0]


def test_make_dln_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = make_dln((5, 4, 5), 2, seed=7), make_dln((5, 4, 5), 2, seed=7), make_dln((5, 4, 5), 2, seed=8)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(x.weight, y.weight) for x, y in zip(a, b))
    assert not torch.equal(a[0].weight, c[0].weight)
    scaled = make_dln((5, 4, 5), 2, seed=7, scale=0.5)
    assert torch.allclose(scaled[0].weight, 0.5 * a[0].weight)


def test_make_dln_bad_inputs_raise():
    with pytest.raises(ValueError, match="rank"):
        make_dln((5, 3, 5), 4)
    with pytest.raises(ValueError, match="scale"):
        make_dln((5, 3, 5), 1, scale=0.0)


@pytest.mark.parametrize("seed", range(6))
def test_make_random_rank_dln(seed):
    widths = (10, 8, 12, 6)
    model, rank = make_random_rank_dln(widths, seed=seed)
    layer_ranks = [_float32_rank(layer.weight) for layer in model]
    # Independent random factors: the product's rank is generically the smallest layer rank.
    assert rank == min(layer_ranks)
    product = torch.linalg.multi_dot([layer.weight.detach().double() for layer in reversed(model)])
    assert _float32_rank(product) == rank
    again, rank_again = make_random_rank_dln(widths, seed=seed)
    assert rank_again == rank and all(torch.equal(x.weight, y.weight) for x, y in zip(model, again))


def test_make_random_rank_dln_reduce_prob_extremes():
    widths = (10, 8, 12, 6)
    full_rank = [min(a, b) for a, b in zip(widths[:-1], widths[1:])]
    model, rank = make_random_rank_dln(widths, seed=0, reduce_prob=0.0)
    assert [_float32_rank(layer.weight) for layer in model] == full_rank and rank == 6
    for seed in range(4):
        model, _ = make_random_rank_dln(widths, seed=seed, reduce_prob=1.0)
        assert all(_float32_rank(layer.weight) < full for layer, full in zip(model, full_rank))
    with pytest.raises(ValueError):
        make_random_rank_dln(widths, reduce_prob=1.5)


def test_dln_dataset():
    model = make_dln((3, 4, 2), 1)
    data = dln_dataset(model, 50, seed=1, input_range=10.0)
    x, y = data.tensors
    assert x.shape == (50, 3) and y.shape == (50, 2) and x.dtype == y.dtype == torch.float32
    assert x.abs().max() <= 10.0 and x.abs().max() > 5.0
    assert torch.equal(y, model(x).detach())
    assert torch.equal(dln_dataset(model, 50, seed=1).tensors[0], x)
    assert mse_loss(model, data[:]) == 0.0
    with pytest.raises(ValueError):
        dln_dataset(model, 0)


@pytest.mark.parametrize("widths, rank", [((3, 4, 2), 1), ((2, 3, 3, 2), 1), ((3, 5), 2), ((4, 3, 2, 3, 3), 2)])
def test_dln_hessian_eigenvalues_are_autograds(widths, rank):
    """Against the full Hessian of mse_loss by autograd in float64 at the same teacher and inputs: the m·p
    returned values are its largest eigenvalues, the others are 0, and r·(p + m − r) of them are nonzero (all
    m·p for one layer, a regular model)."""
    model = make_dln(widths, rank, seed=4, scale=0.7)
    x = dln_dataset(model, 40, seed=5, input_range=10.0).tensors[0].double()
    ws = [layer.weight.detach().double() for layer in model]
    sizes = [w.numel() for w in ws]

    def loss(flat):
        out = x.T
        for w in torch.split(flat, sizes):
            out = w.reshape(-1, out.shape[0]) @ out
        teacher = torch.linalg.multi_dot([*reversed(ws), x.T]) if len(ws) > 1 else ws[0] @ x.T
        return ((out - teacher) ** 2).mean()

    full = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, torch.cat([w.reshape(-1) for w in ws])))
    full = np.sort(full.numpy())
    h = dln_hessian_eigenvalues(model, x)
    m, p = widths[-1], widths[0]
    assert h.shape == (m * p,) and np.all(h >= 0) and np.all(np.diff(h) >= 0)
    np.testing.assert_allclose(h, full[-m * p:], rtol=1e-9, atol=1e-9 * full[-1])
    assert np.all(np.abs(full[:-m * p]) < 1e-9 * full[-1])
    assert int(np.sum(h > 1e-10 * h[-1])) == (rank * (p + m - rank) if len(widths) > 2 else m * p)
    with pytest.raises(ValueError, match="bias-free"):
        dln_hessian_eigenvalues(torch.nn.Sequential(torch.nn.Linear(2, 2)), x[:, :2])
    with pytest.raises(ValueError, match="shape"):
        dln_hessian_eigenvalues(model, x[:, :1])


def test_mse_loss_is_mean_over_batch_and_outputs():
    model = make_dln((2, 3), 0)  # zero weights: predictions are 0
    x = torch.ones(4, 2)
    y = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    assert mse_loss(model, (x, y)).item() == pytest.approx((y ** 2).mean().item())


def test_regression_example_at_least_squares_solution():
    model, data = make_regression_example()
    x, y = data.tensors
    assert x.shape == y.shape == (100, 1)
    assert model.weight.item() == 3.0 and model.bias.item() == 2.0
    loss = mse_loss(model, data.tensors)
    loss.backward()
    assert loss.item() < 1e-12
    assert model.weight.grad.abs().max() < 1e-6 and model.bias.grad.abs().max() < 1e-6
