"""devinterp 2.x on llc_fast's engine: ``llc``, ``sample``, ``compute_llc`` (language models, per-token losses)."""
from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import torch

from ...api import estimate_llc
from ...chains.trace import nan_from_first_bad
from .common import (_V2_MESSAGE, CONVENTIONS, DevinterpCompatWarning, _divergence_handled, _only_sampled,
                     _resolve_masks, _seed_from, _train_mode, _warn_once)
from .optim import sampler_name

def lm_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a language model, called as devinterp 2.x does (HF, TransformerLens or plain modules)."""
    if hasattr(model, "cfg") and hasattr(model.cfg, "n_heads"):  # TransformerLens
        return model(input_ids, return_type="logits")
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        return model(input_ids, return_dict=False, use_cache=False)[0]
    out = model(input_ids)
    return out.logits if hasattr(out, "logits") else out


def per_token_loss(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per token, (batch, seq-1): devinterp 2.x's default loss (without its
    host-side finiteness check, so that chains can be batched; a NaN loss still marks a chain diverged)."""
    log_probs = torch.log_softmax(lm_logits(model, input_ids), dim=-1)
    return -log_probs[..., :-1, :].gather(dim=-1, index=input_ids[..., 1:, None])[..., 0]


class _MeanTokenLoss:
    """llc_fast's loss_fn(model, batch) from devinterp 2.x's per-token loss_fn(model, input_ids)."""

    def __init__(self, loss_fn):
        self.loss_fn = loss_fn or per_token_loss

    def __call__(self, model, batch):
        input_ids = batch["input_ids"]
        loss = self.loss_fn(model, input_ids)
        expected = tuple(input_ids.shape[:-1]) + (input_ids.shape[-1] - 1,)
        if tuple(loss.shape) != expected:
            raise ValueError(f"loss_fn must return per-token loss of shape {expected}, got {tuple(loss.shape)}")
        return loss.float().mean()


class _Batches:
    """devinterp 2.x's batches: micro-batches of ``batch_size`` rows (drop_last) in its DataLoader order,
    ``accumulation`` consecutive micro-batches concatenated into one batch. With a fixed ``order`` every pass
    replays it (devinterp cycles its first epoch); with ``order=None`` each pass draws a fresh shuffle from
    torch's global RNG, which llc_fast seeds per chain and pass."""

    def __init__(self, dataset, batch_size: int, accumulation: int, order: torch.Tensor | None, shuffle: bool):
        self.dataset, self.batch_size, self.accumulation = dataset, batch_size, accumulation
        self.order, self.shuffle = order, shuffle
        self.n = len(dataset)
        micro = self.n // batch_size
        if micro == 0:
            raise ValueError(f"the dataset has {self.n} rows, fewer than batch_size={batch_size}")
        self.repeats = accumulation // math.gcd(micro, accumulation)  # passes of micro-batches per cycle
        self.num_batches = micro * self.repeats // accumulation

    def __len__(self) -> int:
        return self.num_batches

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.tolist()
        if hasattr(self.dataset, "column_names"):  # HuggingFace Dataset: one gather
            col = self.dataset[idx]["input_ids"]
        else:
            col = [self.dataset[i]["input_ids"] for i in idx]
        if isinstance(col, torch.Tensor):
            return col.long()
        return torch.stack([torch.as_tensor(r) for r in col]).long()

    def __iter__(self):
        micro = self.n // self.batch_size
        used = micro * self.batch_size
        orders = []
        for _ in range(self.repeats):
            if self.order is not None:
                orders.append(self.order[:used])
            elif self.shuffle:
                orders.append(torch.randperm(self.n)[:used])
            else:
                orders.append(torch.arange(used))
        flat = torch.cat(orders)
        rows = self.batch_size * self.accumulation
        for k in range(self.num_batches):
            yield {"input_ids": self._rows(flat[k * rows:(k + 1) * rows])}


def _loader_order(n: int, batch_size: int, shuffle: bool, seed: int) -> torch.Tensor:
    """The row order of devinterp's DataLoader(shuffle, generator seeded ``seed``, drop_last) first epoch."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    batches = list(torch.utils.data.DataLoader(range(n), batch_size=batch_size, shuffle=shuffle, generator=gen,
                                               drop_last=True))
    return torch.cat(batches) if batches else torch.zeros(0, dtype=torch.int64)


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
    token_pos) and devinterp's ``metadata`` attribute; the batch and token dims have size 1 (the mean loss
    of each step). llc_fast extras: ``conventions`` (recorded for ``compute_llc``), ``backend``, ``progress``.
    """
    import xarray as xr

    if conventions not in CONVENTIONS:
        raise ValueError(f"conventions must be one of {CONVENTIONS}, got {conventions!r}")
    if observables:
        raise NotImplementedError(
            "observables (per-draw losses on other datasets, for susceptibilities) are not computed by llc_fast; "
            "pass observables={} (llc() does not use them)")
    if init_noise:
        raise NotImplementedError("init_noise is not supported: llc_fast starts every chain at the trained weights")
    if save_metrics:
        raise NotImplementedError("save_metrics is not supported; for MALA acceptance use llc_fast.estimate_llc(mala_every=k)")
    kw = dict(sampling_method_kwargs or {})
    if not isinstance(sampling_method, str) or sampling_method in ("sgmcmc_sgld", "rmsprop_sgld"):
        sampler = sampler_name(sampling_method)
    else:
        raise ValueError(f"Unknown sampling method {sampling_method}")
    for name, value in (("eps", rmsprop_eps), ("alpha", rmsprop_alpha)):
        if value is None:
            continue
        if sampler != "rmsprop_sgld":
            raise ValueError(f"rmsprop_{name} can only be set when sampling_method='rmsprop_sgld', "
                             f"got sampling_method={sampling_method!r}")
        if name in kw:
            raise ValueError(f"rmsprop_{name} is set both as a top-level argument and in "
                             f"sampling_method_kwargs[{name!r}]; specify only one.")
        kw[name] = value
    if kw.pop("add_grad_correction", False):
        raise NotImplementedError("add_grad_correction=True is not implemented (devinterp raises too)")
    alpha, eps = kw.pop("alpha", 0.99), kw.pop("eps", 0.1)
    if kw:
        raise TypeError(f"unexpected sampling_method_kwargs {sorted(kw)}")
    for name, value in (("batch_size", batch_size), ("gradient_accumulation_steps", gradient_accumulation_steps),
                        ("num_steps_bw_draws", num_steps_bw_draws), ("num_draws", num_draws)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    context_length = len(dataset[0]["input_ids"]) - 1
    if context_length < 1:
        raise ValueError(f"Sequences must have length >= 2 for next-token loss (got {context_length + 1}).")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    config = dict(
        lr=lr, n_beta=n_beta, batch_size=batch_size, num_chains=num_chains, num_draws=num_draws,
        num_burnin_steps=num_burnin_steps, num_steps_bw_draws=num_steps_bw_draws,
        gradient_accumulation_steps=gradient_accumulation_steps, num_init_loss_batches=num_init_loss_batches,
        init_seed=init_seed, localization=localization, noise_level=noise_level, llc_weight_decay=llc_weight_decay,
        bounding_box_size=bounding_box_size,
        sampling_method=sampling_method if isinstance(sampling_method, str) else
        {"sgld": "sgmcmc_sgld"}.get(sampler, sampler),
        sampling_method_kwargs=dict(sampling_method_kwargs or {}), init_noise=init_noise, save_metrics=save_metrics,
        shuffle=shuffle, epoch_mode="cycle",
        match_sampling_input_ids_across_chains=match_sampling_input_ids_across_chains,
        scheduler_type="constant", scheduler_kwargs=None, cores=1, online=False,
    )
    if output_path is not None:
        cached = _cached(output_path, config)
        if cached is not None:
            return cached

    order = _loader_order(len(dataset), batch_size, shuffle, init_seed) if match_sampling_input_ids_across_chains \
        else None
    data = _Batches(dataset, batch_size, gradient_accumulation_steps, order, shuffle)
    names, mask = _resolve_masks(model, param_masks, "param_masks", require_all=False)
    num_steps = num_draws * num_steps_bw_draws + num_burnin_steps
    with _train_mode(model), _only_sampled(model, names), _divergence_handled() as holder:
        holder["result"] = estimate_llc(
            model, data, _MeanTokenLoss(loss_fn), sampler=sampler, lr=lr, nbeta=n_beta, gamma=localization,
            num_chains=num_chains, num_draws=num_draws * num_steps_bw_draws, num_burnin_steps=num_burnin_steps,
            num_steps_bw_draws=1, seed=_seed_from(init_seed), device=device, progress=progress,
            rmsprop_alpha=alpha, rmsprop_eps=eps, weight_decay=llc_weight_decay,
            box=bounding_box_size, noise_level=noise_level, mask=mask,
            num_init_loss_batches=num_init_loss_batches, backend=backend,
            shared_batches=match_sampling_input_ids_across_chains)
    result = holder["result"]
    steps = nan_from_first_bad(np.concatenate([result.burnin_loss_trace, result.loss_trace], axis=1))
    for c in result.diverged_chains:
        ran = int(np.isfinite(steps[c]).sum())
        warnings.warn(f"Chain failed: chain {c}'s loss became NaN/Inf after {ran} of {num_steps} steps; as in "
                      "devinterp 2.x its LLC is computed from the steps before (llc_fast.estimate_llc would leave "
                      "the chain out)", RuntimeWarning, stacklevel=2)
    draws = steps[:, num_burnin_steps::num_steps_bw_draws][:, :num_draws]
    f32 = np.float32
    ds = xr.Dataset(
        {
            "init_loss": (("chain", "token_pos"), np.full((num_chains, 1), result.init_loss, dtype=f32)),
            "sampling_loss_micro": (("chain", "step", "batch_sampling", "token_pos"), steps[:, :, None, None].astype(f32)),
            "sampling_loss": (("chain", "draw", "batch", "token_pos"), draws[:, :, None, None].astype(f32)),
        },
        attrs={
            "metadata": {"config": {"sampler": config, "observables": [], "chain_buffer_size": min(50, num_draws),
                                    "shared_observable_dims": ["token", "token_pos"],
                                    "tokenizer_context_length": context_length + 1}},
            "completed": 1,
            "llc_fast": {"conventions": conventions, "diverged_chains": result.diverged_chains,
                         "engine": result.config.get("engine"), "backend": result.config.get("backend"),
                         "seed": result.config["seed"], "timing": result.timing},
        },
    )
    tree = xr.DataTree(ds)
    if output_path is not None:
        tree.to_zarr(str(output_path), consolidated=False)
    return tree


def _cached(output_path, config: dict):
    """devinterp's cache: an existing complete output with the same sampler config is returned as is."""
    from pathlib import Path

    import xarray as xr

    if not Path(output_path).exists():
        return None
    try:
        existing = xr.open_datatree(str(output_path), engine="zarr", consolidated=False)
    except Exception as e:
        raise RuntimeError(f"Output path '{output_path}' exists but couldn't be opened as zarr:\n  {e!r}\n"
                           f"Delete and retry: rm -rf '{output_path}'") from e
    stored = existing.attrs.get("metadata", {}).get("config", {}).get("sampler")
    if existing.attrs.get("completed") != 1 or stored != config:
        raise RuntimeError(f"Output path '{output_path}' holds an incomplete run or one with a different sampler "
                           f"config.\nDelete and retry: rm -rf '{output_path}'")
    return existing


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
        _warn_once("v2", _V2_MESSAGE, stacklevel=stacklevel)
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
        warnings.warn("observables are not computed by llc_fast (llc() does not use them)", DevinterpCompatWarning,
                      stacklevel=2)
    samples = sample(model, dataset, {}, lr=lr, n_beta=n_beta, param_masks=param_masks, loss_fn=loss_fn, **kwargs)
    return _compute_llc(samples, None, stacklevel=4)


