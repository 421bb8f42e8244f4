"""The counter-based noise specification (docs/noise.md), in its torch reference."""
import math

import numpy as np
import pytest
import torch

from llc_fast.kernels import philox as P

# Philox4x32-10 known-answer vectors (Salmon et al., Random123): (counter, key) -> output
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, 2**64 - 1, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), 0xA4093822 | (0x299F31D0 << 32),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,seed,expected", KNOWN_ANSWERS)
def test_philox_known_answers(counter, seed, expected):
    c = [torch.tensor([v], dtype=torch.int64) for v in counter]
    assert tuple(int(w) for w in P.philox4x32(*c, seed)) == expected


def test_uniform_conversion_edges():
    words = torch.tensor([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF], dtype=torch.int64)
    u = P.uniform_from_word(words)
    # signed view: 0, 1, 2^31-1, -2^31 -> 2^31-1, -1 -> 0
    scale = np.float32(4.6566127342e-10)
    big = np.float32(2**31 - 1) * scale
    assert u.tolist() == [0.0, float(np.float32(1) * scale), float(big), float(big), 0.0]
    assert float(big) < 1.0


def test_gaussian_noise_is_group_of_four_box_muller():
    seed, step, chain = 1234, 7, 3
    words = P.philox4x32(torch.tensor([2]), torch.tensor([0]), torch.tensor([step]), torch.tensor([chain]), seed)
    u = [P.uniform_from_word(w) for w in words]
    n0, n1 = P.box_muller(u[0], u[1])
    n2, n3 = P.box_muller(u[2], u[3])
    got = P.gaussian_noise(seed, torch.tensor([chain]), step, 8, 4)[0]  # elements 8..11 = group 2
    assert torch.equal(got, torch.cat([n0, n1, n2, n3]))


def test_noise_independent_of_chain_batching():
    chains = torch.tensor([0, 5, 2**31 - 1])
    together = P.gaussian_noise(99, chains, 3, 10, 37)
    for k, c in enumerate(chains):
        assert torch.equal(together[k], P.gaussian_noise(99, c.reshape(1), 3, 10, 37)[0])


@pytest.mark.parametrize("cut", [1, 2, 5, 17])
def test_noise_independent_of_buffer_split(cut):
    chains = torch.tensor([0, 1])
    whole = P.gaussian_noise(7, chains, 11, 3, 40)
    parts = torch.cat([P.gaussian_noise(7, chains, 11, 3, cut), P.gaussian_noise(7, chains, 11, 3 + cut, 40 - cut)], 1)
    assert torch.equal(whole, parts)
    words = P.rounding_words(7, chains, 11, 3, 40)
    assert torch.equal(words, torch.cat([P.rounding_words(7, chains, 11, 3, cut),
                                         P.rounding_words(7, chains, 11, 3 + cut, 40 - cut)], 1))


def test_offsets_past_2_pow_32_use_the_high_counter_word():
    base = 2**34 + 4
    words = P.rounding_words(5, torch.tensor([0]), 0, base, 4)[0]
    g = base // 4
    expected = P.philox4x32(torch.tensor([g & P.MASK32]), torch.tensor([g >> 32]), torch.tensor([0]),
                            torch.tensor([P.STREAM_ROUNDING << 31]), 5)
    assert words.tolist() == [int(w) for w in expected]
    # and differs from the wrapped-around index
    assert not torch.equal(words, P.rounding_words(5, torch.tensor([0]), 0, base % 2**32, 4)[0])


def test_streams_steps_chains_seeds_give_different_noise():
    ref = P.gaussian_noise(1, torch.tensor([0]), 0, 0, 64)
    for other in (P.gaussian_noise(2, torch.tensor([0]), 0, 0, 64), P.gaussian_noise(1, torch.tensor([1]), 0, 0, 64),
                  P.gaussian_noise(1, torch.tensor([0]), 1, 0, 64)):
        assert (ref != other).all()


def test_gaussian_moments():
    """Mean 0, variance 1, kurtosis 3, within 4 standard errors of the sample moments."""
    n = 400_000
    z = P.gaussian_noise(3, torch.tensor([0, 1]), 0, 0, n // 2).double().reshape(-1)
    assert abs(z.mean().item()) < 4 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 4 * math.sqrt(2 / n)
    assert abs((z**4).mean().item() - 3) < 4 * math.sqrt(96 / n)
    assert z.abs().max().item() < 5.7


def test_bad_counters_raise():
    with pytest.raises(ValueError, match="chain"):
        P.gaussian_noise(0, torch.tensor([2**31]), 0, 0, 4)
    with pytest.raises(ValueError, match="step"):
        P.gaussian_noise(0, torch.tensor([0]), 2**32, 0, 4)
    with pytest.raises(ValueError, match="seed"):
        P.gaussian_noise(-1, torch.tensor([0]), 0, 0, 4)


def test_stochastic_rounding_exact_cases():
    x = torch.tensor([1.0, 1.0 + 2**-10, -(1.0 + 2**-10), float("inf"), float("nan")])
    zeros = torch.zeros(5, dtype=torch.int64)
    ones = torch.full((5,), 0xFFFF, dtype=torch.int64)
    down = P.stochastic_round_to_bf16(x, zeros).float()
    up = P.stochastic_round_to_bf16(x, ones).float()
    ulp = 2**-7  # bfloat16 spacing in [1, 2)
    assert down[:3].tolist() == [1.0, 1.0, -1.0]  # truncation toward zero
    assert up[:3].tolist() == [1.0, 1.0 + ulp, -(1.0 + ulp)]  # exact values never move; others go away from zero
    assert math.isinf(up[3]) and math.isnan(up[4])


def test_stochastic_rounding_is_unbiased():
    n = 200_000
    frac = 0.3
    x = torch.full((n,), 1.0 + frac * 2**-7)
    words = P.rounding_words(11, torch.tensor([0]), 0, 0, n)[0]
    r = P.stochastic_round_to_bf16(x, words).double()
    p_up = (r > 1.0).double().mean().item()
    # each value rounds up independently with probability frac: binomial standard error
    assert abs(p_up - frac) < 4 * math.sqrt(frac * (1 - frac) / n)
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
