"""Exact learning coefficient of deep linear networks (DLNs).

`dln_learning_coefficient` implements Aoyagi (2024), "Consideration on the learning efficiency of
multiple-layered neural networks with linear units", Neural Networks 172:106132, Theorem 1.
`reduced_rank_regression_coefficient` is the independent two-layer result of Aoyagi & Watanabe (2005),
"Stochastic complexities of reduced rank regression in Bayesian estimation", Neural Networks 18(7).

Both are computed in exact rational arithmetic: the textbook floating-point form of Theorem 1 subtracts
numbers of size ~S² and cancels badly once λ reaches 10⁵–10⁷.
"""

from __future__ import annotations

import operator
from fractions import Fraction
from typing import NamedTuple, Sequence


class DLNCoefficient(NamedTuple):
    """Learning coefficient λ (exact) and multiplicity m (the power of log n in the free energy)."""

    llc: Fraction
    multiplicity: int


def as_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got the bool {value!r}; pass an int")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r} of type {type(value).__name__}; "
                         "pass an int") from None


def check_widths_and_rank(widths: Sequence[int], rank: int) -> tuple[list[int], int]:
    try:
        widths = [as_int(h, f"widths[{i}]") for i, h in enumerate(widths)]
    except TypeError:
        raise ValueError(f"widths must be a sequence of ints (input, hidden..., output), "
                         f"got {widths!r}") from None
    if len(widths) < 2:
        raise ValueError(f"widths needs at least 2 entries (input and output width), got {widths!r}")
    if any(h < 1 for h in widths):
        raise ValueError(f"every width must be a positive int, got {widths!r}")
    rank = as_int(rank, "rank")
    if not 0 <= rank <= min(widths):
        raise ValueError(f"rank must satisfy 0 <= rank <= min(widths) = {min(widths)}, got rank={rank}; "
                         "pass the rank of the teacher's end-to-end product matrix")
    return widths, rank


def _find_sigma(deficits: list[int]) -> list[int]:
    """The subset Σ of Theorem 1: the first tie-respecting prefix of the sorted M_j that satisfies
    (i) max_Σ M < min_rest M, (ii) Σ_Σ M ≥ ℓ·max_Σ M, (iii) Σ_Σ M < ℓ·min_rest M, where |Σ| = ℓ + 1."""
    ms = sorted(deficits)
    for size in range(2, len(ms) + 1):
        ell = size - 1
        prefix, rest = ms[:size], ms[size:]
        total = sum(prefix)
        # min over the empty set is +inf, so (i) and (iii) hold trivially for the whole list.
        if rest and not prefix[-1] < rest[0]:
            continue  # the prefix splits a tie
        if total < ell * prefix[-1]:
            continue
        if rest and not total < ell * rest[0]:
            continue
        return prefix
    # Aoyagi proves Σ always exists; reaching here would be a bug in this function.
    raise RuntimeError(f"no admissible subset for deficits {deficits}")


def dln_learning_coefficient(widths: Sequence[int], rank: int) -> DLNCoefficient:
    """Learning coefficient of a bias-free deep linear network at a teacher of the given rank.

    Args:
        widths: layer widths (H_1, ..., H_{L+1}), input first, output last; at least 2 entries.
        rank: rank r of the teacher's end-to-end matrix W_L ⋯ W_1, with 0 <= r <= min(widths).

    Returns:
        DLNCoefficient(llc=λ as a Fraction, multiplicity=m). This is the coefficient of the whole set of
        true parameters; the *local* coefficient at a teacher equals it when every layer has rank exactly r.
    """
    widths, r = check_widths_and_rank(widths, rank)
    sigma = _find_sigma([h - r for h in widths])
    ell = len(sigma) - 1
    s = sum(sigma)
    m_bar = -(-s // ell)  # ceil(S / ℓ)
    a = s - (m_bar - 1) * ell  # 1 <= a <= ℓ
    numerator = (2 * ell * r * (widths[0] + widths[-1] - r) + a * (ell - a)
                 + s * s - ell * sum(m * m for m in sigma))
    return DLNCoefficient(Fraction(numerator, 4 * ell), a * (ell - a) + 1)


def reduced_rank_regression_coefficient(M: int, H: int, N: int, r: int) -> Fraction:
    """Learning coefficient of reduced-rank regression x ↦ B A x (Aoyagi & Watanabe 2005, Theorem 1).

    Args:
        M: input dimension; H: inner width; N: output dimension (all positive).
        r: rank of the teacher's product BA, 0 <= r <= min(M, H, N).

    Returns:
        λ as a Fraction; it equals `dln_learning_coefficient((M, H, N), r).llc`.
    """
    (M, H, N), r = check_widths_and_rank((M, H, N), r)
    if M + H < N + r:
        return Fraction(H * M - H * r + N * r, 2)
    if N + H < M + r:
        return Fraction(H * N - H * r + M * r, 2)
    if M + N < H + r:
        return Fraction(M * N, 2)
    return Fraction(2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2 + (M + H + N + r) % 2, 8)


__all__ = ["DLNCoefficient", "dln_learning_coefficient", "reduced_rank_regression_coefficient"]
