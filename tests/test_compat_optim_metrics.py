"""devinterp conventions of llc_fast.compat.devinterp's samplers (issue 22): the optimizers' diagnostics
(``metrics=[...]`` and 1.x SGLD's flags, which devinterp's ``sample()`` asks for with a ``MalaAcceptanceRate``
callback), masks of shape (1,), frozen ``lr=0`` param groups, RMSProp with alpha=1, and models that write their
own weights inside ``forward`` (batched chains fall back to one chain at a time)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn

from llc_fast.compat import devinterp as compat
from llc_fast.compat.devinterp import DevinterpCompatWarning
from llc_fast.compat.devinterp.optim import SGLD, SGMCMC, VALID_METRICS

ALL = list(VALID_METRICS)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def _backward(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss


def _step(model, opt, seed=1):
    opt.zero_grad()
    loss = _backward(model, seed)
    pre = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.detach().clone() for p in model.parameters()]
    opt.step()
    return loss, pre, grads


@pytest.mark.filterwarnings("ignore")
def test_sgld_metrics_are_devinterp_1x_definitions():
    """1.x SGLD: dws = nbeta*g + wd*w + gamma*(w - w0) (unmasked, all groups), noise = the step's noise
    (std noise_level, unmasked, per group), localization_loss = gamma/2*||m*(w - w0)||^2 and distance
    ||m*(w - w0)|| with mala vars, grad_norm ||nbeta*lr/2*g||, weight_norm after the step."""
    model = _model()
    lr, nbeta, gamma, wd = 1e-2, 7.0, 3.0, 0.05
    params = list(model.parameters())
    masks = [torch.rand(p.shape, generator=torch.Generator().manual_seed(k)) > 0.3 for k, p in enumerate(params)]
    opt = SGLD([{"params": p, "optimize_over": m} for p, m in zip(params, masks)], lr=lr, nbeta=nbeta,
               localization=gamma, weight_decay=wd, seed=5, save_noise=True, save_mala_vars=True, noise_norm=True,
               grad_norm=True, weight_norm=True, distance=True)
    w0 = [p.detach().clone() for p in params]
    for s in range(3):
        _, pre, grads = _step(model, opt, seed=s)
    dws = opt.dws
    assert isinstance(dws, list) and len(dws) == len(params)
    loc_loss = 0.0
    for k, (p, w, g, m, c) in enumerate(zip(params, pre, grads, masks, w0)):
        drift = nbeta * g + wd * w + gamma * (w - c)
        torch.testing.assert_close(dws[k], drift, rtol=1e-5, atol=1e-6)
        noise = opt.noise[k][0]  # one group per parameter
        # the noise recorded is the noise the step applied (masked entries do not move)
        applied = (p.detach() - w + 0.5 * lr * drift * m) / math.sqrt(lr)
        torch.testing.assert_close(applied[m], noise[m], rtol=1e-4, atol=1e-4)
        assert torch.equal(p.detach()[~m], w[~m])
        group = opt.param_groups[k]
        md = (m * (w - c))
        torch.testing.assert_close(group["distance"], md.pow(2).sum().sqrt())
        torch.testing.assert_close(group["noise_norm"], (noise * m).pow(2).sum().sqrt())
        torch.testing.assert_close(group["grad_norm"], (g * nbeta * 0.5 * lr).pow(2).sum().sqrt())
        torch.testing.assert_close(group["weight_norm"], p.detach().pow(2).sum().sqrt())
        loc_loss = loc_loss + gamma / 2 * md.pow(2).sum()
    torch.testing.assert_close(opt.localization_loss, loc_loss)
    assert torch.equal(opt.noise_norm, opt.param_groups[0]["noise_norm"])  # optimizer.<name>: first group


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("factory", ["sgld", "rmsprop_sgld"])
def test_sgmcmc_metrics_are_devinterp_definitions(factory):
    """SGMCMC (factories): group["metrics"], dws = m*G*(nbeta*g + gamma*(w - w0) + wd*w) with G the RMSProp
    preconditioner the step used, noise masked, distance ||w - w0||, localization_loss gamma/2*distance^2."""
    model = _model()
    lr, nbeta, gamma = 1e-2, 7.0, 3.0
    params = list(model.parameters())
    mask = torch.rand(params[0].shape, generator=torch.Generator().manual_seed(0)) > 0.5
    opt = getattr(SGMCMC, factory)([{"params": (params[0],), "optimize_over": (mask,)},
                                    {"params": params[1:]}], lr=lr, nbeta=nbeta, localization=gamma, seed=5,
                                   metrics=ALL)
    w0 = [p.detach().clone() for p in params]
    for s in range(3):
        _, pre, grads = _step(model, opt, seed=s)
    for gi, (group, plist) in enumerate(zip(opt.param_groups, ([0], [1, 2, 3]))):
        met = group["metrics"]
        assert set(met) == set(ALL)
        dist2 = 0.0
        for j, k in enumerate(plist):
            w, g, c, p = pre[k], grads[k], w0[k], params[k]
            m = mask if k == 0 else torch.ones_like(p, dtype=torch.bool)
            G = 1.0 if factory == "sgld" else 1.0 / (opt.state[p]["square_avg"].sqrt() + 0.1)
            torch.testing.assert_close(met["dws"][j], m * G * (nbeta * g + gamma * (w - c)), rtol=1e-5, atol=1e-6)
            assert torch.all(met["noise"][j][~m] == 0)
            dist2 = dist2 + (w - c).pow(2).sum()
        torch.testing.assert_close(met["distance"], torch.as_tensor(dist2).sqrt())
        torch.testing.assert_close(met["localization_loss"], gamma / 2 * torch.as_tensor(dist2))
    assert opt.dws is opt.param_groups[0]["metrics"]["dws"] and opt.metrics is opt.param_groups[0]["metrics"]


@pytest.mark.filterwarnings("ignore")
def test_metric_exposure_and_checks():
    model = _model()
    with pytest.raises(ValueError, match="Invalid metrics"):
        SGLD(model.parameters(), metrics=["invalid_metric"])
    with pytest.raises(ValueError, match="Invalid metrics"):
        SGMCMC.sgld(model.parameters(), metrics=["invalid_metric"])
    opt = SGMCMC.sgld(model.parameters(), lr=0.1, metrics=["grad_norm", "weight_norm"], seed=1)
    _step(model, opt)
    assert isinstance(opt.grad_norm, torch.Tensor) and opt.weight_norm > 0
    with pytest.raises(AttributeError):
        _ = opt.noise_norm
    with pytest.raises(AttributeError):
        _ = opt.distance
    # a callback holds last step's lists; zero_grad resets the optimizer's without emptying them
    opt = SGMCMC.sgld(model.parameters(), lr=0.1, metrics=["dws", "localization_loss"], seed=1, localization=1.0)
    _step(model, opt)
    held = opt.dws
    opt.zero_grad()
    assert len(held) == 4 and opt.dws == []
    # nothing asked, nothing kept
    plain = SGLD(model.parameters(), lr=0.1, seed=1)
    _step(model, plain)
    assert plain.metrics == {} and all("metrics" not in g for g in plain.param_groups)  # 1.x SGLD: no such key
    assert all(g["metrics"] == {} for g in SGMCMC.sgld(model.parameters(), lr=0.1).param_groups)


def _mala_loop(model, opt, lr, nbeta, steps=40):
    """devinterp's sample() loop with its MalaAcceptanceRate callback's reading of the optimizer (after step,
    before zero_grad): current_grads = optimizer.dws, mala_loss = loss*nbeta + optimizer.localization_loss."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = torch.randn(64, 2, generator=g)
    prev = None
    rates, seen = [], []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        point = [p.detach().clone() for p in model.parameters()]
        opt.step()
        grads, mala_loss = opt.dws, loss.detach() * nbeta + opt.localization_loss
        seen.append((point, [d.clone() for d in grads], mala_loss))
        if prev is not None:
            (pp, pg, pl), (cp, cg, cl) = prev, seen[-1]
            fwd = sum(-((c - p - lr * 0.5 * -g_) ** 2).sum() / (2 * lr) for c, p, g_ in zip(cp, pp, pg))
            bwd = sum(-((p - c - lr * 0.5 * -g_) ** 2).sum() / (2 * lr) for c, p, g_ in zip(cp, pp, cg))
            rates.append(min(1.0, float(torch.exp(bwd - fwd + pl - cl))))
        prev = seen[-1]
        opt.zero_grad()
    return rates, seen


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("which", ["SGLD", "SGMCMC.sgld"])
def test_mala_callback_reads_the_potential_gradient(which):
    """What devinterp's MalaAcceptanceRate reads is the gradient of its potential nbeta*L(w) +
    gamma/2*||w - w0||^2 at the pre-step weights and that potential's prior part: checked against autograd,
    and the acceptance is near 1 for a small step."""
    model = _model()
    lr, nbeta, gamma = 1e-5, 10.0, 5.0
    opt = (SGLD if which == "SGLD" else SGMCMC.sgld)(model.parameters(), lr=lr, nbeta=nbeta, localization=gamma,
                                                     seed=3, metrics=["dws", "localization_loss"])
    w0 = [p.detach().clone() for p in model.parameters()]
    rates, seen = _mala_loop(model, opt, lr, nbeta)
    point, dws, mala_loss = seen[-1]
    probe = _model()
    with torch.no_grad():
        for p, w in zip(probe.parameters(), point):
            p.copy_(w)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randn(64, 2, generator=g)
    prior = sum(gamma / 2 * (p - c).pow(2).sum() for p, c in zip(probe.parameters(), w0))
    potential = nbeta * nn.functional.mse_loss(probe(x), y) + prior
    potential.backward()
    for d, p in zip(dws, probe.parameters()):
        torch.testing.assert_close(d, p.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mala_loss, potential.detach(), rtol=1e-5, atol=1e-6)
    assert min(rates) > 0.9


@pytest.mark.filterwarnings("ignore")
def test_mask_of_shape_one_switches_the_whole_parameter():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    on_off = [torch.tensor([k % 2 == 0]) for k in range(4)]
    opt = SGMCMC([{"params": (p,), "optimize_over": (m,)} for p, m in zip(model.parameters(), on_off)], lr=0.1,
                 nbeta=1.0, seed=2)
    _step(model, opt)
    for b, p, m in zip(before, model.parameters(), on_off):
        assert bool((b != p.detach()).all()) if m else torch.equal(b, p.detach())
    # a parameter without a mask beside masked ones is free (devinterp), not frozen
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    opt = SGMCMC([{"params": (params[0],), "optimize_over": (torch.tensor([False]),)}, {"params": params[1:]}],
                 lr=0.1, nbeta=1.0, seed=2)
    _step(model, opt)
    assert [not torch.equal(b, p.detach()) for b, p in zip(before, params)] == [False, True, True, True]
    with pytest.raises(ValueError, match="broadcast"):
        SGLD([{"params": next(_model().parameters()), "optimize_over": torch.ones(7, dtype=torch.bool)}])
    # devinterp 1.x's optimize_over_per_model_param broadcasts too
    masks = {n: torch.tensor([n.startswith("0.")]) for n, _ in _model().named_parameters()}
    names, flat = compat.common.resolve_masks(_model(), masks, "optimize_over_per_model_param", require_all=True)
    assert flat["0.weight"].shape == (3, 4) and flat["0.weight"].all() and not flat["2.bias"].any()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("factory", ["sgld", "rmsprop_sgld"])
def test_lr_zero_group_is_frozen(factory):
    model = _model()
    groups = [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.0}]
    opt = SGMCMC(groups, nbeta=1.0, seed=1, preconditioner="identity" if factory == "sgld" else "rmsprop")
    before = [p.detach().clone() for p in model.parameters()]
    _step(model, opt)
    moved = [not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters())]
    assert moved == [True, True, False, False]
    if factory == "rmsprop_sgld":  # devinterp's preconditioner still takes the frozen group's gradient
        p = model[2].weight
        torch.testing.assert_close(opt.state[p]["square_avg"], 0.01 * p.grad ** 2)
    with pytest.raises(ValueError, match="lr"):
        SGMCMC([{"params": model[0].parameters(), "lr": -0.1}])


@pytest.mark.filterwarnings("ignore")
def test_rmsprop_alpha_one_is_sgld_with_lr_over_eps():
    m1, m2 = _model(), _model()
    a = SGMCMC.rmsprop_sgld(m1.parameters(), lr=0.01, alpha=1.0, eps=2.0, nbeta=3.0, localization=0.1, seed=4)
    b = SGMCMC.sgld(m2.parameters(), lr=0.005, nbeta=3.0, localization=0.1, seed=4)
    for s in range(3):
        _step(m1, a, seed=s)
        _step(m2, b, seed=s)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q)


class _LateInPlaceWriter(nn.Module):
    """devinterp's DummyNaNModel: after 100 forwards it fills its own weight with inf inside forward."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.counter = 0
        with torch.no_grad():
            self.linear.weight.fill_(1.0)
            self.linear.bias.fill_(0.0)

    def forward(self, x):
        self.counter += 1
        if self.counter > 100:
            with torch.no_grad():
                self.linear.weight.fill_(float("inf"))
        return self.linear(x)


def test_model_writing_its_weights_in_forward_falls_back_to_sequential():
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(100, 2)), batch_size=10)
    model = _LateInPlaceWriter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(compat.ChainDivergedError, match="NaN detected in loss at chain 0, draw"):
            compat.estimate_learning_coeff(model, loader, evaluate=lambda m, b: m(b[0]).mean(), num_draws=100,
                                           num_chains=3, optimizer_kwargs={"nbeta": 10}, verbose=False)
    why = [str(w.message) for w in caught if issubclass(w.category, DevinterpCompatWarning)
           and "writes its own weights in place" in str(w.message)]
    assert len(why) == 1 and "sequential" in why[0]
    assert torch.equal(model.linear.weight.detach(), torch.ones(1, 2))  # the caller's weights are untouched
