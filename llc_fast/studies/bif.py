"""``estimate_bif``: Bayesian influence functions from the chains of one run (``estimators.bif``).

The per-sample (or per-token) losses of a fixed query set and a fixed train set are measured at every draw by
the loop's observers (as ``estimate_susceptibilities`` measures its subsets), in the chain rows of one batched run
of every component; checkpoints, resume and Ctrl-C are the run's own.
"""
from __future__ import annotations

import os
from collections.abc import Callable

from ..api import components_config, estimate_config, refuse_under_torchrun
from ..chains.interrupt import SamplingInterrupted
from ..chains.observe import Observers
from ..estimators.bif import KINDS, QUERY, TRAIN, bif_from
from ..estimators.bif_result import BIFResult
from ..estimators.restricted import FULL
from ..estimators.susceptibility import check_token_losses, flat_tokens, token_storage

ALL_BATCHES = 2**31  # num_eval_batches=None: every batch of one pass of each set


def estimate_bif(model, data, loss_fn: Callable, *, query, train=None, per_sample_fn: Callable | None = None,
                 components=None, include_full: bool = False, kind: str = "correlation",
                 num_eval_batches: int | None = None, token_losses: bool = False,
                 token_losses_path: str | os.PathLike | None = None, **estimate_llc_options) -> BIFResult:
    """The BIF matrix [Nq, Nt] of every component (``estimators.bif``), from one batched run driven by ``data``.

    query, train: loaders or lists of batches, fixed sets: their first num_eval_batches batches (default: one whole
        pass) are evaluated at every draw; train=None: the query set against itself ([Nq, Nq], measured once).
    per_sample_fn(model, batch) -> per-sample (or per-token) losses [..., T] whose mean is loss_fn's loss (checked at
        w* on the first batch of data, query and train before sampling; e.g. ``integrations.hf``'s
        causal_lm_token_losses with causal_lm_loss for per-token BIFs). A set's samples are its batches' values
        flattened and concatenated in order: Nq, Nt of them.
    components: None (the whole model, as component "full") or as ``estimate_restricted_llcs`` ({name: parameter
        patterns | restriction}, "heads", "layers", ...); include_full adds the whole model to them.
    kind: "correlation" or "covariance" (devinterp's sign; the paper's BIF is minus the covariance).
    token_losses: keep the losses in the result ([component, chain, draw, sample] float32). token_losses_path: a
        folder where the losses are streamed to .npy files instead of memory (needed beyond 4 GiB; free space checked
        and files allocated before sampling; the matrices too, when too large for memory). The BIF is accumulated
        over blocks of draws either way.
    estimate_llc_options: lr, nbeta, gamma, num_chains, num_draws, seed, checkpoint, resume, ... (as estimate_llc).
    Ctrl-C: the ``SamplingInterrupted`` carries a partial BIFResult (``.result``) from the draws taken.
    """
    observers, config = _checked(model, data, loss_fn, query, train, per_sample_fn, components, include_full, kind,
                                 num_eval_batches, token_losses, token_losses_path, estimate_llc_options)
    try:
        llcs = estimate_config(model, data, loss_fn, config, observers)
    except SamplingInterrupted as e:
        if e.trace is not None and e.result is not None:
            observers.values = e.trace.observed
            e.result = bif_from(observers, e.result, config.num_chains, kind, token_losses, token_losses_path)
        raise
    return bif_from(observers, llcs, config.num_chains, kind, token_losses, token_losses_path)


def _checked(model, data, loss_fn, query, train, per_sample_fn, components, include_full, kind, num_eval_batches,
             token_losses, token_losses_path, options: dict):
    """(observers, LLCConfig) of ``estimate_bif``'s arguments, every one checked before sampling."""
    refuse_under_torchrun("estimate_bif", "launch it without torchrun")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not callable(per_sample_fn):
        raise ValueError("estimate_bif needs per_sample_fn(model, batch) -> the unreduced per-sample (or per-token) "
                         "losses whose mean is loss_fn's loss, e.g. llc_fast.integrations.hf.causal_lm_token_losses")
    for name, value in ((QUERY, query), (TRAIN, train)):
        if value is None and name == QUERY or isinstance(value, (str, bytes, dict)) or (
                value is not None and not hasattr(value, "__iter__")):
            raise ValueError(f"{name} must be a loader or a list of batches (a fixed set evaluated at every draw), "
                             f"got {type(value).__name__}")
    if num_eval_batches is not None and (isinstance(num_eval_batches, bool) or not isinstance(num_eval_batches, int)
                                         or num_eval_batches < 1):
        raise ValueError(f"num_eval_batches must be an integer >= 1 or None (every batch), got {num_eval_batches!r}")
    if components is None and include_full:
        raise ValueError("include_full adds the whole model to components: pass components too, or leave both out "
                         "(the whole model alone)")
    config = components_config("estimate_bif", model, {FULL: None} if components is None else components,
                               include_full, options)
    sets = {QUERY: query} if train is None else {QUERY: query, TRAIN: train}
    check_token_losses(model, loss_fn, per_sample_fn, {"the sampling data": data, **{
        f"the {name} set": loader for name, loader in sets.items()}}, seed=config.seed, name="per_sample_fn",
        why="the BIF would correlate the losses of another function than the one sampled")
    storage = token_storage(token_losses_path, len(config.components))
    observers = Observers(sets, num_batches=num_eval_batches or ALL_BATCHES, observable=flat_tokens(per_sample_fn),
                          storage=storage)
    return observers, config
