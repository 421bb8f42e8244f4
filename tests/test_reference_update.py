"""The reference update against an element-by-element float64 transcription of docs/update.md."""
import math

import pytest
import torch

from llc_fast.kernels import philox
from llc_fast.kernels.torch_update import reference_update
from llc_fast.kernels.update_spec import SamplerSettings, StepCounters


def transcribed_update(w, g, ws, v, *, lr, nbeta, gamma, s: SamplerSettings, t: StepCounters, xi, mask):
    """docs/update.md, one element at a time, float64. Returns (new w, new V)."""
    w, g, ws, v, xi = (x.double().tolist() for x in (w, g, ws, v, xi))
    mask = [1.0] * len(ws) if mask is None else mask.double().tolist()
    scale = 1.0 / (1 - s.rmsprop_alpha ** (t.stat_step + 1)) if s.bias_corrected else 1.0
    new_w, new_v = [], []
    for c in range(len(w)):
        row_w, row_v = [], []
        for i in range(len(ws)):
            vi = v[c][i]
            if s.preconditioned and t.update_statistic:
                vi = s.rmsprop_alpha * vi + (1 - s.rmsprop_alpha) * g[c][i] ** 2
            G = 1 / (math.sqrt(vi * scale) + s.rmsprop_eps) if s.preconditioned else 1.0
            d = nbeta[c] * g[c][i] + gamma[c] * (w[c][i] - ws[i]) + s.weight_decay * w[c][i]
            x = w[c][i] + mask[i] * (-(lr[c] / 2) * G * d + s.noise_level * math.sqrt(lr[c] * G) * xi[c][i])
            if s.box is not None:
                x = min(max(x, ws[i] - s.box), ws[i] + s.box)
            row_w.append(x)
            row_v.append(vi)
        new_w.append(row_w)
        new_v.append(row_v)
    return torch.tensor(new_w, dtype=torch.float64), torch.tensor(new_v, dtype=torch.float64)


CASES = [
    dict(sampler="sgld"),
    dict(sampler="sgld", weight_decay=0.3, box=0.05, noise_level=0.7),
    dict(sampler="rmsprop_sgld"),
    dict(sampler="rmsprop_sgld_bc", rmsprop_alpha=0.9, rmsprop_eps=0.01),
    dict(sampler="rmsprop_sgld_bc", weight_decay=0.1),
]


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_reference_matches_transcription(kw, frozen, masked):
    gen = torch.Generator().manual_seed(0)
    C, N, offset, seed = 3, 13, 6, 42
    settings = SamplerSettings(**kw)
    counters = StepCounters(step=5, update_statistic=not frozen, stat_step=2 if frozen else 5)
    ws = torch.randn(N, generator=gen)
    w = ws + 0.04 * (2 * torch.rand(C, N, generator=gen) - 1)  # inside the box: masked weights stay put
    g = torch.randn(C, N, generator=gen)
    v = torch.rand(C, N, generator=gen) if settings.preconditioned else torch.zeros(C, N)
    lr, nbeta, gamma = [1e-3, 2e-3, 5e-4], [10.0, 30.0, 100.0], [1.0, 0.0, 300.0]
    mask = (torch.rand(N, generator=gen) > 0.5).float() if masked else None
    chains = torch.tensor([4, 0, 9])
    xi = philox.gaussian_noise(seed, chains, counters.step, offset, N)
    exp_w, exp_v = transcribed_update(w, g, ws, v, lr=lr, nbeta=nbeta, gamma=gamma, s=settings, t=counters,
                                      xi=xi, mask=mask)
    got_w, got_v = w.clone(), v.clone()
    reference_update(got_w, g, ws, got_v if settings.preconditioned else None, lr=torch.tensor(lr),
                     nbeta=torch.tensor(nbeta), gamma=torch.tensor(gamma), settings=settings, counters=counters,
                     seed=seed, chain_ids=chains, mask=mask, index_offset=offset)
    torch.testing.assert_close(got_w.double(), exp_w, rtol=0, atol=2e-6)
    if settings.preconditioned:
        torch.testing.assert_close(got_v.double(), exp_v, rtol=1e-6, atol=1e-7)
    if masked:
        assert torch.equal(got_w[:, mask == 0], w[:, mask == 0])


def test_float64_weights_computed_in_float64():
    gen = torch.Generator().manual_seed(1)
    ws = torch.randn(9, generator=gen, dtype=torch.float64)
    w, g = ws + 1e-3, torch.randn(2, 9, generator=gen, dtype=torch.float64)
    s, t = SamplerSettings("sgld"), StepCounters(step=0)
    xi = philox.gaussian_noise(0, torch.tensor([0, 1]), 0, 0, 9)
    exp, _ = transcribed_update(w.expand(2, 9), g, ws, torch.zeros(2, 9), lr=[1e-2] * 2, nbeta=[5.0] * 2,
                                gamma=[1.0] * 2, s=s, t=t, xi=xi, mask=None)
    got = w.expand(2, 9).clone()
    reference_update(got, g, ws, None, lr=1e-2, nbeta=5.0, gamma=1.0, settings=s, counters=t, seed=0,
                     chain_ids=torch.tensor([0, 1]))
    torch.testing.assert_close(got, exp, rtol=0, atol=1e-14)


def test_bf16_weights_stochastically_rounded_from_float32():
    gen = torch.Generator().manual_seed(2)
    ws = torch.randn(50, generator=gen).bfloat16()
    w, g = ws.expand(2, 50).clone(), torch.randn(2, 50, generator=gen).bfloat16()
    s, t = SamplerSettings("sgld"), StepCounters(step=3)
    chains = torch.tensor([0, 1])
    reference_update(w, g, ws, None, lr=1e-3, nbeta=2.0, gamma=1.0, settings=s, counters=t, seed=8, chain_ids=chains)
    xi = philox.gaussian_noise(8, chains, 3, 0, 50)
    x32 = ws.float() + (-(0.5e-3) * (2.0 * g.float()) + math.sqrt(1e-3) * xi)
    expected = philox.stochastic_round_to_bf16(x32, philox.rounding_words(8, chains, 3, 0, 50))
    assert torch.equal(w, expected)


def test_one_call_equals_per_chain_and_per_shard_calls():
    """Layout invariance of the update itself: chain batching and buffer splits do not change it."""
    gen = torch.Generator().manual_seed(3)
    C, N = 4, 103
    ws = torch.randn(N, generator=gen)
    w0, g = ws + 0.01 * torch.randn(C, N, generator=gen), torch.randn(C, N, generator=gen)
    kw = dict(lr=torch.tensor([1e-3, 2e-3, 3e-3, 4e-3]), nbeta=50.0, gamma=1.0,
              settings=SamplerSettings("rmsprop_sgld_bc"), counters=StepCounters(step=17, stat_step=17), seed=5)
    chains = torch.arange(C)
    whole, v_whole = w0.clone(), torch.ones(C, N)
    reference_update(whole, g, ws, v_whole, chain_ids=chains, **kw)
    for c in range(C):
        row, v = w0[c : c + 1].clone(), torch.ones(1, N)
        kw_c = dict(kw, lr=kw["lr"][c : c + 1])
        reference_update(row, g[c : c + 1], ws, v, chain_ids=chains[c : c + 1], **kw_c)
        assert torch.equal(row, whole[c : c + 1])
    cut = 37  # not a multiple of 4
    left, right = w0[:, :cut].clone(), w0[:, cut:].clone()
    reference_update(left, g[:, :cut].contiguous(), ws[:cut], torch.ones(C, cut), chain_ids=chains, **kw)
    reference_update(right, g[:, cut:].contiguous(), ws[cut:].contiguous(), torch.ones(C, N - cut), chain_ids=chains,
                     index_offset=cut, **kw)
    assert torch.equal(torch.cat([left, right], 1), whole)


def test_bad_arguments_raise():
    w = torch.zeros(2, 5)
    s, t = SamplerSettings("rmsprop_sgld"), StepCounters(step=0)
    kw = dict(lr=1e-3, nbeta=1.0, gamma=1.0, counters=t, seed=0, chain_ids=torch.arange(2))
    with pytest.raises(ValueError, match="statistic"):
        reference_update(w, w.clone(), torch.zeros(5), None, settings=s, **kw)
    with pytest.raises(ValueError, match="grad"):
        reference_update(w, torch.zeros(2, 4), torch.zeros(5), None, settings=SamplerSettings(), **kw)
    with pytest.raises(ValueError, match="float32, float64 or bfloat16"):
        reference_update(w.half(), w.half(), torch.zeros(5).half(), None, settings=SamplerSettings(), **kw)
    with pytest.raises(ValueError, match="per-chain"):
        reference_update(w, w.clone(), torch.zeros(5), None, settings=SamplerSettings(),
                         **dict(kw, lr=torch.tensor([1.0, 2.0, 3.0])))
    with pytest.raises(ValueError, match="sampler"):
        SamplerSettings("adam")


def test_sgld_step_is_the_pure_step():
    """reference.sgld_step returns the new weights and statistic without writing its inputs, and with the
    step's normals it is what the "torch" backend applies."""
    from llc_fast.kernels.reference import sgld_step

    g = torch.Generator().manual_seed(3)
    C, N = 2, 9
    w, grad, ws = torch.randn(C, N, generator=g), torch.randn(C, N, generator=g), torch.randn(N, generator=g)
    v = torch.rand(C, N, generator=g)
    m = (torch.arange(N) % 2).float()
    settings, counters = SamplerSettings("rmsprop_sgld_bc", box=0.5, weight_decay=0.1), StepCounters(4, stat_step=4)
    lr, nbeta, gamma = torch.tensor([[1e-2], [3e-2]]), torch.tensor([[10.0], [3.0]]), torch.tensor([[100.0], [1.0]])
    ids = torch.tensor([1, 6])
    xi = philox.gaussian_noise(7, ids, 4, 11, N)
    inputs = [t.clone() for t in (w, grad, ws, v)]
    new, v_new = sgld_step(w, grad, ws, v, xi, m, lr=lr, nbeta=nbeta, gamma=gamma, settings=settings,
                           stat_scale=settings.statistic_scale(4))
    assert all(torch.equal(a, b) for a, b in zip(inputs, (w, grad, ws, v)))
    w_b, v_b = w.clone(), v.clone()
    reference_update(w_b, grad, ws, v_b, lr=lr[:, 0], nbeta=nbeta[:, 0], gamma=gamma[:, 0], settings=settings,
                     counters=counters, seed=7, chain_ids=ids, mask=m, index_offset=11)
    assert torch.equal(new, w_b) and torch.equal(v_new, v_b)
