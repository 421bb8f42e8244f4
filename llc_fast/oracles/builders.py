"""Models and data sets whose learning coefficient is known, for end-to-end tests of an LLC sampler.

All randomness comes from a local `torch.Generator` seeded by the caller; the global RNG is never touched.
Weights are drawn and rank-reduced in float64 and stored as float32.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from llc_fast.oracles.dln import check_widths_and_rank


def _linear_stack(weights: Sequence[torch.Tensor]) -> nn.Sequential:
    """Bias-free float32 `nn.Linear` layers holding the given (out, in) weights, first layer first."""
    layers = []
    for w in weights:
        # skip_init builds the layer without running its random initializer (which uses the global RNG).
        layer = nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=False, dtype=torch.float32)
        with torch.no_grad():
            layer.weight.copy_(w)
        layers.append(layer)
    return nn.Sequential(*layers)


def make_dln(widths: Sequence[int], rank: int, *, seed: int = 0, scale: float = 1.0) -> nn.Sequential:
    """Deep linear network widths[0] → ... → widths[-1] whose every layer weight has rank exactly `rank`.

    Each weight is scale·A·B/√rank with A (out, rank) and B (rank, in) standard Gaussian, so its entries
    have standard deviation `scale`; rank 0 gives zero matrices. At such a teacher the local learning
    coefficient equals `dln_learning_coefficient(widths, rank)`. Outputs grow like (√width·scale)^depth:
    pass scale ≈ 1/√width for deep, wide networks.

    Args:
        widths: (input, hidden..., output) widths, at least 2 positive ints.
        rank: layer rank, 0 <= rank <= min(widths).
        seed: seed of the local generator; the same seed gives the same weights.
        scale: entry standard deviation, > 0.
    """
    widths, rank = check_widths_and_rank(widths, rank)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    gen = torch.Generator().manual_seed(seed)
    weights = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        if rank == 0:
            weights.append(torch.zeros(fan_out, fan_in, dtype=torch.float64))
            continue
        a = torch.randn(fan_out, rank, generator=gen, dtype=torch.float64)
        b = torch.randn(rank, fan_in, generator=gen, dtype=torch.float64)
        weights.append(a @ b * (scale / rank ** 0.5))
    return _linear_stack(weights)


def make_random_rank_dln(widths: Sequence[int], *, seed: int = 0,
                         reduce_prob: float = 0.5) -> tuple[nn.Sequential, int]:
    """Teacher DLN by the random-rank protocol of Lau et al. (AISTATS 2025).

    Each layer starts as a Gaussian matrix with entries N(0, 1/fan_in). With probability `reduce_prob`
    its rank is reduced to a uniformly random lower rank in {0, ..., min(out, in) − 1} by zeroing its
    smallest singular values.

    Returns:
        (model, rank of the end-to-end product W_L ⋯ W_1), the rank computed by
        `torch.linalg.matrix_rank` on the float64 product. Pass both to `dln_learning_coefficient`.
        The float64 rank is reliable for moderate depth; very deep products of near-square layers become
        ill-conditioned and the numerical rank can fall below the generic rank min_j rank(W_j).
    """
    widths, _ = check_widths_and_rank(widths, 0)
    if not 0.0 <= reduce_prob <= 1.0:
        raise ValueError(f"reduce_prob must be a probability in [0, 1], got {reduce_prob!r}")
    gen = torch.Generator().manual_seed(seed)
    weights = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        w = torch.randn(fan_out, fan_in, generator=gen, dtype=torch.float64) / fan_in ** 0.5
        if torch.rand((), generator=gen, dtype=torch.float64) < reduce_prob:
            new_rank = int(torch.randint(min(fan_in, fan_out), (), generator=gen))
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            w = (u[:, :new_rank] * s[:new_rank]) @ vh[:new_rank]
        weights.append(w)
    product = weights[0]
    for w in weights[1:]:
        product = w @ product
    return _linear_stack(weights), int(torch.linalg.matrix_rank(product))


def dln_dataset(model: nn.Module, num_samples: int, *, seed: int = 0,
                input_range: float = 10.0) -> TensorDataset:
    """Noise-free regression data (x, y = model(x)) with x uniform on [−input_range, input_range).

    Returns a TensorDataset of x, shape (num_samples, in_features), and y, shape (num_samples,
    out_features), in the dtype of the model's first `nn.Linear` layer.
    """
    first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise ValueError("model has no nn.Linear layer to read the input width from; pass a DLN "
                         "such as make_dln(...)")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not input_range > 0:
        raise ValueError(f"input_range must be > 0, got {input_range!r}")
    gen = torch.Generator().manual_seed(seed)
    weight = first.weight
    x = torch.rand(num_samples, first.in_features, generator=gen, dtype=weight.dtype)
    x = ((2 * x - 1) * input_range).to(weight.device)
    with torch.no_grad():
        y = model(x)
    return TensorDataset(x, y)


def dln_hessian_eigenvalues(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Eigenvalues of the Hessian of `mse_loss` at the teacher of noise-free data (x, model(x)), exactly
    (float64), for a bias-free DLN such as `make_dln`'s: the curvature the quadratic oracles need.

    With f(x) = W_L ⋯ W_1 x, m outputs and p inputs, the residuals vanish at the teacher, so the Hessian is
    the Gauss–Newton matrix H = (2/m)·E_x[J(x)ᵀJ(x)], and J(x)·δ = M(δ)·x with M(δ) = Σ_j A_j·δW_j·B_j,
    A_j = W_L ⋯ W_(j+1), B_j = W_(j−1) ⋯ W_1. Hence δᵀHδ = (2/m)·‖M(δ)·S‖²_F with S = Σ_x^(1/2), Σ_x = E[x xᵀ]
    over the given x: H = (2/m)·TᵀT for a linear map T onto the m·p entries of M·S. Its nonzero eigenvalues
    are those of the (m·p)² matrix (2/m)·T·Tᵀ = (2/m)·Σ_j A_j A_jᵀ ⊗ S B_jᵀ B_j S, computed here; the other
    d − m·p eigenvalues are exactly 0. At a teacher of two or more layers, each of rank r, r·(p + m − r) of
    the returned values are nonzero (the dimension of the rank-r matrices), the rest 0 to rounding; one
    layer is regular (all m·p nonzero).

    Args:
        model: `nn.Sequential` of bias-free `nn.Linear` layers (the teacher, w*).
        x: inputs, shape (n, p): the data set's, so that Σ_x is that of the loss.

    Returns:
        The m·p eigenvalues, ascending, float64, rounding's negative values set to 0.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layers or any(layer.bias is not None for layer in layers):
        raise ValueError("dln_hessian_eigenvalues needs a bias-free deep linear network of nn.Linear layers, "
                         "such as make_dln(...)")
    ws = [layer.weight.detach().to("cpu", torch.float64).numpy() for layer in layers]
    x = x.detach().to("cpu", torch.float64).numpy()
    if x.ndim != 2 or x.shape[1] != ws[0].shape[1]:
        raise ValueError(f"x must have shape (n, {ws[0].shape[1]}) (the network's input width), got {x.shape}")
    ev, u = np.linalg.eigh(x.T @ x / x.shape[0])
    s = (u * np.sqrt(np.clip(ev, 0.0, None))) @ u.T  # Σ_x^(1/2)
    m, p = ws[-1].shape[0], ws[0].shape[1]
    gram = np.zeros((m * p, m * p))
    for j in range(len(ws)):
        a = _product(ws[j + 1:], m)  # A_j = W_L ⋯ W_(j+1), [m, H_(j+1)]
        bs = _product(ws[:j], p) @ s  # B_j·S, [H_j, p]
        gram += np.kron(a @ a.T, bs.T @ bs)
    return np.clip(np.linalg.eigvalsh(2.0 / m * gram), 0.0, None)


def _product(ws: Sequence[np.ndarray], width: int) -> np.ndarray:
    """W_k ⋯ W_1 of the layers ``ws`` (first layer first); the identity of ``width`` when there are none."""
    out = np.eye(width) if not ws else ws[0]
    for w in ws[1:]:
        out = w @ out
    return out


def mse_loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean squared error over the batch and the outputs; batch = (x, y). Returns a scalar tensor."""
    x, y = batch[0], batch[1]
    return nn.functional.mse_loss(model(x), y)


def make_regression_example() -> tuple[nn.Linear, TensorDataset]:
    """Linear regression y = 3x + 2 on 100 evenly spaced x in [−1, 1], with the model at the exact
    least-squares solution (weight 3, bias 2), float32.

    A regular model with d = 2, so λ = 1. Under `mse_loss` its Hessian is 2·[[E x², E x], [E x, 1]]
    (eigenvalues 0.680 and 2), which with the quadratic oracles gives exact finite-ε expectations.
    """
    x = torch.linspace(-1.0, 1.0, 100, dtype=torch.float32).unsqueeze(1)
    y = 3.0 * x + 2.0
    model = nn.utils.skip_init(nn.Linear, 1, 1, dtype=torch.float32)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.bias.fill_(2.0)
    return model, TensorDataset(x, y)


__all__ = ["make_dln", "make_random_rank_dln", "dln_dataset", "dln_hessian_eigenvalues", "mse_loss",
           "make_regression_example"]
