"""devinterp 2.0.1's ``bif`` and ``compute_bif`` (Bayesian influence functions) on llc_fast's engine.

``bif`` samples with this layer's ``sample`` (one llc_fast run; the observables' per-token losses measured at every
draw by the loop's observers) and computes devinterp's estimate with ``compute_bif``, which also reads devinterp's
own sampling DataTrees. devinterp's estimate: every observable's per-token losses ``loss_<id>`` concatenated along
the batch (ids sorted), the chain and draw dims stacked into observations ("stack") or averaged over chains ("mean"),
then for "sequence" the Pearson correlation (or covariance, ddof 1) of the sequences' mean losses, [batch_1,
batch_2], and for "token" that of every pair of token positions of every pair of sequences, [batch_1, batch_2,
target_position, target_position_T] (averaged over the positions with ``average_tokenwise_bif``), in float32 as
devinterp computes it. ``llc_fast.estimate_bif`` is the native estimator (standard errors, components, streaming).
"""
from __future__ import annotations

import numpy as np
import torch

from .v2 import sample

METHODS = ("token", "sequence")
REDUCTIONS = ("stack", "mean")


def bif(model, dataset, observables, *, lr: float, n_beta: float, param_masks=None, correlation_method: str = "token",
        reduce_chain_dimension_method: str = "stack", average_tokenwise_bif: bool = False,
        compute_covariance: bool = False, bif_batch_size: int = 32, bif_device=None, loss_fn=None, **kwargs):
    """devinterp 2.0.1's ``bif``: ``sample`` (its keyword arguments pass through: num_chains, num_draws, batch_size,
    output_path, ...; llc_fast's backend, progress) then ``compute_bif``. Returns an ``xarray.Dataset`` with
    ``influences`` and ``input_ids``. A bad correlation_method or reduce_chain_dimension_method is refused before
    sampling (devinterp's message)."""
    _check_methods(correlation_method, reduce_chain_dimension_method)
    samples = sample(model, dataset, observables, param_masks=param_masks, lr=lr, n_beta=n_beta, loss_fn=loss_fn,
                     **kwargs)
    return compute_bif(samples, correlation_method=correlation_method,
                       reduce_chain_dimension_method=reduce_chain_dimension_method,
                       average_tokenwise_bif=average_tokenwise_bif, compute_covariance=compute_covariance,
                       batch_size=bif_batch_size, device=bif_device)


def _check_methods(correlation_method, reduction) -> None:
    if correlation_method not in METHODS:
        raise ValueError(f"Unknown correlation method: {correlation_method}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"Unknown method: {reduction}")


def compute_bif(samples, *, correlation_method: str = "token", reduce_chain_dimension_method: str = "stack",
                loss_keys="all", batch_index_range_1="all", batch_index_range_2="all",
                average_tokenwise_bif: bool = False, compute_covariance: bool = False, batch_size: int = 32,
                device=None):
    """devinterp 2.0.1's ``compute_bif`` on a sampling DataTree (this layer's or devinterp's): the module docstring's
    estimate between the batch rows ``batch_index_range_1`` and ``batch_index_range_2`` ("all" or indices) of the
    observables ``loss_keys`` ("all" or ids). Returns an ``xarray.Dataset``: ``influences`` and ``input_ids`` (batch,
    position)."""
    import xarray as xr

    _check_methods(correlation_method, reduce_chain_dimension_method)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ds = samples if isinstance(samples, xr.Dataset) else samples.dataset
    keys = _loss_keys(ds, loss_keys)
    losses = _observations(_concatenated(ds, keys, "loss"), correlation_method, reduce_chain_dimension_method)
    one, two = (losses if rows == "all" else losses.sel(batch=list(rows))
                for rows in (batch_index_range_1, batch_index_range_2))
    coords = {"batch_1": np.asarray(one.coords["batch"].values), "batch_2": np.asarray(two.coords["batch"].values)}
    if correlation_method == "sequence":
        matrix = _pairs(torch.as_tensor(one.data, device=device)[:, None], torch.as_tensor(two.data, device=device)[
            :, None], compute_covariance)[:, :, 0, 0]
        out = xr.Dataset({"influences": (("batch_1", "batch_2"), matrix.cpu().numpy())}, coords=coords)
    else:
        out = _tokenwise(one, two, coords, average_tokenwise_bif, compute_covariance, batch_size, device)
    ids = _concatenated(ds, keys, "input_ids")
    while ids.ndim > 2:
        ids = ids.isel({ids.dims[0]: 0})
    out["input_ids"] = ids
    scalar = [c for c in out.coords if out[c].ndim == 0]
    return out.drop_vars(scalar) if scalar else out


def _loss_keys(ds, loss_keys) -> list[str]:
    ids = [str(v)[len("loss_"):] for v in ds.data_vars if str(v).startswith("loss_") and str(v) != "sampling_loss"]
    if loss_keys == "all":
        return sorted(ids)
    missing = [k for k in loss_keys if k not in ids]
    if missing:
        raise KeyError(f"Loss key(s) {missing} not found. Available: {ids}")
    return list(loss_keys)


def _concatenated(ds, keys: list[str], prefix: str):
    """The observables' ``<prefix>_<id>`` along one "batch" dim (token_pos -> target_position, token -> position)."""
    import xarray as xr

    def renamed(a, oid):
        names = {f"batch_{oid}": "batch", "token_pos": "target_position", "token": "position"}
        return a.rename({d: names[d] for d in map(str, a.dims) if d in names})

    return xr.concat([renamed(ds[f"{prefix}_{k}"], k) for k in keys], dim="batch").load()


def _observations(losses, method: str, reduction: str):
    """The losses as [batch, (target_position,) observation], the observations chain x draw ("stack") or the
    draws of the mean over chains ("mean")."""
    import xarray as xr

    if method == "sequence":
        losses = losses.mean(dim="target_position", keep_attrs=True)
    expected = ("chain", "draw", "batch") + (("target_position",) if method == "token" else ())
    if losses.dims != expected:
        raise ValueError(f"Expected dims {expected}, got {losses.dims}")
    missing = {d: xr.DataArray(np.arange(losses.sizes[d]), dims=(d,)) for d in expected
               if d not in losses.coords or losses[d].dims != (d,)}
    losses = losses.assign_coords(missing) if missing else losses
    if reduction == "stack":
        return losses.stack(chain_draw=("chain", "draw"))
    return losses.mean(dim="chain", keep_attrs=True).rename({"draw": "chain_draw"}).transpose(
        "batch", *(("target_position",) if method == "token" else ()), "chain_draw")


def _pairs(a: torch.Tensor, b: torch.Tensor, covariance: bool) -> torch.Tensor:
    """[n_a, n_b, Sa, Sb]: the covariance (ddof 1) or correlation of every series of a [n_a, Sa, N] with every series
    of b [n_b, Sb, N] (observations N), in their dtype."""
    a = a - a.mean(dim=2, keepdim=True)
    b = b - b.mean(dim=2, keepdim=True)
    cov = torch.einsum("isn,jtn->ijst", a, b) / (a.shape[2] - 1)
    if covariance:
        return cov
    sa = torch.sqrt((a * a).sum(dim=2) / (a.shape[2] - 1))
    sb = torch.sqrt((b * b).sum(dim=2) / (b.shape[2] - 1))
    return cov / (sa[:, None, :, None] * sb[None, :, None, :])


@torch.no_grad()
def _tokenwise(one, two, coords: dict, average: bool, covariance: bool, batch_size: int, device):
    """devinterp's token-wise BIF Dataset, computed in blocks of ``batch_size`` sequences of each side."""
    import xarray as xr

    n1, n2, T = one.sizes["batch"], two.sizes["batch"], one.sizes["target_position"]
    out = np.empty((n1, n2) if average else (n1, n2, T, T), dtype=np.float32)
    for i in range(0, n1, batch_size):
        a = torch.as_tensor(one.isel(batch=slice(i, i + batch_size)).data, device=device)
        for j in range(0, n2, batch_size):
            block = _pairs(a, torch.as_tensor(two.isel(batch=slice(j, j + batch_size)).data, device=device), covariance)
            out[i:i + batch_size, j:j + batch_size] = (block.mean(dim=(-1, -2)) if average else block).cpu().numpy()
    dims = ["batch_1", "batch_2"]
    if not average:
        dims += ["target_position", "target_position_T"]
        coords = dict(coords, target_position=np.arange(1, T + 1), target_position_T=np.arange(1, T + 1))
    return xr.DataArray(out, name="influences", dims=dims, coords=coords).to_dataset()
