"""devinterp 2.x on llc_fast's engine: ``llc``, ``sample``, ``compute_llc`` (language models, per-token losses);
``susceptibilities`` (``susceptibility.py``) samples all its weight restrictions with this module's machinery."""
from __future__ import annotations

import warnings

import numpy as np

from .common import CONVENTIONS, V2_MESSAGE, DevinterpCompatWarning, warn_once
from .runs import cached_output, lm_logits, make_plan, param_restriction, per_token_loss, sample_trees, to_obs_id

__all__ = ["sample", "compute_llc", "llc", "lm_logits", "per_token_loss", "to_obs_id"]


def sample(model, dataset, observables, *, lr: float, n_beta: float, param_masks=None, num_chains: int = 4,
           num_draws: int = 200, batch_size: int = 32, num_burnin_steps: int = 0, num_steps_bw_draws: int = 1,
           num_init_loss_batches: int = 32, init_seed: int = 100, batches_per_draw: int = 3, obs_seed: int = 1337,
           gradient_accumulation_steps: int = 1, localization: float = 0.0, noise_level: float = 1.0,
           llc_weight_decay: float = 0.0, bounding_box_size: float | None = None,
           sampling_method="sgmcmc_sgld", sampling_method_kwargs: dict | None = None,
           rmsprop_eps: float | None = None, rmsprop_alpha: float | None = None, shuffle: bool = True,
           match_sampling_input_ids_across_chains: bool = True, init_noise: float | None = None,
           device: str | None = None, save_metrics: bool = False, output_path=None, loss_fn=None,
           conventions: str = "devinterp", backend: str = "auto", progress: bool = True):
    """devinterp 2.0.1's ``sample``: SGLD chains over a language-model dataset (``input_ids`` column), on
    llc_fast's engine. Returns an ``xarray.DataTree`` with ``sampling_loss_micro`` (chain, step,
    batch_sampling, token_pos), ``sampling_loss`` (chain, draw, batch, token_pos), ``init_loss`` (chain,
    token_pos) and devinterp's ``metadata`` attribute; the batch dims have size 1 (the mean loss of each step),
    and so has token_pos without observables (with them it has their size and repeats that mean).
    observables {name: Dataset or (Dataset, batches_per_draw)}: as devinterp, batches_per_draw x batch_size rows
    of each chosen once (obs_seed), ``input_ids_<id>`` (batch_<id>, token) and their per-token losses at every draw
    ``loss_<id>`` (chain, draw, batch_<id>, token_pos), <id> = ``to_obs_id(name)``.
    llc_fast extras: ``conventions`` (recorded for ``compute_llc``), ``backend``, ``progress``.
    """
    plan = make_plan(dict(locals()))
    if output_path is not None:
        cached = cached_output(output_path, plan.config)
        if cached is not None:
            return cached
    tree, = sample_trees(model, plan, {"sample": param_restriction(model, param_masks, "param_masks")}).values()
    if output_path is not None:
        tree.to_zarr(str(output_path), consolidated=False)
    return tree


def compute_llc(samples, *, conventions: str | None = None):
    """devinterp 2.0.1's ``compute_llc``: LLC from a sampling DataTree (this module's or devinterp's).

    conventions "devinterp" (the default, unless ``sample`` recorded another): each chain's mean loss over
    every step (burn-in included), ``llc_std`` with ddof=0, NaN steps skipped. "llc_fast": only the draws
    after burn-in, ddof=1, a chain with a NaN/Inf draw left out. Returns an ``xarray.Dataset`` with
    llc_mean, llc_std, llc_per_chain (chain), llc_scalar, loss_trace (chain, step), init_loss.
    """
    return _compute_llc(samples, conventions, stacklevel=4)


def _compute_llc(samples, conventions: str | None, stacklevel: int):
    import xarray as xr

    ds = samples.dataset if hasattr(samples, "dataset") and not isinstance(samples, xr.Dataset) else samples
    if conventions is None:
        conventions = ds.attrs.get("llc_fast", {}).get("conventions", "devinterp")
    if conventions not in CONVENTIONS:
        raise ValueError(f"conventions must be one of {CONVENTIONS}, got {conventions!r}")
    sampler_cfg = ds.attrs["metadata"]["config"]["sampler"]
    n_beta = float(sampler_cfg["n_beta"])
    init_loss = float(ds.init_loss.values.mean())
    loss_trace = ds.sampling_loss_micro.mean(dim=["batch_sampling", "token_pos"])
    if conventions == "devinterp":
        warn_once("v2", V2_MESSAGE, stacklevel=stacklevel)
        per_chain = n_beta * (loss_trace.mean(dim="step") - init_loss)
        llc_mean, llc_std = per_chain.mean(), per_chain.std()
        llc_scalar = n_beta * (float(ds.sampling_loss_micro.mean()) - init_loss)
    else:
        burnin, every = int(sampler_cfg["num_burnin_steps"]), int(sampler_cfg["num_steps_bw_draws"])
        draws = loss_trace.isel(step=slice(burnin, None, every)).isel(step=slice(0, int(sampler_cfg["num_draws"])))
        per_chain = n_beta * (draws.mean(dim="step", skipna=False) - init_loss)
        ok = per_chain.values[np.isfinite(per_chain.values)]
        llc_mean = xr.DataArray(np.float32(ok.mean()) if ok.size else np.float32(np.nan))
        llc_std = xr.DataArray(np.float32(ok.std(ddof=1)) if ok.size > 1 else np.float32(np.nan))
        llc_scalar = float(llc_mean)
    return xr.Dataset({"llc_mean": llc_mean, "llc_std": llc_std, "llc_per_chain": per_chain,
                       "llc_scalar": llc_scalar, "loss_trace": loss_trace, "init_loss": init_loss})


def llc(model, dataset, observables, *, lr: float, n_beta: float, param_masks=None, loss_fn=None, **kwargs):
    """devinterp 2.0.1's ``llc``: sample and compute the LLC in one call (``sample``'s keyword arguments
    pass through). Returns an ``xarray.Dataset`` with llc_mean, llc_std, llc_per_chain, llc_scalar,
    loss_trace and init_loss. ``observables`` are not used by the LLC and not computed here."""
    if observables:
        warnings.warn("observables are not computed by llc() (the LLC does not use them; sample() computes them)",
                      DevinterpCompatWarning, stacklevel=2)
    samples = sample(model, dataset, {}, lr=lr, n_beta=n_beta, param_masks=param_masks, loss_fn=loss_fn, **kwargs)
    return _compute_llc(samples, None, stacklevel=4)


