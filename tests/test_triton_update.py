"""The Triton update against the reference update and the reference noise.

On machines without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); with a GPU the same tests run on CUDA tensors.

Tolerances, all derived from the noise specification (docs/noise.md): random words and
uniforms are bit-exact; normals agree within XI_TOL = 1e-5 absolute (float32 log/cos/sin/sqrt
differ by an ulp or two between torch, numpy and CUDA). An updated weight differs from the
reference by the noise coefficient times the normals' difference, plus rounding:

    |w_kernel - w_ref| <= noise_level * sqrt(lr * G) * XI_TOL
                          + ULPS * u * (|w| + |drift term| + |noise term|)

with u the unit roundoff step of the compute dtype (2**-23 for float32, 2**-52 for float64),
ULPS = 4 (the GPU may fuse multiply-adds and round G differently by an ulp), drift term
(lr/2) * G * |d| and noise term noise_level * sqrt(lr * G) * |xi|. The clamp to the box is
1-Lipschitz and the mask multiplies by 0 or 1, so neither widens the bound.
"""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
import triton.language as tl

from llc_fast.kernels import philox
from llc_fast.kernels.torch_update import reference_update
from llc_fast.kernels.triton_kernels import interleave, noise_tile, philox_words, rounding_tile
from llc_fast.kernels.triton_update import triton_update
from llc_fast.kernels.update_spec import KERNEL_SAMPLERS as SAMPLERS, SamplerSettings, StepCounters

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
pytestmark = pytest.mark.gpu  # the Triton kernel: on CUDA tensors with a GPU, else in the interpreter
XI_TOL = 1e-5
ULPS = 4


# --------------------------------------------------------------------------------------------
# The noise: a debug kernel that runs the kernel's own noise helpers on explicit counters.
# --------------------------------------------------------------------------------------------


@triton.jit
def _debug_noise_kernel(words_ptr, unif_ptr, normal_ptr, round_ptr, seed, step, chain, g_first, count,
                        LEAD: tl.constexpr, QUADS: tl.constexpr):
    """Elements [4*g_first + LEAD, ... + count) of one chain: stream-0 words, uniforms, normals, stream-1 words."""
    local_quad = tl.arange(0, QUADS).to(tl.int64)
    groups = g_first + local_quad
    idx = local_quad[:, None] * 4 + tl.arange(0, 4)[None, :] - LEAD
    valid = (idx >= 0) & (idx < count)
    w0, w1, w2, w3 = philox_words(seed, groups, step, chain, 0)
    tl.store(words_ptr + idx, interleave(w0, w1, w2, w3), mask=valid)
    u = interleave(tl.uint_to_uniform_float(w0), tl.uint_to_uniform_float(w1),
                    tl.uint_to_uniform_float(w2), tl.uint_to_uniform_float(w3))
    tl.store(unif_ptr + idx, u, mask=valid)
    tl.store(normal_ptr + idx, noise_tile(seed, groups, step, chain), mask=valid)
    tl.store(round_ptr + idx, rounding_tile(seed, groups, step, chain), mask=valid)


def _kernel_noise(seed, chain, step, start, count):
    words = torch.full((count,), -1, dtype=torch.int64, device=DEVICE)
    unif = torch.full((count,), -1.0, dtype=torch.float32, device=DEVICE)
    normal = torch.full((count,), -100.0, dtype=torch.float32, device=DEVICE)
    rounding = torch.full((count,), -1, dtype=torch.int64, device=DEVICE)
    lead = start % 4
    groups = triton.next_power_of_2(max(1, (lead + count + 3) // 4))
    _debug_noise_kernel[(1,)](words, unif, normal, rounding, seed, step, chain, start // 4, count,
                              LEAD=lead, QUADS=groups)
    return words.cpu(), unif.cpu(), normal.cpu(), rounding.cpu()


NOISE_CASES = [  # seed, chain, step, first global index, count
    (0, 0, 0, 0, 8),
    (1, 1, 1, 1, 13),
    (12345, 7, 3, 2**33 + 5, 1000),
    (2**32 + 9, 2, 2**31 + 1, 6, 257),
    (2**63 + 17, 3, 2**31, 2**40 + 3, 37),
    (2**64 - 1, 2**31 - 1, 2**32 - 1, 2**62 - 40, 40),
]


@pytest.mark.parametrize("seed, chain, step, start, count", NOISE_CASES)
def test_kernel_noise_matches_reference(seed, chain, step, start, count):
    words, unif, normal, rounding = _kernel_noise(seed, chain, step, start, count)
    ids = torch.tensor([chain])
    ref_words, first = philox.quad_words(seed, ids, step, start, count, philox.STREAM_GAUSSIAN)
    ref_words = philox.per_element(ref_words, first, start, count)[0]
    assert torch.equal(words, ref_words)
    ref_unif = philox.uniform_from_word(ref_words)
    assert torch.equal(unif, ref_unif)  # bit-exact
    ref_normal = philox.gaussian_noise(seed, ids, step, start, count)[0]
    assert (normal - ref_normal).abs().max().item() <= XI_TOL
    assert torch.equal(rounding, philox.rounding_words(seed, ids, step, start, count)[0])


def test_kernel_noise_known_answer():
    """Philox4x32-10 of an all-zero counter and key: the published known-answer vector."""
    words, _, _, _ = _kernel_noise(0, 0, 0, 0, 4)
    assert words.tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_kernel_noise_is_layout_invariant():
    """A range cut anywhere gives the same values as the whole range."""
    words, unif, normal, _ = _kernel_noise(99, 5, 17, 2**33 + 1, 64)
    for cut in (1, 2, 3, 5, 30):
        w2, u2, n2, _ = _kernel_noise(99, 5, 17, 2**33 + 1 + cut, 64 - cut)
        assert torch.equal(w2, words[cut:])
        assert torch.equal(u2, unif[cut:])
        assert torch.equal(n2, normal[cut:])


# --------------------------------------------------------------------------------------------
# The update against the reference.
# --------------------------------------------------------------------------------------------


VARIANTS = {
    # scalar hyperparameters, nothing optional; seed 1 and step 1 would be specialised by Triton
    "plain": dict(lr=1e-3, nbeta=20.0, gamma=50.0, wd=0.0, box=None, noise=1.0, mask=None,
                  offset=0, seed=1, step=1, stat_step=1, update_statistic=True, chains=[0, 1, 2]),
    # everything at once: per-chain vectors, weight decay, bool mask, box, offset past 2**32,
    # chain indices that are not a range (read from the device), a 64-bit seed and step
    "full": dict(lr=[1e-3, 2e-3, 5e-4], nbeta=[10.0, 20.0, 30.0], gamma=100.0, wd=0.01, box=0.05,
                 noise=0.7, mask="bool", offset=2**33 + 5, seed=2**32 + 7, step=2**31 + 3,
                 stat_step=2**31 + 3, update_statistic=True, chains=[4, 0, 9]),
    # frozen preconditioner (V not written, s_t of an earlier step), offset not a multiple of 4,
    # float mask, a seed past 2**63, chain indices a range not starting at 0
    "frozen": dict(lr=3e-4, nbeta=[5.0, 50.0, 500.0], gamma=[1.0, 10.0, 100.0], wd=0.1, box=None,
                   noise=1.0, mask="float", offset=3, seed=2**63 + 11, step=9, stat_step=5,
                   update_statistic=False, chains=[7, 8, 9]),
}


def _make_inputs(dtype, num_chains, n, sampler, v, gen):
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    w_star = (0.5 * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype)
    w = (w_star.double() + 0.1 * torch.randn(num_chains, n, generator=gen, dtype=torch.float64)).to(dtype)
    grad = torch.randn(num_chains, n, generator=gen, dtype=torch.float64).to(dtype)
    settings = SamplerSettings(sampler=sampler, weight_decay=v["wd"], box=v["box"], noise_level=v["noise"])
    stat = None
    if settings.preconditioned:
        stat = (settings.initial_statistic + 0.01 * torch.rand(num_chains, n, generator=gen, dtype=torch.float64))
        stat = stat.to(cdt)
    mask = None
    if v["mask"] == "bool":
        mask = torch.rand(n, generator=gen) > 0.3
    elif v["mask"] == "float":
        mask = (torch.rand(n, generator=gen) > 0.5).to(torch.float32)
    hyper = {k: (torch.tensor(v[k], dtype=torch.float64) if isinstance(v[k], list) else v[k])
             for k in ("lr", "nbeta", "gamma")}
    kwargs = dict(**hyper, settings=settings,
                  counters=StepCounters(step=v["step"], update_statistic=v["update_statistic"],
                                        stat_step=v["stat_step"]),
                  seed=v["seed"], chain_ids=torch.tensor(v["chains"]), mask=mask, index_offset=v["offset"])
    return w, grad, w_star, stat, kwargs


def _embedded(t, pad=16):
    """A copy of ``t`` inside a buffer with sentinel values around it: (view, buffer)."""
    if t is None:
        return None, None
    buf = torch.full((t.numel() + 2 * pad,), 12345.0, dtype=torch.float64).to(t.dtype).to(DEVICE)
    view = buf[pad : pad + t.numel()].view(t.shape)
    view.copy_(t.to(DEVICE))
    return view, buf


def _run_kernel(w, grad, w_star, stat, kwargs):
    """Run triton_update on device copies; checks that nothing outside w and stat was written."""
    wk, wbuf = _embedded(w)
    sk, sbuf = _embedded(stat)
    wbuf0 = wbuf.clone()
    sbuf0 = sbuf.clone() if sbuf is not None else None
    g_d, ws_d = grad.to(DEVICE), w_star.to(DEVICE)
    inputs = [g_d.clone(), ws_d.clone()]
    mask = kwargs["mask"]
    kwargs = dict(kwargs, mask=None if mask is None else mask.to(DEVICE))
    triton_update(wk, g_d, ws_d, sk, **kwargs)
    pad = 16
    assert torch.equal(wbuf[:pad], wbuf0[:pad]) and torch.equal(wbuf[-pad:], wbuf0[-pad:])
    if sbuf is not None:
        assert torch.equal(sbuf[:pad], sbuf0[:pad]) and torch.equal(sbuf[-pad:], sbuf0[-pad:])
    assert torch.equal(g_d, inputs[0]) and torch.equal(ws_d, inputs[1])
    return wk.cpu(), (sk.cpu() if sk is not None else None)


def _tolerance(w, grad, w_star, stat_after, kwargs, unit):
    """The per-element bound of the module docstring, in float64."""
    settings, counters = kwargs["settings"], kwargs["counters"]
    num_chains, n = w.shape

    def col(x):
        return torch.as_tensor(x, dtype=torch.float64).expand(num_chains)[:, None]

    lr, nbeta, gamma = col(kwargs["lr"]), col(kwargs["nbeta"]), col(kwargs["gamma"])
    wc, g, ws = w.double(), grad.double(), w_star.double()
    if settings.preconditioned:
        precond = 1.0 / (torch.sqrt(stat_after.double() * settings.statistic_scale(counters.stat_step))
                         + settings.rmsprop_eps)
    else:
        precond = torch.ones_like(wc)
    d = nbeta * g + gamma * (wc - ws) + settings.weight_decay * wc
    xi = philox.gaussian_noise(kwargs["seed"], kwargs["chain_ids"], counters.step, kwargs["index_offset"], n).double()
    noise_coef = settings.noise_level * torch.sqrt(lr * precond)
    drift_term = 0.5 * lr * precond * d.abs()
    noise_term = noise_coef * xi.abs()
    return noise_coef * XI_TOL + ULPS * unit * (wc.abs() + drift_term + noise_term)


def _check_stat(stat, stat_ref, stat_k, kwargs):
    if stat is None:
        return
    if kwargs["counters"].update_statistic:
        assert torch.allclose(stat_k, stat_ref, rtol=1e-6, atol=0.0)
        assert not torch.equal(stat_ref, stat)  # the step did update V
    else:
        assert torch.equal(stat_k, stat)  # V not written
        assert torch.equal(stat_ref, stat)


def _reference(w, grad, w_star, stat, kwargs):
    w_ref, stat_ref = w.clone(), (stat.clone() if stat is not None else None)
    reference_update(w_ref, grad, w_star, stat_ref, **kwargs)
    return w_ref, stat_ref


def _check_masked_and_box(w, w_k, w_ref, w_star, kwargs):
    """Masked weights do not move (the reference, and the kernel, still clamp them to the box);
    the others do; the box holds (up to the rounding of the stored value)."""
    mask, box = kwargs["mask"], kwargs["settings"].box
    if mask is not None:
        frozen = ~mask.bool()
        assert torch.equal(w_k[:, frozen], w_ref[:, frozen])
        if box is None:
            assert torch.equal(w_k[:, frozen], w[:, frozen])
        if (~frozen).any():
            assert (w_k[:, ~frozen] != w[:, ~frozen]).any()
    if box is not None:
        dist = (w_k.double() - w_star.double()).abs()
        # w* +- box is rounded in the compute dtype; a bf16 result by one bf16 ulp on top
        slack = 2.0**-22 * (w_star.double().abs() + box)
        if w.dtype == torch.bfloat16:
            slack = slack + 2.0**-7 * w_k.double().abs()
        assert (dist <= box + slack).all()
        if w.numel() > 1000:
            assert (dist >= box - slack).any() and (dist < box - slack).any()  # the box is active, not everywhere


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("n", [1, 3, 4097, 70000])
def test_update_matches_reference_float32(n, sampler, variant):
    gen = torch.Generator().manual_seed(n * 31 + SAMPLERS.index(sampler))
    v = VARIANTS[variant]
    w, grad, w_star, stat, kwargs = _make_inputs(torch.float32, 3, n, sampler, v, gen)
    w_ref, stat_ref = _reference(w, grad, w_star, stat, kwargs)
    w_k, stat_k = _run_kernel(w, grad, w_star, stat, kwargs)
    tol = _tolerance(w, grad, w_star, stat_ref, kwargs, 2.0**-23)
    err = (w_k.double() - w_ref.double()).abs()
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"
    _check_stat(stat, stat_ref, stat_k, kwargs)
    _check_masked_and_box(w, w_k, w_ref, w_star, kwargs)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_update_matches_reference_float64(sampler, variant):
    gen = torch.Generator().manual_seed(7 + SAMPLERS.index(sampler))
    w, grad, w_star, stat, kwargs = _make_inputs(torch.float64, 3, 4097, sampler, VARIANTS[variant], gen)
    w_ref, stat_ref = _reference(w, grad, w_star, stat, kwargs)
    w_k, stat_k = _run_kernel(w, grad, w_star, stat, kwargs)
    assert w_k.dtype == torch.float64
    tol = _tolerance(w, grad, w_star, stat_ref, kwargs, 2.0**-52)
    assert ((w_k - w_ref).abs() <= tol).all()
    _check_stat(stat, stat_ref, stat_k, kwargs)
    _check_masked_and_box(w, w_k, w_ref, w_star, kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_update_without_noise_is_exact_arithmetic(dtype, sampler):
    """With noise_level = 0 only the arithmetic remains: within ULPS ulps of the compute dtype
    (a float64 update computed in float32 would be off by ~1e-8 and fail). Plain SGLD uses only
    +, -, * and is bit-exact in the interpreter; the preconditioner's square root is not, since
    torch's CPU float32 sqrt is not correctly rounded (1 ulp off in ~18% of values; the kernel's
    sqrt_rn is), nor on a GPU (fused multiply-adds)."""
    gen = torch.Generator().manual_seed(3)
    v = dict(VARIANTS["full"], noise=0.0)
    w, grad, w_star, stat, kwargs = _make_inputs(dtype, 3, 4097, sampler, v, gen)
    w_ref, stat_ref = _reference(w, grad, w_star, stat, kwargs)
    w_k, stat_k = _run_kernel(w, grad, w_star, stat, kwargs)
    unit = 2.0**-52 if dtype == torch.float64 else 2.0**-23
    assert ((w_k - w_ref).abs() <= _tolerance(w, grad, w_star, stat_ref, kwargs, unit)).all()
    if not ON_GPU and sampler == "sgld":
        assert torch.equal(w_k, w_ref)
    if stat is not None:
        assert torch.allclose(stat_k, stat_ref, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0.0)


def test_consecutive_steps_match_reference():
    """Three steps of the bias-corrected sampler with a running statistic."""
    gen = torch.Generator().manual_seed(11)
    v = dict(VARIANTS["full"], step=0, stat_step=0)
    w, grad, w_star, stat, kwargs = _make_inputs(torch.float32, 3, 1000, "rmsprop_sgld_bc", v, gen)
    for step in range(3):
        kwargs["counters"] = StepCounters(step=step, stat_step=step)
        grad = torch.randn(w.shape, generator=gen)
        w_ref, stat_ref = _reference(w, grad, w_star, stat, kwargs)
        w_k, stat_k = _run_kernel(w, grad, w_star, stat, kwargs)
        assert ((w_k.double() - w_ref.double()).abs() <= _tolerance(w, grad, w_star, stat_ref, kwargs, 2.0**-23)).all()
        assert torch.allclose(stat_k, stat_ref, rtol=1e-6, atol=0.0)
        w, stat = w_ref, stat_ref


# --------------------------------------------------------------------------------------------
# bfloat16: stochastic rounding.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("n", [3, 4097, 70000])
def test_update_matches_reference_bfloat16(n, sampler, variant):
    """Same random bits, so the same rounding except where the float32 values before rounding
    differ (by an ulp, through the normals) across a rounding threshold: probability about
    2**-16 per element. Allowed: 0.1% of the elements (at least one), each one bf16 ulp off."""
    gen = torch.Generator().manual_seed(n + 5 * SAMPLERS.index(sampler))
    w, grad, w_star, stat, kwargs = _make_inputs(torch.bfloat16, 3, n, sampler, VARIANTS[variant], gen)
    w_ref, stat_ref = _reference(w, grad, w_star, stat, kwargs)
    w_k, stat_k = _run_kernel(w, grad, w_star, stat, kwargs)
    assert w_k.dtype == torch.bfloat16
    bits_k = w_k.view(torch.int16).to(torch.int32)
    bits_r = w_ref.view(torch.int16).to(torch.int32)
    differ = bits_k != bits_r
    assert differ.sum().item() <= max(1, 1e-3 * differ.numel())
    assert ((bits_k - bits_r).abs() <= 1).all()
    if stat is not None:
        _check_stat(stat, stat_ref, stat_k, kwargs)
    _check_masked_and_box(w, w_k, w_ref, w_star, kwargs)


def test_bfloat16_stochastic_rounding_is_unbiased():
    """C = 64 chains x N = 1024 elements, all chains at the same weights; the float32 update is
    0.2-10% of a bf16 ulp (round to nearest would never move a weight). Element i is stored one
    ulp away from zero with probability p_i = (bits(x_i) mod 2**16) / 2**16, independently per
    chain (each chain has its own Philox stream), so the number of moves U is a sum of 65536
    Bernoulli(p_i): E[U] = 64 sum p_i, Var[U] = 64 sum p_i (1 - p_i). The mean of the stored
    values then equals the mean of the float32 values up to (U - E[U]) ulp / (C N), and we require
    |U - E[U]| <= 5 sqrt(Var[U]) (a false failure has probability below 1e-6)."""
    num_chains, n = 64, 1024
    gen = torch.Generator().manual_seed(2024)
    ulp = 2.0**-7  # bf16 spacing on [1, 2)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    base = sign * (1.0 + ulp * torch.randint(0, 100, (n,), generator=gen))  # on the bf16 grid
    frac = 0.002 + 0.098 * torch.rand(n, generator=gen)  # fraction of an ulp to move outwards
    lr, nbeta = 1e-6, 1.0
    grad_row = -sign * frac * ulp / (0.5 * lr * nbeta)  # delta = -(lr/2) * nbeta * g = sign * frac * ulp
    w = base.to(torch.bfloat16).expand(num_chains, n).contiguous()
    w_star = base.to(torch.bfloat16)
    grad = grad_row.to(torch.bfloat16).expand(num_chains, n).contiguous()
    settings = SamplerSettings(sampler="sgld", noise_level=0.0)
    kwargs = dict(lr=lr, nbeta=nbeta, gamma=0.0, settings=settings, counters=StepCounters(step=5),
                  seed=77, chain_ids=torch.arange(num_chains), mask=None, index_offset=2**33 + 2)
    w_k, _ = _run_kernel(w, grad, w_star, None, kwargs)

    # The float32 values before rounding, computed as the kernel does (noise_level = 0).
    x = w[0].float() + (-(0.5 * torch.tensor(lr, dtype=torch.float32))) * (nbeta * grad[0].float())
    assert (x != w[0].float()).all()
    p = (x.view(torch.int32).to(torch.int64) & 0xFFFF).double() / 2.0**16
    assert 0.001 < p.min().item() and p.max().item() < 0.11
    moved = (w_k != w).double()
    lo = w[0].float().double()
    assert ((w_k.double() - lo).abs() <= ulp * (1 + 1e-9)).all()  # only the two neighbours
    mean_up, var_up = num_chains * p.sum().item(), num_chains * (p * (1 - p)).sum().item()
    assert abs(moved.sum().item() - mean_up) <= 5 * math.sqrt(var_up)
    # The same statement for the mean of the stored values against the float32 values.
    bias = (w_k.double() - x.double()).mean().item()
    assert abs(bias) <= 5 * math.sqrt(var_up) * ulp / (num_chains * n)
    # Round to nearest would give zero moves; the rounding must be the reference's, bit for bit.
    w_ref, _ = _reference(w, grad, w_star, None, kwargs)
    assert torch.equal(w_k, w_ref)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_bfloat16_non_finite_values_round_to_nearest():
    """Overflow to +-inf stays infinite; NaN stays NaN (its bit pattern is not specified: torch's
    own float32 -> bfloat16 conversions give 0x7FC0 or 0xFFFF depending on the code path)."""
    w = torch.tensor([[3.0e38, -3.0e38, float("nan"), 1.0]], dtype=torch.bfloat16)
    grad = torch.tensor([[-2.0e38, 2.0e38, 0.0, 0.0]], dtype=torch.bfloat16)  # delta = -g/2
    w_star = torch.zeros(4, dtype=torch.bfloat16)
    kwargs = dict(lr=1.0, nbeta=1.0, gamma=0.0, settings=SamplerSettings(noise_level=0.0),
                  counters=StepCounters(step=0), seed=3, chain_ids=torch.tensor([0]), mask=None, index_offset=0)
    w_k, _ = _run_kernel(w, grad, w_star, None, kwargs)
    w_ref, _ = _reference(w, grad, w_star, None, kwargs)
    not_nan = [0, 1, 3]
    assert torch.equal(w_k.view(torch.int16)[:, not_nan], w_ref.view(torch.int16)[:, not_nan])
    assert w_k[0, 0].item() == float("inf") and w_k[0, 1].item() == -float("inf")
    assert torch.isnan(w_k[0, 2]) and torch.isnan(w_ref[0, 2])


# --------------------------------------------------------------------------------------------
# Inputs, launches, 64-bit sizes.
# --------------------------------------------------------------------------------------------


def _good_args(sampler="rmsprop_sgld"):
    w = torch.zeros(2, 8, device=DEVICE)
    kwargs = dict(lr=1e-3, nbeta=1.0, gamma=1.0, settings=SamplerSettings(sampler=sampler),
                  counters=StepCounters(step=0), seed=0, chain_ids=torch.tensor([0, 1]))
    return w, torch.zeros_like(w), torch.zeros(8, device=DEVICE), torch.zeros_like(w), kwargs


@pytest.mark.parametrize("case", [
    "w_1d", "w_int", "w_half", "grad_shape", "grad_dtype", "w_star_shape", "w_star_dtype", "stat_missing",
    "stat_dtype", "stat_shape", "mask_shape", "lr_shape", "chain_ids_shape", "chain_ids_float", "chain_id_range",
    "negative_offset", "step_range", "seed_range", "non_contiguous",
])
def test_bad_inputs_raise_value_error(case):
    w, grad, w_star, stat, kwargs = _good_args()
    if case == "w_1d":
        w = w[0]
    elif case == "w_int":
        w = w.to(torch.int32)
    elif case == "w_half":
        w, grad, w_star = w.half(), grad.half(), w_star.half()
    elif case == "grad_shape":
        grad = grad[:, :4].contiguous()
    elif case == "grad_dtype":
        grad = grad.double()
    elif case == "w_star_shape":
        w_star = torch.zeros(7, device=DEVICE)
    elif case == "w_star_dtype":
        w_star = w_star.double()
    elif case == "stat_missing":
        stat = None
    elif case == "stat_dtype":
        stat = stat.double()
    elif case == "stat_shape":
        stat = stat[:1].contiguous()
    elif case == "mask_shape":
        kwargs["mask"] = torch.ones(7, device=DEVICE)
    elif case == "lr_shape":
        kwargs["lr"] = torch.tensor([1e-3, 1e-3, 1e-3])
    elif case == "chain_ids_shape":
        kwargs["chain_ids"] = torch.tensor([0, 1, 2])
    elif case == "chain_ids_float":
        kwargs["chain_ids"] = torch.tensor([0.0, 1.0])
    elif case == "chain_id_range":
        kwargs["chain_ids"] = torch.tensor([0, 2**31])
    elif case == "negative_offset":
        kwargs["index_offset"] = -4
    elif case == "step_range":
        kwargs["counters"] = StepCounters(step=2**32)
    elif case == "seed_range":
        kwargs["seed"] = -1
    elif case == "non_contiguous":
        w = torch.zeros(8, 2, device=DEVICE).t()
    w0 = w.clone()
    with pytest.raises(ValueError):
        triton_update(w, grad, w_star, stat, **kwargs)
    if w.shape == w0.shape and w.dtype == w0.dtype:
        assert torch.equal(w, w0)  # nothing written before the error


@pytest.fixture
def launches(monkeypatch) -> list:
    """The grids of the single-buffer Triton kernel's launches during the test."""
    from llc_fast.kernels import triton_kernels as module

    grids = []
    kernel = module.sgld_update_kernel

    class Counting:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(module, "sgld_update_kernel", Counting())
    return grids


def test_empty_buffers_are_a_no_op(launches):
    """No elements or no chains: nothing is launched and nothing changes (the other arguments stay checked)."""
    w, grad, w_star, stat, kwargs = _good_args()
    before = (w.clone(), stat.clone())
    triton_update(w[:, :0].contiguous(), grad[:, :0].contiguous(), w_star[:0], stat[:, :0].contiguous(), **kwargs)
    kwargs["chain_ids"] = torch.zeros(0, dtype=torch.int64)
    triton_update(w[:0], grad[:0], w_star, stat[:0], **kwargs)
    assert launches == []
    assert torch.equal(w, before[0]) and torch.equal(stat, before[1])
    with pytest.raises(ValueError, match="seed"):  # empty, but a bad argument is still an error
        triton_update(w[:0], grad[:0], w_star, stat[:0], **dict(kwargs, seed=-1))


def test_one_launch_per_step(launches):
    """All chains of a step in a single kernel launch."""
    gen = torch.Generator().manual_seed(0)
    w, grad, w_star, stat, kwargs = _make_inputs(torch.float32, 3, 4097, "rmsprop_sgld", VARIANTS["full"], gen)
    _run_kernel(w, grad, w_star, stat, kwargs)
    assert len(launches) == 1


@pytest.mark.skipif(not ON_GPU or torch.cuda.get_device_properties(0).total_memory < 24 * 2**30,
                    reason="needs a GPU with 24 GiB: a buffer of more than 2**31 elements")
def test_more_than_2_31_elements_on_gpu():
    """One chain of 2**31 + 12 bfloat16 elements (local indices past 2**31, not only the offset)."""
    n = 2**31 + 12
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    w = torch.randn(1, n, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    grad = torch.randn(1, n, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    w_star = torch.zeros(n, device=DEVICE, dtype=torch.bfloat16)
    kwargs = dict(lr=1e-3, nbeta=10.0, gamma=1.0, settings=SamplerSettings(), counters=StepCounters(step=4),
                  seed=5, chain_ids=torch.tensor([2]), mask=None, index_offset=6)
    heads = [(0, 1000), (2**31 - 500, 1000), (n - 1000, 1000)]
    before = [(w[:, a : a + c].clone(), grad[:, a : a + c].clone(), w_star[a : a + c].clone()) for a, c in heads]
    triton_update(w, grad, w_star, None, **kwargs)
    for (a, c), (w0, g0, ws0) in zip(heads, before):
        w_ref, _ = _reference(w0, g0, ws0, None, dict(kwargs, index_offset=6 + a))
        bits_k = w[:, a : a + c].view(torch.int16).int()
        bits_r = w_ref.view(torch.int16).int()
        assert (bits_k != bits_r).sum().item() <= 2
        assert ((bits_k - bits_r).abs() <= 1).all()


# --------------------------------------------------------------------------------------------
# The kernel compiles for the GPUs it targets (ahead of time, no GPU needed).
# --------------------------------------------------------------------------------------------

_AOT_SCRIPT = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from llc_fast.kernels.triton_kernels import sgld_update_kernel as k
    from llc_fast.kernels.triton_update import GPU_QUADS, GPU_NUM_WARPS

    def compile(arch, weights, stat, f64, bf16, row=False, lm=False):
        sig = {"w_ptr": weights, "g_ptr": weights, "ws_ptr": weights, "v_ptr": stat, "m_ptr": "*u8",
               "rw_ptr": "*i64", "hp_ptr": stat, "sp_ptr": "*fp64", "chain_ptr": "*i64"}
        for name in ("lr", "nbeta", "gamma", "alpha", "one_minus_alpha", "scale", "eps", "wd", "box",
                     "noise_level"):
            sig[name] = "fp32"
        sig.update(seed="u64", step="i64", n="i64", g_first="i64", chain_base="i32", num_rows="i32")
        consts = dict(QUADS=GPU_QUADS, LEAD=3, PRECOND=True, UPDATE_V=True, HAS_WD=True, HAS_BOX=True,
                      HAS_MASK=not row, ROW_MASK=row, HP_PTR=True, SP_PTR=f64, CHAIN_PTR=True, IS_BF16=bf16, IS_F64=f64,
                      LM=lm)
        sig.update({name: "constexpr" for name in consts})
        out = triton.compile(ASTSource(fn=k, signature=sig, constexprs=consts),
                             target=GPUTarget("cuda", arch, 32), options={"num_warps": GPU_NUM_WARPS})
        ptx = out.asm["ptx"]
        assert "mul.hi.u32" in ptx and len(out.asm["cubin"]) > 0
        return ptx

    compile(80, "*i16", "*fp32", False, True)
    compile(90, "*fp32", "*fp32", False, False)
    compile(90, "*fp64", "*fp64", True, False)
    compile(80, "*i16", "*fp32", False, True, row=True)  # per-row masks (RowMasks)
    compile(90, "*fp32", "*fp32", False, False, row=True)
    compile(90, "*fp32", "*fp32", False, False, lm=True)  # noise_scheme "lm": the next step's normals too

    from llc_fast.kernels.triton_kernels import sgld_update_segments_kernel as ks

    def compile_segments(arch, weights, stat, f64, bf16, row=False, lm=False):  # pointers loaded from the table, cast in the kernel
        sig = {"seg_ptr": "*i64", "ws_ptr": weights, "v_ptr": stat, "m_ptr": "*u8", "rw_ptr": "*i64", "hp_ptr": stat,
               "sp_ptr": "*fp64", "chain_ptr": "*i64"}
        for name in ("lr", "nbeta", "gamma", "alpha", "one_minus_alpha", "scale", "eps", "wd", "box",
                     "noise_level"):
            sig[name] = "fp32"
        sig.update(seed="u64", step="i64", n_local="i64", chain_base="i32", num_rows="i32")
        consts = dict(QUADS=GPU_QUADS, SEARCH_STEPS=8, PRECOND=True, UPDATE_V=True, HAS_WD=True, HAS_BOX=True,
                      HAS_MASK=not row, ROW_MASK=row, HP_PTR=True, SP_PTR=f64, CHAIN_PTR=True, IS_BF16=bf16, IS_F64=f64,
                      LM=lm)
        sig.update({name: "constexpr" for name in consts})
        out = triton.compile(ASTSource(fn=ks, signature=sig, constexprs=consts),
                             target=GPUTarget("cuda", arch, 32), options={"num_warps": GPU_NUM_WARPS})
        assert "mul.hi.u32" in out.asm["ptx"] and len(out.asm["cubin"]) > 0

    compile_segments(80, "*i16", "*fp32", False, True)
    compile_segments(90, "*fp32", "*fp32", False, False)
    compile_segments(90, "*fp64", "*fp64", True, False)
    compile_segments(80, "*i16", "*fp32", False, True, row=True)
    compile_segments(90, "*fp64", "*fp64", True, False, row=True)
    compile_segments(80, "*i16", "*fp32", False, True, lm=True)
    print("compiled")
""")


@pytest.mark.skipif(ON_GPU, reason="on a GPU the other tests compile and run the kernel")
def test_kernel_compiles_for_sm80_and_sm90():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:  # pragma: no cover - other Triton versions
        pytest.skip(f"this Triton has no ahead-of-time compile API: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, cwd=root,
                          timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
