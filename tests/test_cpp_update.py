"""The compiled backends against the reference: the C++ (OpenMP) update and its Philox noise
bit-for-bit or to stated tolerances, and the CUDA source compiled with nvcc (run on a GPU when
one is present).

Tolerances. Random words and uniforms are compared exactly, normals within 1e-5 absolute
(docs/noise.md: libm's float32 log/cos/sin differ from torch's by an ulp or two). The C++
kernel computes its normals with its own vectorized float32 log and sin/cos (polynomials):
measured, r = sqrt(-2 log u) within 1 ulp for every uniform, cos and sin within 1.5e-7 for
every angle, and 2**24 random normals within 7e-7 of the exact Box-Muller of the float32
uniforms, as are torch's; so the two are also checked within KERNEL_NORMAL_TOL = 2e-6 on
crafted and random words. The update
is, apart from the normal xi, the reference's sequence of operations (the extension is built
with -ffp-contract=off), so a weight can differ by noise_level*sqrt(lr*G)*|xi_cpp - xi_ref| <=
noise_level*sqrt(lr*G)*1e-5, plus a few ulps of the terms that enter the last roundings: the
C++ sqrt is correctly rounded, torch's CPU sqrt is not (on AVX512, 18% of float32 and 1% of
float64 square roots are 1 ulp off), so G may differ by an ulp or two. Without noise, plain
SGLD (no sqrt) is bit-exact and the statistic V is always bit-exact.
"""
from __future__ import annotations

import inspect
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from llc_fast.kernels import build, philox
from llc_fast.kernels import cpu_update as cpu_module
from llc_fast.kernels.torch_update import reference_update
from llc_fast.kernels.update_spec import SamplerSettings, StepCounters, compute_dtype

NORMAL_TOL = 1e-5
KERNEL_NORMAL_TOL = 2e-6  # |C++ normal - torch reference normal|: both within 7e-7 of exact
CSRC = Path(__file__).resolve().parents[1] / "csrc"
CHAIN_IDS = [5, 0, 2**31 - 1, 17, 3]


@pytest.fixture(scope="module")
def ext():
    return cpu_module.load_cpu_extension()


@pytest.fixture(scope="module")
def cpu_update():
    return cpu_module.load_cpu_update()


# ----------------------------------------------------------------------------- noise


def test_known_answer_vectors(ext):
    assert ext.philox4x32(0, 0, 0, 0, 0, 0) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    ones = 0xFFFFFFFF
    assert ext.philox4x32(ones, ones, ones, ones, ones, ones) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    # the same vectors through the counter layout: seed 0, chain 0, step 0, group 0, stream 0 ...
    words = torch.empty((1, 4), dtype=torch.int32)
    ids = torch.zeros(1, dtype=torch.int64)
    ext.philox_debug(0, ids.data_ptr(), 1, 0, 0, 4, 0, words.data_ptr(), 0, 0)
    assert (words.to(torch.int64) & 0xFFFFFFFF).tolist() == [[0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]]
    # ... and the Python reference agrees on the all-ones vector
    t = torch.tensor(ones)
    assert [int(x) for x in philox.philox4x32(t, t, t, t, 2**64 - 1)] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def _cpp_noise(ext, seed, chain_ids, step, start, count, stream):
    c = len(chain_ids)
    ids = torch.tensor(chain_ids, dtype=torch.int64)
    words = torch.empty((c, count), dtype=torch.int32)
    uniforms = torch.empty((c, count), dtype=torch.float32)
    normals = torch.empty((c, count), dtype=torch.float32)
    ext.philox_debug(seed, ids.data_ptr(), c, step, start, count, stream, words.data_ptr(), uniforms.data_ptr(),
                     normals.data_ptr())
    return words.to(torch.int64) & 0xFFFFFFFF, uniforms, normals


@pytest.mark.parametrize(
    "seed, step, start, count",
    [(0, 0, 0, 1), (12345, 3, 3, 9), (2**32 + 7, 2**32 - 1, 2**33 + 5, 4099), (2**64 - 1, 17, 2**62 + 1, 257),
     (2**63 - 1, 1, 4 * (2**32 - 1) + 2, 13)],  # the last crosses a carry into counter word 1
)
def test_noise_matches_reference(ext, seed, step, start, count):
    ids = torch.tensor(CHAIN_IDS, dtype=torch.int64)
    for stream in (philox.STREAM_GAUSSIAN, philox.STREAM_ROUNDING):
        words, uniforms, normals = _cpp_noise(ext, seed, CHAIN_IDS, step, start, count, stream)
        ref_words, first = philox.quad_words(seed, ids, step, start, count, stream)
        ref_words = philox.per_element(ref_words, first, start, count)
        assert torch.equal(words, ref_words)
        assert torch.equal(uniforms, philox.uniform_from_word(ref_words))  # bit-exact
        if stream == philox.STREAM_GAUSSIAN:
            ref = philox.gaussian_noise(seed, ids, step, start, count)
            assert (normals - ref).abs().max().item() <= NORMAL_TOL
        else:
            assert torch.equal(words, philox.rounding_words(seed, ids, step, start, count))


def test_stochastic_rounding_matches_reference(ext):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g) * torch.logspace(-40, 38, 20000).flip(0) * torch.rand(20000, generator=g)
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 3.3895314e38,
                             -3.3895314e38, 1e-45, -1e-45, 1.17549435e-38, 1.0000001, 65504.0])
    x = torch.cat([x, specials.repeat(16)])
    words = torch.randint(0, 2**32, x.shape, generator=g, dtype=torch.int64)
    words[-specials.numel() * 16:] = torch.tensor([0, 0xFFFF, 0xFFFFFFFF, 0x8000]).repeat(specials.numel() * 4)
    out = torch.empty(x.shape, dtype=torch.int16)
    w32 = words.to(torch.int32)  # the same 32 bits
    ext.stochastic_round_debug(x.data_ptr(), w32.data_ptr(), out.data_ptr(), x.numel())
    got = out.view(torch.bfloat16)
    ref = philox.stochastic_round_to_bf16(x, words)
    nan = torch.isnan(x)
    assert torch.isnan(got[nan]).all()
    assert torch.equal(got[~nan].view(torch.int16), ref[~nan].view(torch.int16))


def _reference_normals(words: torch.Tensor) -> torch.Tensor:
    """The reference normals [G, 4] of explicit words [G, 4] (int64 in [0, 2**32))."""
    u = philox.uniform_from_word(words)
    n0, n1 = philox.box_muller(u[:, 0], u[:, 1])
    n2, n3 = philox.box_muller(u[:, 2], u[:, 3])
    return torch.stack((n0, n1, n2, n3), dim=1)


def _kernel_normals(ext, words: torch.Tensor) -> torch.Tensor:
    w32 = words.to(torch.int32).contiguous()  # the same 32 bits
    out = torch.empty(words.shape, dtype=torch.float32)
    ext.normals_debug(w32.data_ptr(), out.data_ptr(), words.shape[0])
    return out


def test_kernel_normals_on_crafted_and_random_words(ext):
    """The kernel's polynomial log and sin/cos where they are most likely to go wrong: the 1e-7
    clamp of u_a, u_a -> 1 (log -> 0), the binades and the sqrt(1/2) cut of the log's reduction;
    angles at and next to multiples of pi/4 (the octant and quadrant cuts of sin/cos), 0 and
    2*pi; negative words (folded); then random words, spread over tiles and the scalar tail."""
    def near(folded):  # words whose folded value is folded-2 .. folded+2, positive and negative
        out = []
        for f in folded:
            for d in (-2, -1, 0, 1, 2):
                x = min(max(f + d, 0), 2**31 - 1)
                out += [x, (2**32 - 1 - x)]  # the negative word ~x folds to x
        return out

    scale = 2**31
    a = near([0, 214, 215, 2**31 - 1, int(0.70710678 * scale), 2**30, 2**29, 2**24, 1 << 20, 2**31 - 2**7])
    b = near([round(j * scale / 8) for j in range(9)] + [1, 2**31 - 1])
    pairs = torch.tensor([(x, y) for x in a for y in b], dtype=torch.int64)
    if pairs.shape[0] % 2:
        pairs = torch.cat([pairs, pairs[:1]])
    crafted = pairs.reshape(-1, 4)  # (u0, u1), (u2, u3): both pairs of a group take crafted values
    g = torch.Generator().manual_seed(11)
    random = torch.randint(0, 2**32, (2**16 + 3, 4), generator=g, dtype=torch.int64)
    for words in (crafted, random):
        got, ref = _kernel_normals(ext, words), _reference_normals(words)
        assert torch.isfinite(got).all()
        err = (got - ref).abs().max().item()
        assert err <= KERNEL_NORMAL_TOL, err
    # clamped uniforms give the largest radius, sqrt(-2 log 1e-7) = 5.677, in both
    assert abs(_kernel_normals(ext, torch.tensor([[0, 0, 2**32 - 1, 0]])).max().item() - 5.6777) < 1e-3


# ----------------------------------------------------------------------------- the update


def _make_case(dtype, sampler, n, chains, *, per_chain, seed=7):
    g = torch.Generator().manual_seed(seed + n + chains)
    cdt = compute_dtype(dtype)
    w_star = torch.randn(n, generator=g, dtype=torch.float64)
    w = (w_star + 0.1 * torch.randn(chains, n, generator=g, dtype=torch.float64)).to(dtype)
    grad = (torch.randn(chains, n, generator=g, dtype=torch.float64) * 2).to(dtype)
    stat = None
    if sampler != "sgld":
        stat = (torch.rand(chains, n, generator=g, dtype=torch.float64) ** 3 * 4).to(cdt)
    if per_chain:
        hyper = dict(lr=torch.tensor([1e-3, 3e-3, 1e-2, 2e-4, 5e-3][:chains]),
                     nbeta=torch.tensor([10.0, 30.0, 3.0, 100.0, 17.0][:chains]),
                     gamma=torch.tensor([100.0, 1000.0, 1.0, 10.0, 0.0][:chains]))
    else:
        hyper = dict(lr=2e-3, nbeta=20.0, gamma=300.0)
    return w, grad, w_star.to(dtype), stat, hyper


def _precond(stat_after, settings, counters):
    """G of each element (float64), from the updated statistic."""
    if not settings.preconditioned:
        return torch.ones((), dtype=torch.float64)
    v = stat_after.to(torch.float64) * settings.statistic_scale(counters.stat_step)
    return 1.0 / (torch.sqrt(v) + settings.rmsprop_eps)


def _weight_tolerance(w_old, grad, w_star, w_ref, stat_ref, hyper, settings, counters, dtype):
    """|w_cpp - w_ref| allowed: noise_level*sqrt(lr*G)*1e-5 from the normals (the only inexact input),
    plus 4 ulps of each magnitude that enters the last roundings (old and new weight, drift term,
    noise term; G itself may be an ulp or two off, see the module doc)."""
    def col(v):
        return torch.as_tensor(v, dtype=torch.float64).reshape(-1, 1)

    w0, g, ws = w_old.double(), grad.double(), w_star.double()
    lr = col(hyper["lr"])
    precond = _precond(stat_ref, settings, counters)
    drift = col(hyper["nbeta"]) * g + col(hyper["gamma"]) * (w0 - ws) + settings.weight_decay * w0
    drift_term = 0.5 * lr * precond * drift.abs()
    noise_scale = settings.noise_level * torch.sqrt(lr * precond)
    ulp = torch.finfo(compute_dtype(dtype)).eps
    return noise_scale * NORMAL_TOL + 4 * ulp * (w0.abs() + w_ref.double().abs() + drift_term + 6 * noise_scale)


def _run_both(update, dtype, sampler, n, chains, *, per_chain=False, wd=0.0, mask=False, box=None, update_stat=True,
              offset=0, noise_level=1.0, step=11, seed=2**40 + 3, stat_step=None, device="cpu"):
    w, grad, w_star, stat, hyper = _make_case(dtype, sampler, n, chains, per_chain=per_chain)
    settings = SamplerSettings(sampler=sampler, weight_decay=wd, box=box, noise_level=noise_level)
    counters = StepCounters(step=step, update_statistic=update_stat, stat_step=step if stat_step is None else stat_step)
    m = None
    if mask:
        m = (torch.arange(n) % 3 != 1).to(torch.float32)
    kwargs = dict(settings=settings, counters=counters, seed=seed, chain_ids=torch.tensor(CHAIN_IDS[:chains]),
                  index_offset=offset)
    to = (lambda t: None if t is None else t.to(device))
    w_ref, stat_ref = w.clone(), None if stat is None else stat.clone()
    reference_update(w_ref, grad, w_star, stat_ref, mask=m, **hyper, **kwargs)
    w_new, stat_new = to(w.clone()), to(stat)
    update(w_new, to(grad), to(w_star), stat_new, mask=to(m), **{k: to(v) if isinstance(v, torch.Tensor) else v
                                                                  for k, v in hyper.items()}, **kwargs)
    w_new, stat_new = w_new.cpu(), None if stat_new is None else stat_new.cpu()
    if stat is not None:
        assert torch.equal(stat_new, stat_ref)  # no noise in V: bit-exact
        if not update_stat:
            assert torch.equal(stat_new, stat)
    if mask and box is None:  # (the reference clamps masked weights too, so only without a box)
        frozen = m == 0
        assert torch.equal(w_new[:, frozen], w[:, frozen])
    if box is not None:
        slack = 2.0**-7 * (w_star.double().abs() + box) if dtype == torch.bfloat16 else 1e-6  # bf16: rounded after the clamp
        assert ((w_new.double() - w_star.double()).abs() <= box * (1 + 1e-6) + slack).all()
    return (w, grad, w_star), w_new, w_ref, stat_ref, hyper, settings, counters


# Each sampler at each size, with the features (per-chain values, weight decay, mask, box,
# frozen statistic, index offsets not a multiple of four and past 2**31) spread over the cases.
F32_CASES = [
    ("sgld", 1, 3, dict()),
    ("rmsprop_sgld", 1, 2, dict(mask=True, offset=6)),
    ("rmsprop_sgld_bc", 1, 4, dict(per_chain=True, box=0.05, offset=2**33 + 5)),
    ("sgld", 3, 2, dict(per_chain=True, wd=1e-2, offset=1)),
    ("rmsprop_sgld", 3, 3, dict(update_stat=False, box=0.1)),
    ("rmsprop_sgld_bc", 3, 1, dict(mask=True, offset=2**33 + 5)),
    ("sgld", 4097, 4, dict(mask=True, box=0.02, offset=2**33 + 5, noise_level=0.5)),
    ("rmsprop_sgld", 4097, 3, dict(per_chain=True, wd=3e-2, offset=3)),
    ("rmsprop_sgld_bc", 4097, 5, dict(per_chain=True, update_stat=False, stat_step=4, mask=True, offset=2)),
    ("sgld", 100003, 3, dict(per_chain=True, wd=1e-3, box=0.05, offset=2**33 + 5)),
    ("rmsprop_sgld", 100003, 2, dict(mask=True, box=0.1, offset=7)),
    ("rmsprop_sgld_bc", 100003, 3, dict(per_chain=True, wd=1e-2, mask=True, offset=2**31 + 1)),
]


def _check_close(inputs, w_new, w_ref, stat_ref, hyper, settings, counters, dtype):
    tol = _weight_tolerance(*inputs, w_ref, stat_ref, hyper, settings, counters, dtype)
    err = (w_new.double() - w_ref.double()).abs()
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"
    return err


@pytest.mark.parametrize("sampler, n, chains, opts", F32_CASES)
def test_update_float32_matches_reference(cpu_update, sampler, n, chains, opts):
    inputs, w_new, w_ref, stat_ref, hyper, settings, counters = _run_both(cpu_update, torch.float32, sampler, n,
                                                                          chains, **opts)
    err = _check_close(inputs, w_new, w_ref, stat_ref, hyper, settings, counters, torch.float32)
    assert (err == 0).double().mean() > 0.5  # most elements bit-identical: the normals differ only now and then


@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld", "rmsprop_sgld_bc"])
@pytest.mark.parametrize("n, opts", [(3, dict(offset=1, per_chain=True)),
                                     (4097, dict(mask=True, box=0.05, wd=1e-2, offset=2**33 + 5))])
def test_update_float64_matches_reference(cpu_update, sampler, n, opts):
    inputs, w_new, w_ref, stat_ref, hyper, settings, counters = _run_both(cpu_update, torch.float64, sampler, n, 3,
                                                                          **opts)
    _check_close(inputs, w_new, w_ref, stat_ref, hyper, settings, counters, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sgld_without_noise_is_bit_exact(cpu_update, dtype):
    """With noise_level = 0 and no preconditioner (no sqrt) nothing inexact is left: the same
    operations in the same order give the same bits, bfloat16 rounding included."""
    _, w_new, w_ref, *_ = _run_both(cpu_update, dtype, "sgld", 4097, 3, per_chain=True, wd=1e-2, mask=True, box=0.05,
                                    offset=5, noise_level=0.0)
    if dtype == torch.bfloat16:
        w_new, w_ref = w_new.view(torch.int16), w_ref.view(torch.int16)
    assert torch.equal(w_new, w_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("opts", [dict(), dict(wd=1e-2), dict(mask=True, offset=2**33 + 3), dict(box=0.05, offset=7)])
def test_sgld_without_noise_is_bit_exact_each_variant(cpu_update, dtype, opts):
    """The kernel compiles one loop per (mask, weight decay) combination and clamps to an infinite
    box when there is none: each is the reference's sequence of roundings."""
    _, w_new, w_ref, *_ = _run_both(cpu_update, dtype, "sgld", 2053, 2, noise_level=0.0, **opts)
    if dtype == torch.bfloat16:
        w_new, w_ref = w_new.view(torch.int16), w_ref.view(torch.int16)
    assert torch.equal(w_new, w_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("box", [None, 0.05])
def test_non_finite_values_as_in_reference(cpu_update, dtype, box):
    """inf and NaN in the weights and the gradient go through the same operations as in the
    reference (NaN propagates, the box clamps +-inf, no box leaves them), without noise bit for bit."""
    n = 1031
    w, grad, w_star, _, hyper = _make_case(dtype, "sgld", n, 2, per_chain=False)
    bad = torch.tensor([0.0, float("inf"), float("-inf"), float("nan")], dtype=dtype)
    w[0, 3::17] = bad[torch.arange(len(range(3, n, 17))) % 4]
    grad[1, 5::13] = bad[torch.arange(len(range(5, n, 13))) % 4]
    kwargs = dict(settings=SamplerSettings("sgld", box=box, noise_level=0.0), counters=StepCounters(step=2), seed=3,
                  chain_ids=torch.tensor([0, 1]), **hyper)
    w_ref, w_new = w.clone(), w.clone()
    reference_update(w_ref, grad, w_star, None, **kwargs)
    cpu_update(w_new, grad, w_star, None, **kwargs)
    nan = torch.isnan(w_ref)
    assert nan.any() and torch.equal(nan, torch.isnan(w_new))
    a, b = w_new[~nan], w_ref[~nan]
    if dtype == torch.bfloat16:
        a, b = a.view(torch.int16), b.view(torch.int16)
    assert torch.equal(a, b)


def test_update_across_the_counter_carry(cpu_update):
    """Groups 2**32 - 3 .. 2**32 + 1000 in one call: the vectorized Philox carries counter word 0
    into word 1 inside a register of groups."""
    inputs, w_new, w_ref, stat_ref, hyper, settings, counters = _run_both(
        cpu_update, torch.float32, "rmsprop_sgld", 4013, 2, offset=4 * (2**32 - 3) + 1, per_chain=True)
    _check_close(inputs, w_new, w_ref, stat_ref, hyper, settings, counters, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sampler", ["rmsprop_sgld", "rmsprop_sgld_bc"])
def test_preconditioned_without_noise_within_ulps(cpu_update, dtype, sampler):
    """Without noise only the ulp terms of the tolerance are left (torch's sqrt is not correctly rounded)."""
    inputs, w_new, w_ref, stat_ref, hyper, settings, counters = _run_both(
        cpu_update, dtype, sampler, 4097, 3, per_chain=True, wd=1e-2, mask=True, offset=5, noise_level=0.0)
    err = _check_close(inputs, w_new, w_ref, stat_ref, hyper, settings, counters, dtype)
    assert (err == 0).double().mean() > 0.5


@pytest.mark.parametrize("sampler, n, opts", [("sgld", 4097, dict(offset=2**33 + 5)),
                                              ("rmsprop_sgld", 100003, dict(per_chain=True, mask=True, offset=3)),
                                              ("rmsprop_sgld_bc", 4097, dict(box=0.05, wd=1e-2))])
def test_update_bfloat16_matches_reference(cpu_update, sampler, n, opts):
    """Same rounding bits, so the stored values agree except where an ulp of difference in the
    float32 value crosses a rounding threshold (probability ~ 2**-16 per ulp): then by one bf16 ulp."""
    _, w_new, w_ref, *_ = _run_both(cpu_update, torch.bfloat16, sampler, n, 3, **opts)
    a, b = w_new.view(torch.int16).to(torch.int32), w_ref.view(torch.int16).to(torch.int32)
    mismatch = a != b
    assert mismatch.double().mean().item() <= 1e-3
    assert ((a - b).abs()[mismatch] <= 1).all()


def test_bfloat16_rounding_is_unbiased(cpu_update):
    """Many chains with the same input and no noise share one float32 value x per element, and round it
    with different bits: the mean of the stored values tends to x, within 5 binomial standard errors."""
    chains, n = 4096, 256
    g = torch.Generator().manual_seed(3)
    w_star = torch.randn(n, generator=g).to(torch.bfloat16)
    w = (w_star.float() + 0.05 * torch.randn(n, generator=g)).to(torch.bfloat16).expand(chains, n).contiguous()
    grad = torch.randn(n, generator=g).to(torch.bfloat16).expand(chains, n).contiguous()
    settings = SamplerSettings(sampler="sgld", noise_level=0.0)
    kwargs = dict(lr=1e-2, nbeta=3.0, gamma=10.0, settings=settings, counters=StepCounters(step=2), seed=99,
                  chain_ids=torch.arange(chains))
    x = w[:1].float()
    reference_update(x, grad[:1].float(), w_star.float(), None, **{**kwargs, "chain_ids": torch.arange(1)})
    x = x[0]
    cpu_update(w, grad, w_star, None, **kwargs)
    vals = w.double()
    # x's two bf16 neighbours: truncated toward zero, and one bf16 ulp further from zero; rounding goes
    # away from zero iff low16(x) + low16(word) >= 2**16, so with probability p = low16(x) / 2**16.
    bits = x.view(torch.int32)
    down = (bits & -65536).view(torch.float32).double()
    up = ((bits & -65536) + 65536).view(torch.float32).double()
    assert ((vals == down) | (vals == up)).all()
    p = (bits & 0xFFFF).double() / 65536
    stderr = (up - down).abs() * torch.sqrt(p * (1 - p) / chains)
    bias = vals.mean(dim=0) - x.double()
    assert (bias.abs() <= 5 * stderr).all()
    z = bias[stderr > 0] / stderr[stderr > 0]  # pooled over elements: mean of ~N(0, 1) scores
    assert abs(z.mean().item()) <= 5 / math.sqrt(z.numel())
    assert 0.05 < p.mean().item() < 0.95  # the values do need rounding


def test_threads_do_not_change_the_result(cpu_update):
    w, grad, w_star, stat, hyper = _make_case(torch.float32, "rmsprop_sgld", 100003, 3, per_chain=True)
    kwargs = dict(settings=SamplerSettings("rmsprop_sgld"), counters=StepCounters(step=1), seed=5,
                  chain_ids=torch.tensor([0, 1, 2]), **hyper)
    outs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            wc, sc = w.clone(), stat.clone()
            cpu_update(wc, grad, w_star, sc, **kwargs)
            outs.append((wc, sc))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_shards_give_the_same_chain(cpu_update):
    """Updating [0, N) at once or as two shards with their global offsets gives the same weights."""
    w, grad, w_star, stat, hyper = _make_case(torch.float32, "sgld", 1001, 2, per_chain=False)
    kwargs = dict(settings=SamplerSettings(), counters=StepCounters(step=4), seed=1, chain_ids=torch.tensor([3, 9]),
                  **hyper)
    whole = w.clone()
    cpu_update(whole, grad, w_star, None, **kwargs)
    cut = 498  # not a multiple of four
    parts = []
    for lo, hi in ((0, cut), (cut, 1001)):
        part = w[:, lo:hi].clone()
        cpu_update(part, grad[:, lo:hi].contiguous(), w_star[lo:hi].contiguous(), None, index_offset=lo, **kwargs)
        parts.append(part)
    assert torch.equal(torch.cat(parts, dim=1), whole)


def test_same_interface_as_reference(cpu_update):
    def params(f):
        return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

    assert params(cpu_update) == params(reference_update)
    from llc_fast.kernels.dispatch import select_backend

    assert select_backend("cpu", torch.device("cpu")).name == "cpu"


def test_the_update_takes_one_argument_struct(ext):
    """The C++ update's one entry point takes the address of an UpdateArgs, whose mirror native.UpdateArgs
    has the C struct's size (checked again at every load)."""
    import ctypes

    from llc_fast.kernels import native

    assert ext.sgld_update.__doc__.split("(", 1)[1].split(") ->", 1)[0].startswith("args: ")  # one argument
    assert ext.UPDATE_ARGS_SIZE == ctypes.sizeof(native.UpdateArgs)
    with pytest.raises(RuntimeError, match="disagree"):
        native.check_layout(ext.UPDATE_ARGS_SIZE + 8, "test")
    with pytest.raises(ValueError, match="bad sizes, step, codes or null pointers"):
        ext.sgld_update(ctypes.addressof(native.UpdateArgs(num_rows=-1)))


def _good_args():
    w, grad, w_star, stat, hyper = _make_case(torch.float32, "rmsprop_sgld", 8, 2, per_chain=True)
    return dict(w=w, grad=grad, w_star=w_star, stat=stat, **hyper, settings=SamplerSettings("rmsprop_sgld"),
                counters=StepCounters(step=0), seed=0, chain_ids=torch.tensor([0, 1]), mask=None, index_offset=0)


@pytest.mark.parametrize(
    "change",
    [
        dict(w=torch.zeros(2, 8, device="meta")),
        dict(w=torch.zeros(2, 8, device="meta"), grad=torch.zeros(2, 8, device="meta"),
             w_star=torch.zeros(8, device="meta"), stat=torch.zeros(2, 8, device="meta")),
        dict(w=torch.zeros(2, 8, dtype=torch.float16)),
        dict(grad=torch.zeros(2, 7)),
        dict(w=torch.zeros(8, 2).t()),
        dict(stat=torch.zeros(2, 8, dtype=torch.float64)),
        dict(stat=None),
        dict(w_star=torch.zeros(9)),
        dict(mask=torch.ones(7)),
        dict(chain_ids=torch.tensor([0, 1, 2])),
        dict(chain_ids=torch.tensor([0.0, 1.0])),
        dict(chain_ids=torch.tensor([0, 2**31])),
        dict(chain_ids=torch.tensor([-1, 0])),
        dict(counters=StepCounters(step=2**32)),
        dict(counters=StepCounters(step=-1)),
        dict(seed=-1),
        dict(seed=2**64),
        dict(index_offset=-4),
        dict(lr=torch.ones(3)),
        dict(nbeta=torch.ones(2, 1)),
    ],
)
def test_bad_inputs_raise_value_error(cpu_update, change):
    args = {**_good_args(), **change}
    with pytest.raises(ValueError):
        cpu_update(args.pop("w"), args.pop("grad"), args.pop("w_star"), args.pop("stat"), **args)


def test_build_failure_is_a_runtime_error(monkeypatch):
    monkeypatch.setattr(build, "_CPU_MODULE", None)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(RuntimeError, match="compiler"):
        cpu_module.load_cpu_update()


def test_cpu_build_config(monkeypatch):
    """-march=native when the compiler takes it, never -ffast-math, and an extension name that
    changes with what the flags mean on the machine (another CPU must not load this build)."""
    monkeypatch.delenv("LLC_FAST_MARCH", raising=False)
    name, flags = cpu_module.cpu_build_config()
    assert name.startswith(cpu_module.EXTENSION_NAME + "_")
    assert "-ffp-contract=off" in flags and not any("fast-math" in f for f in flags)
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) and build.target_macros(cxx, cpu_module.CPU_CFLAGS + ["-march=native"]) is not None:
        assert flags[-1] == "-march=native"
    assert cpu_module.cpu_build_config() == (name, flags)  # stable

    seen = {}

    def fake_macros(cxx, fl):
        return seen.get("macros", "#define __AVX512F__ 1")

    monkeypatch.setattr(build, "target_macros", fake_macros)
    name_a, flags_a = cpu_module.cpu_build_config("c++")
    seen["macros"] = "#define __AVX2__ 1"  # the same flags on a different CPU
    name_b, flags_b = cpu_module.cpu_build_config("c++")
    assert flags_a == flags_b and name_a != name_b
    monkeypatch.setenv("LLC_FAST_MARCH", "none")
    name_c, flags_c = cpu_module.cpu_build_config("c++")
    assert not any(f.startswith("-march") for f in flags_c) and name_c != name_b
    # a compiler that rejects -march=...: built for its default target (with a warning if the user asked)
    monkeypatch.delenv("LLC_FAST_MARCH")
    monkeypatch.setattr(build, "target_macros", lambda cxx, fl: None if any("-march" in f for f in fl) else "")
    assert not any(f.startswith("-march") for f in cpu_module.cpu_build_config("c++")[1])
    monkeypatch.setenv("LLC_FAST_MARCH", "skylake-avx512")
    with pytest.warns(UserWarning, match="rejects"):
        assert not any(f.startswith("-march") for f in cpu_module.cpu_build_config("c++")[1])


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_sources_compile(tmp_path, arch):
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, f"no .cu files in {CSRC}"
    for src in sources:
        cmd = ["nvcc", "-std=c++17", "-O3", f"-arch={arch}", f"-I{CSRC}", "-c", str(src), "-o",
               str(tmp_path / f"{src.stem}_{arch}.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.mark.gpu
@needs_gpu
def test_cuda_noise_matches_reference():
    from llc_fast.kernels.cuda_update import cuda_philox_debug

    ids = torch.tensor(CHAIN_IDS, dtype=torch.int64)
    for start, count in ((0, 9), (2**33 + 5, 4099)):
        words, uniforms, normals = cuda_philox_debug(2**32 + 7, ids.cuda(), 5, start, count)
        ref_words, first = philox.quad_words(2**32 + 7, ids, 5, start, count, 0)
        ref_words = philox.per_element(ref_words, first, start, count)
        assert torch.equal(words.cpu(), ref_words)
        assert torch.equal(uniforms.cpu(), philox.uniform_from_word(ref_words))
        assert (normals.cpu() - philox.gaussian_noise(2**32 + 7, ids, 5, start, count)).abs().max() <= NORMAL_TOL


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("sampler, n, chains, opts", F32_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_update_matches_reference(sampler, n, chains, opts, dtype):
    from llc_fast.kernels.cuda_update import load_cuda_update

    inputs, w_new, w_ref, stat_ref, hyper, settings, counters = _run_both(load_cuda_update(), dtype, sampler, n,
                                                                          chains, device="cuda", **opts)
    if dtype == torch.bfloat16:
        a, b = w_new.view(torch.int16).to(torch.int32), w_ref.view(torch.int16).to(torch.int32)
        assert (a != b).double().mean().item() <= 1e-3 and ((a - b).abs() <= 1).all()
    else:
        _check_close(inputs, w_new, w_ref, stat_ref, hyper, settings, counters, dtype)
