"""sampler="sgnht": the reference step against devinterp's SGNHT loop, the backend's thermostat reduction over the
sampled elements, the stationary law on a quadratic (the exact localized posterior and a kinetic temperature of 1),
exact checkpoint/resume, and what refuses it (the fast backends, sharded runs, options that do not apply)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import llc_fast
from llc_fast.chains import ChainHyper, LoopSettings, Schedule, run_chains
from llc_fast.chains.engines import local_engine
from llc_fast.chains.setup import initial_loss
from llc_fast.kernels import RowMasks, SamplerSettings, StepCounters, select_backend, torch_update
from llc_fast.kernels import philox
from llc_fast.kernels.backend import NotSupportedError
from llc_fast.kernels.cpu_update import cpu_update
from llc_fast.kernels.cuda_update import cuda_update
from llc_fast.kernels.reference import sgnht_step, thermostat_step
from llc_fast.kernels.triton_update import triton_update
from llc_fast.kernels.update_call import Segment
from llc_fast.oracles import quadratic_posterior_expectation, quadratic_sgnht_expectation
from llc_fast.state import FlatLayout, FlatState

from conftest import batch_means_se, checkpoint_recorder, mlp_case, quadratic_model

CPU = torch.device("cpu")


def devinterp_sgnht(params, grad_fn, noises, *, lr, nbeta, diffusion, box, steps):
    """devinterp 1.3.2's ``SGNHT.step`` written out in float64 for one param group: ``params`` (a list of 1-d
    tensors, updated in place) with momenta starting at 0, the thermostat at ``diffusion``; noises[t][k]: the
    N(0, 1) draw of param k at step t. Returns (momenta, thermostat)."""
    initial = [p.clone() for p in params]
    momenta = [torch.zeros_like(p) for p in params]
    thermostat = torch.tensor(diffusion, dtype=torch.float64)
    for t in range(steps):
        grads = grad_fn(params)
        energy, size = 0.0, 0
        for k, (p, mom) in enumerate(zip(params, momenta)):
            mom.sub_(lr * grads[k] * nbeta)
            mom.sub_(thermostat * mom)
            mom.add_(noises[t][k] * ((lr * 2 * diffusion) ** 0.5))
            p.add_(mom)
            energy += float((mom * mom).sum())
            size += mom.numel()
            if box:
                reflection = ((p - initial[k]).abs() < box) * 2 - 1
                p.clamp_(min=initial[k] - box, max=initial[k] + box)
                mom.mul_(reflection)
        thermostat = thermostat + (energy / size - lr)
    return momenta, thermostat


@pytest.mark.parametrize("box", [None, 0.02])
def test_reference_step_is_devinterps_sgnht_loop(box):
    """gamma = 0: ``sgnht_step`` then ``thermostat_step``, over two pieces of one row, is devinterp's update (float64,
    the same normals) step for step; the box reflects the momentum where the weight hit the wall."""
    gen = torch.Generator().manual_seed(1)
    h = torch.rand(7, generator=gen, dtype=torch.float64) * 3
    w0 = torch.randn(7, generator=gen, dtype=torch.float64) * 0.01
    noises = [[torch.randn(3, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)]
              for _ in range(6)]
    lr, nbeta, A = 1e-3, 50.0, 0.05
    params = [w0[:3].clone(), w0[3:].clone()]
    momenta, thermostat = devinterp_sgnht(params, lambda ps: [h[:3] * ps[0], h[3:] * ps[1]], noises, lr=lr,
                                          nbeta=nbeta, diffusion=A, box=box, steps=6)

    settings = SamplerSettings("sgnht", sgnht_diffusion=A, box=box)
    w, p, z = w0[None].clone(), torch.zeros(1, 7, dtype=torch.float64), torch.full((1, 1), A, dtype=torch.float64)
    one = torch.ones(1, 1, dtype=torch.float64)
    for t in range(6):
        g = h * w
        kinetic = 0.0
        for sl, xi in zip((slice(0, 3), slice(3, 7)), noises[t]):
            w[:, sl], p[:, sl], k = sgnht_step(w[:, sl], g[:, sl], w0[sl], p[:, sl], z, xi[None], None, lr=lr * one,
                                               nbeta=nbeta * one, gamma=0 * one, settings=settings)
            kinetic = kinetic + k[:, None]
        z = thermostat_step(z, kinetic, 7 * one, lr * one)
    torch.testing.assert_close(w[0], torch.cat(params), rtol=1e-13, atol=1e-16)
    torch.testing.assert_close(p[0], torch.cat(momenta), rtol=1e-13, atol=1e-16)
    assert float(z) == pytest.approx(float(thermostat), rel=1e-12)
    if box is not None:
        assert bool(((w[0] - w0).abs() >= box).any())  # the box was hit


def test_backend_counts_only_the_sampled_elements_of_each_row():
    """The torch backend over two segments with per-row masks: each row's momentum is the pure step's with the
    Philox normals of (seed, chain, step, global index), masked elements keep w and p = 0, and the thermostat takes
    the kinetic energy of the row's sampled elements only (over both segments)."""
    C, N, lr, A = 3, 10, 1e-2, 0.1
    gen = torch.Generator().manual_seed(2)
    w_star = torch.randn(N, generator=gen, dtype=torch.float64)
    w = w_star.expand(C, N).clone()
    grads = torch.randn(C, N, generator=gen, dtype=torch.float64)
    stat, z = torch.zeros(C, N, dtype=torch.float64), torch.full((C,), A, dtype=torch.float64)
    masks = [torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1, 0]), None, torch.tensor([0] * 6 + [1] * 4)]
    row_masks = RowMasks.from_dense(masks, [0, 1, 2])
    settings = SamplerSettings("sgnht", sgnht_diffusion=A)
    ids = torch.tensor([4, 0, 7])
    segments = [Segment(w[:, :4].contiguous(), grads[:, :4].contiguous(), 0, 0),
                Segment(w[:, 4:].contiguous(), grads[:, 4:].contiguous(), 4, 4)]
    prepared = torch_update.prepare(segments, w_star, stat, lr=lr, nbeta=20.0, gamma=1.0, settings=settings, seed=9,
                                    chain_ids=ids, mask=row_masks, thermostat=z)
    prepared.launch(StepCounters(3))
    dense = row_masks.dense(N).to(torch.float64)
    xi = philox.gaussian_noise(9, ids, 3, 0, N).to(torch.float64)
    col = torch.full((C, 1), 1.0, dtype=torch.float64)
    new, p, k = sgnht_step(w, grads, w_star, torch.zeros(C, N, dtype=torch.float64), A * col, xi, dense, lr=lr * col,
                           nbeta=20 * col, gamma=col, settings=settings)
    torch.testing.assert_close(torch.cat([s.w for s in segments], 1), new, rtol=0, atol=0)
    torch.testing.assert_close(stat, p, rtol=0, atol=0)
    assert bool((p[dense == 0] == 0).all()) and bool((new[dense == 0] == w[dense == 0]).all())
    count = dense.sum(1)
    torch.testing.assert_close(z, A + (p * p).sum(1) / count - lr, rtol=1e-14, atol=0)
    assert count.tolist() == [6.0, 10.0, 4.0]


def test_sgnht_samples_the_localized_posterior_on_a_quadratic():
    """Long SGNHT chains on K = sum_j h_j w_j^2 / 2 (the loss: the mean of R copies in one tensor, at nbeta*R):
    E[nbeta*K] per copy is the exact
    localized posterior value sum_j nbeta h_j / (2 (nbeta h_j + gamma)) within 4 batch-means standard errors plus
    the stated discretisation allowance, and the kinetic temperature <p^2>/lr (Ding's <p_D^2>) is 1.

    Discretisation allowance, relative: lr*a_max (Ding's step h = sqrt(lr) times the stiffest frequency, squared)
    plus A/2: the friction per step is z ~ A, and the positions run hotter than the momenta by ~1/(1 - z/2) (an
    O(A) bias at any lr: ``oracles.quadratic_sgnht_expectation`` is the discretised chain's exact value, met
    within 4 standard errors and 0.1 %)."""
    R, C, lr, nbeta, gamma, A = 256, 4, 1e-4, 10.0, 1.0, 0.05
    h = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    model = quadratic_model(R, h)
    layout, data = FlatLayout(model), [None]
    settings = SamplerSettings("sgnht", sgnht_diffusion=A)
    state = FlatState(layout, C, device=CPU, preconditioned=True, thermostat=A)
    engine, _ = local_engine(model, state, lambda m, b: m(), "vmap", lambda: [None] * C)
    hyper = ChainHyper(torch.full((C,), lr, dtype=torch.float64), torch.full((C,), nbeta * R, dtype=torch.float64),
                       torch.full((C,), gamma, dtype=torch.float64), torch.arange(C))
    schedule = Schedule(num_draws=2000, num_burnin_steps=500)
    init = initial_loss(engine, data, seed=0, num_batches=1, device=CPU)
    trace = run_chains(engine, state, data, LoopSettings(hyper, settings, schedule, seed=5),
                       backend=select_backend("auto", CPU, "sgnht"), device=CPU, init_loss=init)
    y = nbeta * (trace.loss_trace - init)
    exact = quadratic_posterior_expectation(h.numpy(), nbeta, gamma)
    discretised, z_star = quadratic_sgnht_expectation(h.numpy(), nbeta, gamma, lr, A)
    allowance = (lr * float((nbeta * h + gamma).max()) + A / 2) * exact
    se = batch_means_se(y, 10)
    assert se < 0.006 * exact  # the test tells the discretised chain (2.7 % above) from the posterior
    assert abs(y.mean() - exact) < 4 * se + allowance, f"{y.mean():.5f} vs {exact:.5f}, SE {se:.5f}"
    assert abs(y.mean() - discretised) < 4 * se + 1e-3 * exact, f"{y.mean():.5f} vs {discretised:.5f}, SE {se:.5f}"
    temperature = (state.stat ** 2 / lr).flatten()
    t_se = float(temperature.std() / math.sqrt(temperature.numel()))
    assert abs(float(temperature.mean()) - 1.0) < 4 * t_se + lr * float((nbeta * h + gamma).max()), \
        (float(temperature.mean()), t_se)
    torch.testing.assert_close(state.thermostat, torch.full((C,), z_star, dtype=torch.float64), rtol=0.05, atol=0)


def test_checkpoint_and_resume_of_an_sgnht_run_is_the_run_bit_for_bit(tmp_path):
    """The momentum and the thermostat are part of the saved rows: a run resumed from its checkpoints (mid-group
    and between two row groups) is the uninterrupted run."""
    model, loader, loss_fn = mlp_case()
    kw = dict(lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=4, num_draws=30, num_burnin_steps=6, progress=False, seed=3,
              sampler="sgnht", sgnht_diffusion=0.05, max_batched_chains=2)
    full = llc_fast.estimate_llc(model, loader, loss_fn, **kw)
    assert full.config["backend"] == "torch" and full.config["sgnht_diffusion"] == 0.05
    path = tmp_path / "run.ckpt"
    recording, seen = checkpoint_recorder(path, loss_fn)
    again = llc_fast.estimate_llc(model, loader, recording, checkpoint=str(path), checkpoint_every=7, **kw)
    np.testing.assert_array_equal(full.loss_trace, again.loss_trace)
    assert len(seen) >= 3
    for k, (_, blob) in enumerate(seen[:: max(1, len(seen) // 3)]):
        copy = tmp_path / f"copy{k}.ckpt"
        copy.write_bytes(blob)
        resumed = llc_fast.estimate_llc(model, loader, loss_fn, resume=str(copy), **kw)
        np.testing.assert_array_equal(full.loss_trace, resumed.loss_trace)
        np.testing.assert_array_equal(full.burnin_loss_trace, resumed.burnin_loss_trace)
    other = llc_fast.estimate_llc(model, loader, loss_fn, **dict(kw, sgnht_diffusion=0.2))
    assert not np.array_equal(full.loss_trace, other.loss_trace)  # A matters


@pytest.mark.parametrize("backend", [cpu_update, triton_update, cuda_update], ids=lambda b: b.name)
def test_the_fast_backends_refuse_sgnht_and_auto_picks_torch(backend):
    w = torch.zeros(2, 8)
    settings = SamplerSettings("sgnht")
    call_args = dict(lr=1e-3, nbeta=1.0, gamma=1.0, settings=settings, seed=0, chain_ids=torch.arange(2),
                     thermostat=torch.zeros(2))
    with pytest.raises(NotSupportedError, match="does not run sampler='sgnht'"):
        backend.prepare([Segment(w, torch.zeros_like(w), 0, 0)], torch.zeros(8), torch.zeros(2, 8), **call_args)
    assert select_backend("auto", CPU, "sgnht").name == "torch"
    with pytest.raises(RuntimeError, match="does not run sampler='sgnht'"):
        select_backend(backend.name, CPU, "sgnht")


def test_bad_options_are_refused():
    model, loader, loss_fn = mlp_case()
    kw = dict(lr=1e-3, nbeta=30.0, num_chains=2, num_draws=5, progress=False)
    cases = [(dict(sampler="sgnht", sgnht_diffusion=0.0), "sgnht_diffusion"),
             (dict(sampler="sgnht", sgnht_diffusion=float("nan")), "sgnht_diffusion"),
             (dict(sgnht_diffusion=0.1), "applies to sampler='sgnht'"),
             (dict(sampler="sgnht", mala_every=2), "takes no mala_every"),
             (dict(sampler="sgnht", freeze_preconditioner_at=3), "takes no freeze_preconditioner_at"),
             (dict(sampler="sgnht", preconditioner="curvature"), "pass sampler='sgld'")]
    for extra, match in cases:
        with pytest.raises(ValueError, match=match):
            llc_fast.estimate_llc(model, loader, loss_fn, **kw, **extra)
    with pytest.raises(ValueError, match="sgnht_diffusion"):
        SamplerSettings("sgnht", sgnht_diffusion=-1.0)
    w = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="needs thermostat"):
        torch_update.prepare([Segment(w, w.clone(), 0, 0)], torch.zeros(4), torch.zeros(2, 4), lr=1e-3, nbeta=1.0,
                             gamma=1.0, settings=SamplerSettings("sgnht"), seed=0, chain_ids=torch.arange(2))


# ---- the devinterp compatibility layer ---------------------------------------------------------------------------
def _steps(model, opt, steps=5):
    x, y = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)), torch.ones(3, 5)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _pair(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5))
    m2 = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5))
    m2.load_state_dict(m.state_dict())
    return m, m2


@pytest.mark.parametrize("box", [None, 0.01])
def test_compat_sgmcmc_sgnht_is_devinterps_sgld_with_noise_sqrt_2a(box):
    """devinterp's SGMCMC.sgnht never applies its thermostat: at diffusion_factor 0 it is plain gradient steps
    (devinterp's own optimizer, checked against it), and otherwise SGLD with noise level sqrt(2A) and the box."""
    from devinterp.optim.sgmcmc import SGMCMC as DevinterpSGMCMC

    from llc_fast.compat.devinterp import SGMCMC

    a, b = _pair()
    with pytest.warns(UserWarning):
        ours = _steps(a, SGMCMC.sgnht(a.parameters(), lr=0.1, diffusion_factor=0.0, bounding_box_size=box,
                                      nbeta=1.0, seed=1))
        theirs = _steps(b, DevinterpSGMCMC.sgnht(b.parameters(), lr=0.1, diffusion_factor=0.0,
                                                 bounding_box_size=box, nbeta=1.0))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    a, b = _pair()
    noisy = _steps(a, SGMCMC.sgnht(a.parameters(), lr=0.01, diffusion_factor=0.02, bounding_box_size=box, nbeta=3.0,
                                   seed=4))
    sgld = _steps(b, SGMCMC.sgld(b.parameters(), lr=0.01, noise_level=math.sqrt(0.04), bounding_box_size=box,
                                 nbeta=3.0, seed=4))
    torch.testing.assert_close(noisy, sgld, rtol=0, atol=0)


def test_compat_sgnht_class_steps_as_the_reference():
    """compat's SGNHT (devinterp's deprecated class) is the reference SGNHT step with gamma = 0: devinterp's loop
    with llc_fast's normals of (seed, chain, step, flat index), the thermostat shared by the param group."""
    from llc_fast.compat.devinterp.sgnht import SGNHT

    h = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    w0 = torch.linspace(-0.02, 0.03, 6, dtype=torch.float64)
    params = [nn.Parameter(w0[:2].clone()), nn.Parameter(w0[2:].clone())]
    with pytest.warns(DeprecationWarning):
        opt = SGNHT(params, lr=1e-3, diffusion_factor=0.05, nbeta=20.0, bounding_box_size=0.03, seed=7, chain=2)
    for _ in range(4):
        opt.zero_grad()
        (0.5 * h * torch.cat(params) ** 2).sum().backward()
        opt.step()
    noises = [[philox.gaussian_noise(7, torch.tensor([2]), t, 0, 6)[0, :2].double(),
               philox.gaussian_noise(7, torch.tensor([2]), t, 2, 4)[0].double()] for t in range(4)]
    expected = [w0[:2].clone(), w0[2:].clone()]
    momenta, z = devinterp_sgnht(expected, lambda ps: [h[:2] * ps[0], h[2:] * ps[1]], noises, lr=1e-3, nbeta=20.0,
                                 diffusion=0.05, box=0.03, steps=4)
    torch.testing.assert_close(torch.cat([p.detach() for p in params]), torch.cat(expected), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(torch.cat([opt.state[p]["momentum"] for p in params]), torch.cat(momenta),
                               rtol=1e-12, atol=1e-15)
    assert float(opt.param_groups[0]["thermostat"]) == pytest.approx(float(z), rel=1e-12)


def test_compat_v1_routes_sgnht_through_the_one_loop():
    """estimate_learning_coeff_with_summary: SGNHT runs llc_fast's sampler "sgnht" (gamma 0, A = diffusion_factor);
    SGMCMC.sgnht runs SGLD with noise level sqrt(2A), bit for bit the SGLD run with that noise level."""
    from torch.utils.data import DataLoader, TensorDataset

    from llc_fast.compat import devinterp as compat
    from llc_fast.compat.devinterp import v1

    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(3))
    loader = DataLoader(TensorDataset(x, x @ torch.ones(3, 1)), batch_size=16)
    model = nn.Linear(3, 1)

    def ev(m, batch):
        return nn.functional.mse_loss(m(batch[0]), batch[1])

    common = dict(num_chains=2, num_draws=10, seed=0, verbose=False)
    kw = dict(lr=1e-3, nbeta=20.0, diffusion_factor=0.125, bounding_box_size=0.5)
    assert v1._sampler_settings(compat.SGNHT, kw, loader, 1) == dict(
        sampler="sgnht", sgnht_diffusion=0.125, lr=1e-3, nbeta=20.0, gamma=0.0, box=0.5)
    assert v1._sampler_settings(compat.SGMCMC.sgnht, kw, loader, 1) == dict(
        sampler="sgld", noise_level=0.5, lr=1e-3, nbeta=20.0, gamma=0.0, box=0.5)
    r = compat.estimate_learning_coeff_with_summary(model, loader, evaluate=ev, sampling_method=compat.SGNHT,
                                                    optimizer_kwargs=kw, **common)
    assert np.isfinite(r["llc/mean"])
    a = compat.estimate_learning_coeff_with_summary(model, loader, evaluate=ev, sampling_method=compat.SGMCMC.sgnht,
                                                    optimizer_kwargs=kw, **common)
    b = compat.estimate_learning_coeff_with_summary(model, loader, evaluate=ev, sampling_method=compat.SGMCMC.sgld,
                                                    optimizer_kwargs=dict(lr=1e-3, nbeta=20.0, noise_level=0.5,
                                                                          bounding_box_size=0.5), **common)
    np.testing.assert_array_equal(a["loss/trace"], b["loss/trace"])
    assert a["llc/mean"] != r["llc/mean"]
    with pytest.raises(TypeError, match="does not take"):
        v1._sampler_settings(compat.SGNHT, dict(kw, localization=1.0), loader, 1)
