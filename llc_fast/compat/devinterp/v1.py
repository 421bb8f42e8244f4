"""devinterp 1.x's ``estimate_learning_coeff_with_summary`` / ``estimate_learning_coeff`` on llc_fast's engine.

Same arguments and returned keys as devinterp 1.3.2. Mapping: a draw is the loss of the step that ends
each ``num_steps_bw_draws`` interval after burn-in (devinterp 1.x's placement), so llc_fast runs with
``num_burnin_steps + num_steps_bw_draws - 1`` burn-in steps; the initial loss is the mean over the first
``num_chains`` batches (``num_chains * grad_accum_steps`` micro-batches) of one pass, as devinterp's
``get_init_loss_multi_batch``; llc/std has ddof=1 (torch's default, as 1.x); each chain reads its own pass
over the loader (1.x re-iterates the loader per chain: the same order unless the loader shuffles).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from ...api import estimate_llc
from .optim import SGMCMC, SGLD, sampler_name
from .sgnht import sampling_kind, sgnht_options
from .common import (V1_MESSAGE, ChainDivergedError, batched_or_sequential, divergence_handled, resolve_masks,
                     seed_from, train_mode, warn_once, default_nbeta)

# optimizer_kwargs devinterp's samplers accept that only switch diagnostics on (no effect on the estimate)
_DIAGNOSTIC_KEYS = {"metrics", "save_noise", "save_mala_vars", "noise_norm", "grad_norm", "weight_norm", "distance",
                    "save_metrics"}


def _split_loss(results) -> torch.Tensor:
    """devinterp's split_results: the loss from a tensor, a tuple (first), a dict ("loss") or an object (.loss)."""
    if isinstance(results, dict):
        if "loss" not in results:
            raise ValueError(f"evaluate returned a dict without a 'loss' key (keys: {sorted(results)})")
        loss = results["loss"]
    elif isinstance(results, tuple):
        loss = results[0]
    elif isinstance(results, torch.Tensor):
        loss = results
    elif hasattr(results, "loss"):
        loss = results.loss
    else:
        raise ValueError("evaluate must return a loss tensor, a tuple (loss first), a dict with 'loss' or an "
                         f"object with a .loss attribute, got {type(results).__name__}")
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"evaluate's loss must be a torch.Tensor (to differentiate), got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"evaluate's loss must be the scalar mean loss of the batch, got shape {tuple(loss.shape)}; "
                         "reduce it (e.g. .mean())")
    return loss.reshape(())


class _EvaluateLoss:
    """llc_fast's loss_fn(model, batch) from devinterp 1.x's evaluate(model, batch); with gradient accumulation
    a batch is a tuple of micro-batches and the loss their mean (devinterp: loss / grad_accum_steps, summed)."""

    def __init__(self, evaluate, accumulation: int):
        self.evaluate = evaluate if evaluate is not None else (lambda model, data: model(data))
        self.accumulation = accumulation

    def __call__(self, model, batch):
        if self.accumulation == 1:
            return _split_loss(self.evaluate(model, batch))
        return sum(_split_loss(self.evaluate(model, b)) for b in batch) / self.accumulation


class _Grouped:
    """``accumulation`` consecutive batches of ``loader`` per batch; a pass covers the loader as many times as
    it takes to end on a group boundary (devinterp cycles micro-batches across passes)."""

    def __init__(self, loader, accumulation: int):
        self.loader, self.accumulation = loader, accumulation
        n = len(loader)
        self.repeats = accumulation // math.gcd(n, accumulation) if n else 1
        self.num_batches = n * self.repeats // accumulation

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        group = []
        for _ in range(self.repeats):
            for batch in self.loader:
                group.append(batch)
                if len(group) == self.accumulation:
                    yield tuple(group)
                    group = []


def _sampler_settings(sampling_method, optimizer_kwargs: dict, loader, grad_accum_steps: int) -> dict:
    """estimate_llc's sampler arguments from devinterp 1.x's sampling_method and optimizer_kwargs."""
    kw = dict(optimizer_kwargs)
    sampler = sampler_name(sampling_method)
    generic = sampling_method is SGMCMC or getattr(sampling_method, "__name__", "") == "SGMCMC"
    if generic:
        if kw.pop("preconditioner", "identity") == "rmsprop":
            sampler = "rmsprop_sgld"
        kw.update(kw.pop("preconditioner_kwargs", None) or {})
    if "temperature" in kw:
        if "nbeta" in kw:
            raise ValueError("Found temperature and nbeta in optimizer_kwargs. Temperature is deprecated, please "
                             "switch to using nbeta only.")
        kw["nbeta"] = kw.pop("temperature")
    if "nbeta" not in kw:
        kw["nbeta"] = default_nbeta(loader, grad_accum_steps)
        warn_once("v1", V1_MESSAGE, stacklevel=4)
    if kw.pop("optimize_over", None) is not None:
        raise NotImplementedError("optimizer_kwargs['optimize_over'] is not supported; pass "
                                  "optimize_over_per_model_param={name: bool mask} instead")
    if kw.pop("add_grad_correction", False):
        raise NotImplementedError("add_grad_correction=True is not implemented (devinterp raises too)")
    if kw.get("save_metrics"):
        raise NotImplementedError("save_metrics is not supported by llc_fast")
    for key in _DIAGNOSTIC_KEYS:  # devinterp's metrics only reach callbacks, which 1.x here does not take
        kw.pop(key, None)
    if sampling_kind(sampling_method) is not None:  # SGNHT (sampler "sgnht"), SGMCMC.sgnht (SGLD; sgnht.py)
        out = sgnht_options(sampling_kind(sampling_method), kw)
        if kw:
            raise TypeError(f"optimizer_kwargs has keys {sampling_method.__name__} does not take: {sorted(kw)}")
        return out
    box = kw.pop("bounding_box_size", None)
    out = dict(sampler=sampler, lr=kw.pop("lr", 0.01), nbeta=kw.pop("nbeta"), gamma=kw.pop("localization", 0.0),
               noise_level=kw.pop("noise_level", 1.0), weight_decay=kw.pop("weight_decay", 0.0),
               box=box if box else None)
    if sampler == "rmsprop_sgld":
        out.update(rmsprop_alpha=kw.pop("alpha", 0.99), rmsprop_eps=kw.pop("eps", 0.1))
    if kw:
        raise TypeError(f"optimizer_kwargs has keys the {sampler} sampler does not take: {sorted(kw)}")
    return out


def estimate_learning_coeff_with_summary(
    model: torch.nn.Module, loader, callbacks=(), evaluate=None, sampling_method=SGLD, optimizer_kwargs=None,
    num_draws: int = 100, num_chains: int = 10, num_burnin_steps: int = 0, num_steps_bw_draws: int = 1,
    init_loss: float | None = None, grad_accum_steps: int = 1, cores=1, seed=None,
    device=torch.device("cpu"), gpu_idxs=None, verbose: bool = True, optimize_over_per_model_param=None,
    online: bool = False, use_amp: bool = False, *, backend: str = "auto",
) -> dict:
    """devinterp 1.3.2's ``estimate_learning_coeff_with_summary``, computed by llc_fast.estimate_llc.

    Returns devinterp's keys: {"llc/mean", "llc/std", "llc-chain/0", ..., "loss/trace"} (online=False) or
    {"init_loss", "llc/means", "llc/stds", "llc/trace", "loss/trace"} (online=True).
    ``optimizer_kwargs`` is required (devinterp crashes on its default None): e.g.
    ``dict(lr=1e-4, nbeta=..., localization=100.0)``; without nbeta, devinterp's batch-size default is used.
    ``sampling_method``: SGLD, RMSpropSGLD, SGMCMC.sgld / SGMCMC.rmsprop_sgld (this module's or devinterp's).
    ``cores`` and ``gpu_idxs`` are accepted and ignored (llc_fast batches chains instead). If a chain's loss
    becomes NaN/Inf, ``ChainDivergedError`` is raised (devinterp 1.x raises on NaN too).
    llc_fast extra: ``backend``.
    """
    if callbacks:
        raise NotImplementedError(
            "callbacks are not supported: the LLC estimator is built in; for MALA acceptance use "
            "llc_fast.estimate_llc(..., mala_every=k), for traces use its result.loss_trace")
    if optimizer_kwargs is None:
        raise ValueError(
            "optimizer_kwargs is required: pass e.g. optimizer_kwargs=dict(lr=1e-4, nbeta=..., localization=100.0) "
            "(devinterp 1.x's default optimizer_kwargs=None crashes with a TypeError; there is no safe default "
            "step size or localization)")
    if not isinstance(optimizer_kwargs, dict):
        raise TypeError(f"optimizer_kwargs must be a dict, got {type(optimizer_kwargs).__name__}")
    for name, value in (("grad_accum_steps", grad_accum_steps), ("num_steps_bw_draws", num_steps_bw_draws)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    device = torch.device(device)
    if use_amp:
        if device.type == "cpu":
            warnings.warn("Automatic Mixed Precision (AMP) is not supported on CPU devices. Disabling AMP.")
        else:
            raise NotImplementedError("use_amp is not supported; cast the model to bfloat16 instead "
                                      "(llc_fast updates bf16 weights in fp32 with stochastic rounding)")
    settings = _sampler_settings(sampling_method, optimizer_kwargs, loader, grad_accum_steps)
    names, mask = resolve_masks(model, optimize_over_per_model_param, "optimize_over_per_model_param",
                                 require_all=True)
    data = loader if grad_accum_steps == 1 else _Grouped(loader, grad_accum_steps)
    given_init = bool(init_loss)  # devinterp: `if not init_loss` (0.0 counts as not given)
    noise_seed = seed_from(seed)

    def run(m, chain_batching):
        return estimate_llc(
            m, data, _EvaluateLoss(evaluate, grad_accum_steps), **settings, num_chains=num_chains,
            num_draws=num_draws, num_burnin_steps=num_burnin_steps + num_steps_bw_draws - 1,
            num_steps_bw_draws=num_steps_bw_draws, seed=noise_seed, device=device, progress=verbose,
            mask=mask, num_init_loss_batches=1 if given_init else num_chains, backend=backend, shared_batches=False,
            chain_batching=chain_batching)

    with train_mode(model), divergence_handled() as holder:
        holder["result"] = batched_or_sequential(model, run)
    result = holder["result"]
    if result.diverged_chains:
        c = result.diverged_chains[0]
        bad = np.flatnonzero(~np.isfinite(result.loss_trace[c]))
        where = f"draw {int(bad[0])}" if bad.size else f"step {result.diverged_at_step[c]}"
        what = "NaN" if not bad.size or np.isnan(result.loss_trace[c][bad[0]]) else "Inf"
        raise ChainDivergedError(
            f"{what} detected in loss at chain {c}, {where} (chains {result.diverged_chains} diverged; devinterp 1.x "
            "stops with 'NaN detected in loss' too). Try a smaller lr or a larger localization; the native "
            "llc_fast.estimate_llc leaves diverged chains out of the mean. The traces are in this error's .result.",
            result)
    init = float(init_loss) if given_init else result.init_loss
    nbeta = np.float32(settings["nbeta"])
    losses = result.loss_trace.astype(np.float32)
    if online:
        llcs = nbeta * (losses - np.float32(init))
        return {"init_loss": init, "llc/means": llcs.mean(axis=0), "llc/stds": llcs.std(axis=0, ddof=1),
                "llc/trace": llcs, "loss/trace": losses}
    per_chain = nbeta * (losses.mean(axis=1) - np.float32(init))
    return {
        "llc/mean": float(per_chain.mean()),
        "llc/std": float(per_chain.std(ddof=1)) if num_chains > 1 else math.nan,
        **{f"llc-chain/{i}": float(per_chain[i]) for i in range(num_chains)},
        "loss/trace": losses,
    }


def estimate_learning_coeff(
    model: torch.nn.Module, loader, callbacks=(), evaluate=None, sampling_method=SGLD, optimizer_kwargs=None,
    num_draws: int = 100, num_chains: int = 10, num_burnin_steps: int = 0, num_steps_bw_draws: int = 1,
    init_loss: float | None = None, grad_accum_steps: int = 1, cores=1, seed=None, device=torch.device("cpu"),
    verbose: bool = True, optimize_over_per_model_param=None, *, backend: str = "auto",
) -> float:
    """devinterp 1.3.2's ``estimate_learning_coeff``: the "llc/mean" of ``estimate_learning_coeff_with_summary``."""
    return estimate_learning_coeff_with_summary(
        model, loader, callbacks=callbacks, evaluate=evaluate, sampling_method=sampling_method,
        optimizer_kwargs=optimizer_kwargs, num_draws=num_draws, num_chains=num_chains,
        num_burnin_steps=num_burnin_steps, num_steps_bw_draws=num_steps_bw_draws, init_loss=init_loss,
        grad_accum_steps=grad_accum_steps, cores=cores, seed=seed, device=device, verbose=verbose,
        optimize_over_per_model_param=optimize_over_per_model_param, backend=backend)["llc/mean"]
