"""Counter-based noise: Philox4x32-10 exactly as Triton computes it, in plain torch.

This is the reference of the noise specification in ``docs/noise.md``. The noise of one
element is a pure function of (seed, chain, step, global element index), so a chain is the
same whatever the batching of chains, the split of the flat buffer into shards, or the
number of processes. All fast backends (Triton, CUDA, C++) implement the same function.

Integers are held in int64 tensors with values in [0, 2**32): torch has no full uint32
arithmetic, and a 32x32-bit product is formed from two 32x16-bit products to stay
inside int64.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

MASK32 = 0xFFFFFFFF
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10

#: Counter word 3 carries the chain index in its low 31 bits and the stream in bit 31.
STREAM_GAUSSIAN = 0
STREAM_ROUNDING = 1
MAX_CHAIN = 2**31 - 1
MAX_STEP = 2**32 - 1
MAX_SEED = 2**64 - 1

UNIFORM_SCALE = 4.6566127342e-10  # Triton's int32 -> [0, 1) scale
TWO_PI = 6.283185307179586
MIN_UNIFORM = 1.0e-7


def _mulhilo(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of const * x for const < 2**32 and int64 x in [0, 2**32)."""
    p_lo = x * (const & 0xFFFF)  # < 2**48
    p_hi = x * (const >> 16)  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & MASK32
    return hi, lo


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 of counters (c0, c1, c2, c3) under key (seed low word, seed high word).

    Counters are broadcastable int64 tensors (or Python ints) with values in [0, 2**32); returns
    four int64 tensors of 32-bit words of their broadcast shape, as
    ``triton.language.philox(seed, c0, c1, c2, c3)`` does. Integer arithmetic is exact, so the
    early rounds run on the counters' own shapes (after four rounds every word depends on all four).
    """
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}")
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def uniform_from_word(word: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float``: a 32-bit word -> float32 in [0, 1)."""
    signed = torch.where(word >= 2**31, word - 2**32, word)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's ``pair_uniform_to_normal`` in float32: two uniforms -> two normals."""
    u1 = torch.clamp_min(u1, MIN_UNIFORM)
    theta = torch.tensor(TWO_PI, dtype=torch.float32) * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(theta), r * torch.sin(theta)


def check_counters(chain_ids: torch.Tensor, step: int, start: int) -> None:
    """ValueError unless the chain indices, the step and the first global element index are in range."""
    if chain_ids.numel() and not (0 <= int(chain_ids.min()) and int(chain_ids.max()) <= MAX_CHAIN):
        raise ValueError(f"chain indices must lie in [0, 2**31), got {chain_ids.tolist()}")
    if not 0 <= step <= MAX_STEP:
        raise ValueError(f"step must lie in [0, 2**32), got {step}")
    if start < 0:
        raise ValueError(f"global element index must be >= 0, got {start}")


class QuadCounters(NamedTuple):
    """The counters of the quads covering elements [start, start + count) of each chain (a quad: the
    four elements 4q .. 4q+3 that one Philox call serves), but the step (word c2): what ``words_at`` and ``normals_at`` take, built once by ``quad_counters``."""

    c0: torch.Tensor  # [1, Q] quad index mod 2**32
    c1: torch.Tensor  # [1, Q] quad index // 2**32
    c3: torch.Tensor  # [C, 1] chain + stream * 2**31
    first: int  # element index of lane 0 of the first quad
    start: int
    count: int


def quad_counters(chain_ids: torch.Tensor, start: int, count: int, stream: int) -> QuadCounters:
    """The ``QuadCounters`` of elements [start, start + count) of the chains ``chain_ids`` (unchecked:
    ``check_counters`` is the caller's)."""
    device = chain_ids.device
    g0 = start // 4
    g1 = (start + count - 1) // 4 + 1 if count > 0 else g0
    quads = torch.arange(g0, g1, dtype=torch.int64, device=device)[None, :]
    c3 = (chain_ids.to(torch.int64) | (stream << 31))[:, None]
    return QuadCounters(quads & MASK32, quads >> 32, c3, g0 * 4, start, count)


def counter_words(counters: QuadCounters, seed: int, step: int) -> torch.Tensor:
    """Philox words [C, Q, 4] of the quads of ``counters`` at ``step``."""
    return torch.stack(philox4x32(counters.c0, counters.c1, step, counters.c3, seed), dim=-1)


def quad_words(
    seed: int, chain_ids: torch.Tensor, step: int, start: int, count: int, stream: int
) -> tuple[torch.Tensor, int]:
    """Philox words for the quads (four elements, one Philox call) covering elements [start, start + count).

    Returns (words [C, Q, 4] int64, first element index of quad 0).
    """
    check_counters(chain_ids, step, start)
    counters = quad_counters(chain_ids, start, count, stream)
    return counter_words(counters, seed, step), counters.first


def per_element(values: torch.Tensor, first: int, start: int, count: int) -> torch.Tensor:
    """[C, Q, 4] per-quad values -> [C, count] values of elements [start, start + count)."""
    flat = values.reshape(values.shape[0], -1)
    return flat[:, start - first : start - first + count]


def normals_at(counters: QuadCounters, seed: int, step: int) -> torch.Tensor:
    """``gaussian_noise`` of the elements and chains of ``counters`` (stream 0) at ``step``: float32 [C, count]."""
    u = uniform_from_word(counter_words(counters, seed, step))
    n0, n1 = box_muller(u[..., 0], u[..., 1])
    n2, n3 = box_muller(u[..., 2], u[..., 3])
    return per_element(torch.stack((n0, n1, n2, n3), dim=-1), counters.first, counters.start, counters.count)


def words_at(counters: QuadCounters, seed: int, step: int) -> torch.Tensor:
    """``rounding_words`` of the elements and chains of ``counters`` (stream 1) at ``step``: int64 [C, count]."""
    return per_element(counter_words(counters, seed, step), counters.first, counters.start, counters.count)


def gaussian_noise(seed: int, chain_ids: torch.Tensor, step: int, start: int, count: int) -> torch.Tensor:
    """Standard normals of elements [start, start + count) of each chain: float32 [C, count].

    Quad q's words (w0, w1, w2, w3) give (n0, n1) = BoxMuller(u(w0), u(w1)) and
    (n2, n3) = BoxMuller(u(w2), u(w3)); element 4q + j takes n_j.
    """
    check_counters(chain_ids, step, start)
    return normals_at(quad_counters(chain_ids, start, count, STREAM_GAUSSIAN), seed, step)


def rounding_words(seed: int, chain_ids: torch.Tensor, step: int, start: int, count: int) -> torch.Tensor:
    """Random 32-bit words (int64 [C, count]) that drive stochastic rounding of elements."""
    check_counters(chain_ids, step, start)
    return words_at(quad_counters(chain_ids, start, count, STREAM_ROUNDING), seed, step)


def stochastic_round_to_bf16(x: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Round float32 ``x`` to bfloat16, up with probability equal to the discarded fraction.

    Adds the low 16 bits of ``words`` to the float32 bit pattern and truncates: unbiased,
    E[round(x)] = x. NaN and infinity are rounded to nearest.
    """
    bits = x.contiguous().view(torch.int32).to(torch.int64) & MASK32
    upper = ((bits + (words & 0xFFFF)) >> 16) & 0xFFFF
    upper = upper - ((upper >> 15) << 16)  # to the signed int16 range
    rounded = upper.to(torch.int16).view(torch.bfloat16)
    return torch.where(torch.isfinite(x), rounded, x.to(torch.bfloat16))
