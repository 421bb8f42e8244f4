"""noise_scheme="lm" (Leimkuhler-Matthews): the reference step's noise is (xi_t + xi_{t+1})/2; on a quadratic the
draws have the exact localized posterior law at a step where "euler" is measurably hot, on the reference and the C++
kernel; resume is exact; every kernel's step is the reference's; a backend without it refuses it; bad combinations
are refused."""

import numpy as np
import pytest
import torch

import llc_fast
from llc_fast.kernels import SamplerSettings, StepCounters, philox, select_backend, torch_update
from llc_fast.kernels.backend import NotSupportedError
from llc_fast.kernels.cpu_update import cpu_update
from llc_fast.kernels.cuda_update import cuda_update
from llc_fast.kernels.triton_update import triton_update
from llc_fast.kernels.update_call import Segment
from llc_fast.oracles import quadratic_posterior_expectation, quadratic_sgld_expectation

from conftest import batch_means_se, checkpoint_recorder, mlp_case, quadratic_model, update_backend

CPU = torch.device("cpu")


def test_reference_noise_is_the_mean_of_this_and_the_next_steps_normals():
    """With a zero gradient, gamma = 0 and lr = 1, one step moves w by exactly (xi_t + xi_{t+1})/2 ("lm") or
    xi_t ("euler"), xi_t the counter-based normals of (seed, chain, step t, global index)."""
    C, n, seed, t, offset = 3, 37, 11, 5, 1000
    chains = torch.arange(C) + 2
    counters = philox.quad_counters(chains, offset, n, philox.STREAM_GAUSSIAN)
    xi = [philox.normals_at(counters, seed, s).to(torch.float64) for s in (t, t + 1)]
    for scheme, expected in (("euler", xi[0]), ("lm", 0.5 * (xi[0] + xi[1]))):
        w = torch.zeros(C, n, dtype=torch.float64)
        torch_update.prepare([Segment(w, torch.zeros_like(w), 0, offset)], torch.zeros(n, dtype=torch.float64), None,
                             lr=1.0, nbeta=1.0, gamma=0.0, settings=SamplerSettings(noise_scheme=scheme), seed=seed,
                             chain_ids=chains).launch(StepCounters(t))
        torch.testing.assert_close(w, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_lm_draws_have_the_exact_posterior_law_on_a_quadratic_where_euler_runs_hot(backend):
    """K = sum_j h_j w_j^2 / 2 with exact gradients, lr at 60 % of the stability limit 4/(nbeta·h_max + gamma):
    E[nbeta·K] per copy is the exact localized posterior value sum_j nbeta h_j / (2 (nbeta h_j + gamma)) for "lm"
    within 4 batch-means standard errors, and "euler" meets its own discretised value
    (``oracles.quadratic_sgld_expectation``, here ~19 % above), which the test tells apart."""
    R, C, nbeta, gamma = 64, 4, 10.0, 1.0
    h = torch.tensor([0.5, 1.0, 4.0, 16.0], dtype=torch.float64)
    lr = 0.6 * 4.0 / (nbeta * float(h.max()) + gamma)
    exact = quadratic_posterior_expectation(h.numpy(), nbeta, gamma)
    hot = quadratic_sgld_expectation(h.numpy(), nbeta, gamma, lr)
    assert hot > 1.1 * exact
    for scheme, target in (("lm", exact), ("euler", hot)):
        model = quadratic_model(R, h)
        r = llc_fast.estimate_llc(model, [()], lambda m, b: m(), lr=lr, nbeta=nbeta * R, gamma=gamma, num_chains=C,
                                  num_draws=3000, num_burnin_steps=200, noise_scheme=scheme, seed=4, progress=False,
                                  num_init_loss_batches=1, backend=backend)
        y = nbeta * r.loss_trace  # nbeta·K per copy (the run's nbeta·R times the mean over R copies, over R)
        se = batch_means_se(y, 10)
        assert se < 0.02 * exact
        assert abs(y.mean() - target) < 4 * se, f"{scheme}: {y.mean():.4f} vs {target:.4f}, SE {se:.4f}"


def test_checkpoint_and_resume_of_an_lm_run_is_the_run_bit_for_bit(tmp_path):
    """The next step's normals are regenerated from the counter: a resumed run is the uninterrupted one."""
    model, loader, loss_fn = mlp_case()
    kw = dict(lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=4, num_draws=30, num_burnin_steps=6, progress=False, seed=3,
              noise_scheme="lm", max_batched_chains=2)
    full = llc_fast.estimate_llc(model, loader, loss_fn, **kw)
    assert full.config["noise_scheme"] == "lm"
    path = tmp_path / "run.ckpt"
    recording, seen = checkpoint_recorder(path, loss_fn)
    again = llc_fast.estimate_llc(model, loader, recording, checkpoint=str(path), checkpoint_every=7, **kw)
    np.testing.assert_array_equal(full.loss_trace, again.loss_trace)
    blob = seen[len(seen) // 2][1]
    copy = tmp_path / "copy.ckpt"
    copy.write_bytes(blob)
    resumed = llc_fast.estimate_llc(model, loader, loss_fn, resume=str(copy), **kw)
    np.testing.assert_array_equal(full.loss_trace, resumed.loss_trace)
    euler = llc_fast.estimate_llc(model, loader, loss_fn, **dict(kw, noise_scheme="euler"))
    assert not np.array_equal(full.loss_trace, euler.loss_trace)
    with pytest.raises(ValueError, match="same|config|noise_scheme"):
        llc_fast.estimate_llc(model, loader, loss_fn, resume=str(copy), **dict(kw, noise_scheme="euler"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld_bc"])
@pytest.mark.parametrize("kernel", ["cpu", pytest.param("triton", marks=pytest.mark.gpu),
                                    pytest.param("cuda", marks=pytest.mark.gpu)])
def test_every_kernel_runs_lm_as_the_reference(kernel, dtype, sampler):
    """The C++, Triton and CUDA kernels' "lm" step (Triton interpreted on a CPU; CUDA on a GPU only) equals the
    reference's within the tolerance of their normals (docs/noise.md: ~1e-6 of a normal), for two segments at odd
    offsets, a mask and every parameter dtype; bfloat16 keys the same stochastic rounding (one ulp apart at most)."""
    backend, device = update_backend(kernel)
    gen = torch.Generator().manual_seed(3)
    C, n1, n2 = 3, 45, 70
    w0 = [(torch.randn(C, k, generator=gen) * 0.1).to(dtype) for k in (n1, n2)]
    grads = [torch.randn(C, k, generator=gen).to(dtype) for k in (n1, n2)]
    w_star = torch.randn(n1 + n2, generator=gen).to(dtype)
    mask = torch.rand(n1 + n2, generator=gen) > 0.2
    settings = SamplerSettings(sampler=sampler, noise_scheme="lm")
    outs = []
    for update, where in ((torch_update, CPU), (backend, device)):
        ws = [w.clone().to(where) for w in w0]
        stat = None if sampler == "sgld" else torch.ones(C, n1 + n2, dtype=torch.float64 if dtype == torch.float64
                                                          else torch.float32, device=where)
        segs = [Segment(ws[0], grads[0].to(where), 0, 7), Segment(ws[1], grads[1].to(where), n1, 1001)]
        update.prepare(segs, w_star.to(where), stat, lr=2e-3, nbeta=torch.tensor([10.0, 20.0, 30.0], device=where),
                       gamma=5.0, mask=mask.to(where), settings=settings, seed=9,
                       chain_ids=torch.tensor([0, 5, 2], device=where)).launch(StepCounters(12))
        outs.append([w.cpu() for w in ws])
    assert (outs[0][0].double() - w0[0].double()).abs().max() > 0
    for a, b in zip(*outs):
        if dtype == torch.bfloat16:
            torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-6)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * (2e-3) ** 0.5)


def test_a_backend_without_lm_refuses_it_and_auto_passes_it_over():
    """A backend declares the noise schemes it runs (``Backend.noise_schemes``, "euler" unless it says more):
    one without "lm" refuses such a call saying so; every backend here runs it, and "auto" picks as for "euler"."""
    class EulerOnly(type(cpu_update)):
        name, noise_schemes = "euler-only", ("euler",)

    w = torch.zeros(2, 8)
    with pytest.raises(NotSupportedError, match="does not run noise_scheme='lm'"):
        EulerOnly().prepare([Segment(w, torch.zeros_like(w), 0, 0)], torch.zeros(8), None, lr=1e-3, nbeta=1.0,
                            gamma=1.0, settings=SamplerSettings(noise_scheme="lm"), seed=0, chain_ids=torch.arange(2))
    assert all("lm" in b.noise_schemes for b in (torch_update, cpu_update, triton_update, cuda_update))
    assert select_backend("auto", CPU, "sgld", "lm").name == select_backend("auto", CPU, "sgld").name


def test_bad_noise_schemes_are_refused():
    model, loader, loss_fn = mlp_case()
    kw = dict(lr=1e-3, nbeta=30.0, num_chains=2, num_draws=5, progress=False)
    with pytest.raises(ValueError, match="noise_scheme"):
        llc_fast.estimate_llc(model, loader, loss_fn, noise_scheme="heun", **kw)
    with pytest.raises(ValueError, match="sampler='sgnht' takes noise_scheme='euler'"):
        llc_fast.estimate_llc(model, loader, loss_fn, noise_scheme="lm", sampler="sgnht", **kw)
