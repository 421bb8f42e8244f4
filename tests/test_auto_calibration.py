"""Calibration from the curvature at w*: the Hessian's extremes by power iteration (exact on quadratics of known
spectrum and on a deep linear network against its exact Hessian), the stability limit calibrate never recommends a
step above, the gamma check, and estimate_llc_auto's one-call estimate against exact answers."""
import math
import warnings

import numpy as np
import pytest
import torch
from test_oracle_estimates import FULL_BATCH, Replicated, potential_loss
from torch import nn

import llc_fast
from llc_fast.chains.hessian import hessian_curvature, lr_limit
from llc_fast.kernels.update_spec import STABILITY_LIMIT
from llc_fast.oracles import (dln_dataset, dln_hessian_eigenvalues, make_dln, make_regression_example, mse_loss,
                              quadratic_sgld_expectation)
from llc_fast.studies.calibrate import CalibrationRow
from llc_fast.studies.recommend import _choose, recommend
from llc_fast.chains.hessian import Curvature
from llc_fast.studies.stability import GAMMA_Z, LM_STEP_FRACTION, MAX_STEP_FRACTION, auto_choice, gamma_ladder


class Quadratic(nn.Module):
    """K(w) = ½ wᵀAw at w* = 0 with A = Q·diag(h)·Qᵀ, Q a random rotation (identity with rotate=False)."""

    def __init__(self, h, rotate=True, seed=0):
        super().__init__()
        h = torch.tensor(h, dtype=torch.float64)
        q = torch.linalg.qr(torch.randn(len(h), len(h), generator=torch.Generator().manual_seed(seed),
                                        dtype=torch.float64))[0] if rotate else torch.eye(len(h), dtype=torch.float64)
        self.register_buffer("a", q @ torch.diag(h) @ q.T)
        self.w = nn.Parameter(torch.zeros(len(h), dtype=torch.float64))


def quadratic_loss(model, batch):
    """½ wᵀAw scaled by the batch (1 for every batch): the mean over batches is the quadratic itself."""
    return 0.5 * model.w @ model.a @ model.w * batch


BATCHES = [torch.tensor(1.0, dtype=torch.float64)] * 3


def test_power_iteration_is_exact_on_a_quadratic_of_known_spectrum():
    h = [10.0, 7.0, 4.0, 2.0, 1.0, 0.5, 0.0]
    c = hessian_curvature(Quadratic(h), BATCHES, quadratic_loss, rtol=1e-12, max_iters=2000, trace_probes=0)
    assert c.h_max == pytest.approx(10.0, rel=1e-9) and c.h_min == pytest.approx(0.0, abs=1e-8) and c.converged
    assert math.isnan(c.trace) and c.num_batches == 3 and c.num_params == 7
    assert c.hvps == 3 * sum(c.iterations) and c.grad_evals == 2 * c.hvps  # one product per batch and iteration
    # a diagonal Hessian: every Rademacher probe gives zᵀHz = tr H exactly
    d = hessian_curvature(Quadratic(h, rotate=False), BATCHES, quadratic_loss, trace_probes=3)
    assert d.trace == pytest.approx(sum(h), rel=1e-12)


def test_a_dominant_negative_eigenvalue_still_gives_the_largest_and_the_smallest():
    c = hessian_curvature(Quadratic([-20.0, 5.0, 1.0, 3.0]), BATCHES, quadratic_loss, rtol=1e-12, max_iters=3000,
                          trace_probes=0)
    assert c.h_max == pytest.approx(5.0, rel=1e-8) and c.h_min == pytest.approx(-20.0, rel=1e-8)


def test_same_seed_same_numbers_and_the_model_is_left_untouched():
    model = Quadratic([3.0, 2.0, 1.0])
    before = model.w.detach().clone()
    a = hessian_curvature(model, BATCHES, quadratic_loss, seed=5, rtol=1e-2)
    assert a == hessian_curvature(model, BATCHES, quadratic_loss, seed=5, rtol=1e-2)
    assert a.trace != hessian_curvature(model, BATCHES, quadratic_loss, seed=6, rtol=1e-2).trace  # other probes
    assert model.w.grad is None and torch.equal(model.w.detach(), before)


def test_a_mask_measures_the_restricted_coordinates_only():
    model = Quadratic([10.0, 3.0, 1.0], rotate=False)
    c = hessian_curvature(model, BATCHES, quadratic_loss, mask={"w": torch.tensor([0.0, 1.0, 1.0])}, rtol=1e-12,
                          max_iters=500, trace_probes=2)
    assert c.h_max == pytest.approx(3.0, rel=1e-9) and c.trace == pytest.approx(4.0, rel=1e-12)


def full_hessian(model, x) -> np.ndarray:
    """The Hessian of mse_loss on (x, model(x)) over every weight, by autograd in float64."""
    layers = [m for m in model if isinstance(m, nn.Linear)]
    shapes = [layer.weight.shape for layer in layers]
    x = x.double()
    y = model.double()(x).detach()

    def loss(flat):
        out = x
        for w, shape in zip(torch.split(flat, [s.numel() for s in shapes]), shapes):
            out = out @ w.reshape(shape).T
        return ((out - y) ** 2).mean()

    flat = torch.cat([layer.weight.detach().reshape(-1) for layer in layers])
    return torch.autograd.functional.hessian(loss, flat).numpy()


def test_dln_curvature_matches_its_exact_hessian():
    model = make_dln((3, 4, 3), 1, seed=1, scale=0.5).double()
    data = dln_dataset(model, 500, seed=3, input_range=10.0)
    exact = dln_hessian_eigenvalues(model, data.tensors[0])
    probes = 64
    c = hessian_curvature(model, [tuple(data.tensors)], mse_loss, rtol=1e-10, max_iters=2000, trace_probes=probes)
    assert c.h_max == pytest.approx(exact[-1], rel=1e-7)
    assert abs(c.h_min) < 1e-6 * exact[-1]  # a singular model: zero-curvature directions
    hessian = full_hessian(model, data.tensors[0])
    sd = math.sqrt(2 * (np.sum(hessian**2) - np.sum(np.diag(hessian) ** 2)) / probes)  # Hutchinson's, exact
    assert abs(c.trace - np.trace(hessian)) < 4 * sd and np.trace(hessian) == pytest.approx(exact.sum(), rel=1e-9)


def test_the_stability_limit_is_the_quadratic_chains():
    h, nbeta, gamma = np.array([1.0, 0.2, 3.0]), 100.0, 1.0
    limit = lr_limit(3.0, nbeta, gamma)
    assert limit == STABILITY_LIMIT / (nbeta * 3.0 + gamma)
    quadratic_sgld_expectation(h, nbeta, gamma, limit * (1 - 1e-9))  # stable just below
    with pytest.raises(ValueError, match="unstable"):
        quadratic_sgld_expectation(h, nbeta, gamma, limit * (1 + 1e-9))


@pytest.mark.parametrize("kw, message", [
    (dict(num_batches=0), "num_batches must be an integer >= 1"),
    (dict(max_iters=1), "max_iters must be an integer >= 2"),
    (dict(rtol=0.0), "rtol must be a number in"),
    (dict(trace_probes=-1), "trace_probes must be an integer >= 0"),
])
def test_bad_curvature_options_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        hessian_curvature(Quadratic([1.0]), BATCHES, quadratic_loss, **kw)


def test_a_loss_without_gradient_is_refused():
    with pytest.raises(ValueError, match="without gradient"):
        hessian_curvature(Quadratic([1.0]), BATCHES, lambda m, b: (m.w ** 2).sum().detach())


# --- calibrate: the stability limit and the gamma check ---

def steep_then_flat(w):
    """Copy 0: log cosh(10 w) (curvature 100 at 0, slope at most 10); the others 5w² (curvature 10)."""
    out = 5.0 * w**2
    out[0] = torch.log(torch.cosh(10.0 * w[0]))
    return out


def test_calibrate_never_recommends_a_step_above_the_stability_limit():
    """At lr = 1e-3 (limit 4/(100·100 + 1) ≈ 4e-4) the steep copy bounces between ±0.25 on its linear walls instead
    of diverging: the chains look mixed and flat, and the rule without the limit recommends them."""
    model = Replicated(20, 1, steep_then_flat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calib = llc_fast.calibrate(model, FULL_BATCH, potential_loss, lrs=[3e-4, 1e-3], gammas=[1.0], nbetas=[100.0],
                                   chains_per_setting=4, num_draws=2000, num_burnin_steps=200, mala_every=None,
                                   progress=False)
    slow, fast = calib.rows
    assert calib.curvature["h_max"] == pytest.approx(100.0, rel=1e-3)
    assert fast.lr_limit == pytest.approx(4 / (100 * 100 + 1), rel=1e-3) and not fast.within_limit
    assert fast.diverged == 0 and slow.within_limit
    assert _choose(calib.rows, acceptance_recorded=False)[0] is fast  # what the rule without the limit picks
    assert calib.recommended is slow and "stability limit" in calib.reason
    assert "!" in calib.table().splitlines()[2]  # the row beyond its limit is marked
    loaded = llc_fast.CalibrationResult.from_dict(calib.to_dict())
    assert loaded.rows[1].within_limit is False and loaded.curvature == calib.curvature


def made_up(setting, gamma, llc, se, *, lr=1e-3, within=True, flattened=True):
    return CalibrationRow(setting=setting, lr=lr, gamma=gamma, nbeta=100.0, chains=[setting], llc_mean=llc,
                          llc_std=math.nan, llc_stderr=se, llc_first_half=llc, llc_second_half=llc, drift=0.0,
                          drift_se=math.nan, flattened=flattened, mala_mean=math.nan, diverged=0, diverged_at_step=[],
                          mcse=se, lr_limit=2e-3 if within else 5e-4, within_limit=within, rhat=1.0)


def test_the_gamma_check_moves_down_only_for_a_significantly_larger_estimate():
    big, mid, small = made_up(0, 100.0, 10.0, 0.1), made_up(1, 10.0, 12.0, 0.1), made_up(2, 1.0, 12.1, 0.1)
    chosen, note = gamma_ladder(big, [big, mid, small])
    assert chosen is mid and "gamma=100 moves the target" in note and "gamma=10 does not measurably" in note
    close = made_up(1, 10.0, 10.0 + 0.9 * GAMMA_Z * math.hypot(0.1, 0.1), 0.1)
    assert gamma_ladder(big, [big, close])[0] is big  # within GAMMA_Z standard errors: gamma stays
    assert gamma_ladder(big, [big, made_up(1, 10.0, 12.0, math.nan)])[0] is big  # no standard error: no judgement
    best, reason = recommend([big, mid, small], acceptance_recorded=False)
    assert best is mid and reason.startswith("setting 1") and "moves the target" in reason
    apart = made_up(1, 10.0, 12.0, 0.1)
    apart.rhat = 1.05  # larger, but its chains disagree: leaving w* along flat directions, not a truer target
    chosen, note = gamma_ladder(big, [big, apart])
    assert chosen is big and "agree less (R-hat 1.05 > 1.01)" in note
    unflat = made_up(1, 10.0, 12.0, 0.1, flattened=False)  # a still-rising row says nothing about the target
    assert recommend([big, unflat], acceptance_recorded=False)[0] is big
    beyond = made_up(3, 100.0, 30.0, 0.1, lr=2e-3, within=False)
    best, reason = recommend([beyond], acceptance_recorded=False)
    assert best is None and "lr < 0.0005" in reason


def test_without_a_qualifying_setting_the_auto_choice_descends_the_gammas_and_says_the_budget_is_short():
    """No row qualified (none mixed): from the largest gamma down while λ̂ is significantly larger, whether or not
    the trace flattened (a still-rising estimate is low: being larger anyway, the larger gamma held the target)."""
    curvature = Curvature(h_max=10.0, h_min=0.0, trace=math.nan, iterations=(5, 5), converged=True, hvps=10,
                          num_batches=1, num_params=3)
    rows = [made_up(0, 100.0, 30.0, 0.5), made_up(1, 10.0, 40.0, 0.5, flattened=False), made_up(2, 1.0, 40.5, 2.0)]
    for r, rhat in zip(rows, (1.03, 1.02, 1.04)):
        r.mixed, r.rhat = False, rhat
    choice, reason = auto_choice(rows, None, "no setting's chains mixed", curvature, steps=1000)
    assert choice["gamma"] == 10.0 and not choice["budget_ok"] and "budget is too small" in reason
    assert choice["lr"] == pytest.approx(MAX_STEP_FRACTION * 4 / (100.0 * 10.0 + 10.0))  # no trace: half the limit
    assert choice["steps_needed"] == math.ceil(3 / (choice["lr"] * 10.0))  # h_min 0: gamma alone relaxes
    assert auto_choice([made_up(0, 100.0, 30.0, 0.5, within=False)], None, "x", curvature, 1000) == (None, "x")


def test_with_lm_noise_the_auto_step_is_a_fixed_share_of_the_limit_without_a_step_bias_rule():
    """noise_scheme="lm" has no step bias on a quadratic: the step is LM_STEP_FRACTION of the limit even where the
    Euler rule (bias lr·nbeta·tr(H)/8 at most 3 % of λ̂) takes less than half of it, and the bias reported is 0."""
    curvature = Curvature(h_max=10.0, h_min=0.1, trace=100.0, iterations=(5, 5), converged=True, hvps=10,
                          num_batches=1, num_params=3)
    row = made_up(0, 1.0, 20.0, 0.1)
    limit = 4 / (100.0 * 10.0 + 1.0)
    euler, _ = auto_choice([row], row, "setting 0", curvature, steps=1000)
    lm, reason = auto_choice([row], row, "setting 0", curvature, steps=1000, noise_scheme="lm")
    assert euler["lr"] < 0.5 * LM_STEP_FRACTION * limit and euler["step_bias"] > 0
    assert lm["lr"] == pytest.approx(LM_STEP_FRACTION * limit) and lm["step_bias"] == 0.0
    assert "noise_scheme='lm' has no step bias" in reason


# --- the one-call estimate ---

def test_estimate_llc_auto_on_the_regression_oracle():
    """y = 3x + 2 (λ = 1, Hessian eigenvalues 0.680 and 2): the chosen step keeps the estimated step bias at 3 %,
    below half the stability limit; the estimate is within that and 4 standard errors of λ."""
    model, data = make_regression_example()
    nbeta = 100 / math.log(100)
    result = llc_fast.estimate_llc_auto(model, [tuple(data.tensors)], mse_loss, nbeta=nbeta, num_chains=8,
                                        num_draws=1500, num_burnin_steps=300, progress=False)
    c = result.config["calibration"]
    assert c["h_max"] == pytest.approx(2.0, rel=1e-3) and c["h_min"] == pytest.approx(0.680, rel=1e-2)
    assert c["lr_limit"] == pytest.approx(4 / (nbeta * c["h_max"] + c["gamma"]))
    assert result.config["lr"] == [c["lr"]] * 8 and result.config["gamma"] == [c["gamma"]] * 8
    assert c["lr"] <= 0.5 * c["lr_limit"] and c["step_bias"] <= 0.03 + 1e-12 and c["budget_ok"]
    assert c["cost_ratio"] == pytest.approx(c["calibration_grad_evals"] / c["estimate_grad_evals"])
    assert c["cost_ratio"] <= 2.0 and "lr=" in c["reason"] and "gamma=" in c["reason"]
    assert abs(result.llc_mean - 1.0) < 0.03 + 4 * result.llc_stderr, (result.llc_mean, result.llc_stderr)


@pytest.mark.parametrize("kw, error, message", [
    (dict(lr=1e-3), TypeError, "chooses lr itself"),
    (dict(gamma=1.0), TypeError, "chooses gamma itself"),
    (dict(lrr=1e-3), TypeError, "unknown option"),
    (dict(chains_per_setting=3), TypeError, "calibration_chains="),
    (dict(calibration_chains=1), ValueError, "calibration_chains must be an integer >= 2"),
    (dict(nbeta=[10, 20]), ValueError, "takes one nbeta"),
])
def test_estimate_llc_auto_refuses_bad_inputs(kw, error, message):
    model, data = make_regression_example()
    with pytest.raises(error, match=message):
        llc_fast.estimate_llc_auto(model, [tuple(data.tensors)], mse_loss, **kw)


def test_estimate_llc_points_lr_auto_to_the_one_call_mode():
    model, data = make_regression_example()
    with pytest.raises(ValueError, match="estimate_llc_auto"):
        llc_fast.estimate_llc(model, [tuple(data.tensors)], mse_loss, lr="auto", nbeta=10.0)


def test_calibrate_auto_refuses_several_nbetas_and_other_callers_refuse_auto():
    model, data = make_regression_example()
    with pytest.raises(ValueError, match="one nbeta"):
        llc_fast.calibrate(model, [tuple(data.tensors)], mse_loss, lrs="auto", nbetas=[10.0, 20.0])
    with pytest.raises(ValueError, match="pass a list of step sizes"):
        llc_fast.sweep(model, [tuple(data.tensors)], mse_loss, lrs="auto", nbetas=[10.0])


@pytest.mark.slow
def test_estimate_llc_auto_on_a_deep_linear_network():
    """Widths (3, 4, 3), every layer of rank 1 (λ = 9/2, Aoyagi), n = 2000, x ~ U(-10, 10), batches of 500: the
    one-call estimate with 2,000 burn-in steps and 2,000 draws is within 10 % (a 3 % step bias, gamma's pull and the
    transient) plus 3 standard errors of λ, and its calibration costs at most twice the estimate."""
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    model = make_dln((3, 4, 3), 1, seed=1, scale=0.5)
    data = dln_dataset(model, 2000, seed=1001, input_range=10.0)
    loader = DataLoader(data, batch_size=None, sampler=BatchSampler(RandomSampler(data), 500, drop_last=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = llc_fast.estimate_llc_auto(model, loader, mse_loss, num_draws=2000, num_burnin_steps=2000,
                                            progress=False)
    c = result.config["calibration"]
    assert c["lr"] < 0.5 * c["lr_limit"] * (1 + 1e-12) and c["cost_ratio"] <= 2.0
    assert abs(result.llc_mean - 4.5) < 0.1 * 4.5 + 3 * result.llc_stderr, (result.llc_mean, result.llc_stderr, c)
