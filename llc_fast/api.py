"""The public entry point: ``estimate_llc`` on one process, or under torchrun on all of them.

The one local-or-distributed choice of the package is made here: with a process group of several
ranks, the chains are sampled by ``llc_fast.distributed`` (FSDP2 shard groups, chain groups in
parallel); otherwise by ``llc_fast.estimators.sampling.sample_local``. Both feed the same estimator.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence

import torch

from .estimators.sampling import sample_local
from .config import LLCConfig
from .distributed.mesh import launched_processes, launched_world_size
from .estimators.llc import estimate
from .estimators.restricted import RestrictedLLCResult, resolve_components
from .estimators.result import LLCResult
from .estimators.susceptibility import SusceptibilityResult
from .files import check_name_for_file


def estimate_config(model, data, loss_fn: Callable, config: LLCConfig, observers=None):
    """``estimate_llc`` for a built ``LLCConfig``: sampled here, or across the torchrun processes.
    observers: evaluation sets measured at every draw (``chains.observe.Observers``). Under torchrun a run of
    components or with evaluation sets splits its chain rows over the ranks (``distributed.rows``), any other run
    goes to ``distributed.sharded`` (chain groups, FSDP shard groups)."""
    if launched_world_size() > 1:
        from .distributed.sharded import sample_sharded

        if observers is not None or config.components is not None:
            from .distributed.rows import sample_rows

            return estimate(model, data, loss_fn, config, sample=sample_rows, observers=observers)

        return estimate(model, data, loss_fn, config, sample=sample_sharded)
    return estimate(model, data, loss_fn, config, sample=sample_local, observers=observers)


def refuse_under_torchrun(call: str, advice: str) -> None:
    """Refuse at once, before any work, ``call`` (what the user typed, e.g. "estimate_restricted_llcs" or
    "llc-fast restricted") when this process is one of several started by torchrun (ValueError: a command line
    prints it as one line, exit code 2). ``advice``: what to do instead, something that works."""
    world = launched_processes()
    if world > 1:
        raise ValueError(f"{call} cannot run under torchrun yet (this process is one of {world} it started): "
                         f"{advice}")


def refuse_eval_sets_under_torchrun(caller: str, eval_data, refine) -> None:
    """``refuse_under_torchrun`` for a call of ``caller`` with eval_data= or refine= (evaluation sets)."""
    passed = [name for name, value in (("eval_data", eval_data), ("refine", refine)) if value is not None]
    if passed:
        refuse_under_torchrun(f"{caller}({'=..., '.join(passed)}=...)", f"leave {' and '.join(passed)} out to "
                              "sample under torchrun, or launch without torchrun for the data-refined estimates")


def refuse_unknown_options(caller: str, options, valid, takes: str) -> None:
    """Refuse the names in ``options`` that are not in ``valid`` (TypeError naming ``caller``, each unknown name with
    the closest valid one, and ``takes``: what ``caller`` takes, e.g. "estimate_llc's options")."""
    import difflib

    unknown = sorted(set(options) - set(valid))
    if unknown:
        named = [f"{u!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(
            str(u), list(valid), n=1)) else "") for u in unknown]
        raise TypeError(f"{caller} got unknown option(s) {', '.join(named)}; it takes {takes}: "
                        f"{', '.join(valid)}")


def llc_option_names() -> list[str]:
    """The keyword options of ``estimate_llc``, in its order."""
    return [n for n, p in inspect.signature(estimate_llc).parameters.items() if p.kind is p.KEYWORD_ONLY]


def options_config(caller: str, options: Mapping, **fields) -> LLCConfig:
    """``LLCConfig(**options, **fields)``: estimate_llc's ``options`` (eval_data, refine and num_eval_batches taken
    out by the caller) checked once, unknown ones refused naming ``caller``."""
    refuse_unknown_options(caller, options, [n for n in llc_option_names() if n not in EVAL_OPTIONS],
                           "estimate_llc's options")
    return LLCConfig(**options, **fields)


def observers_for(eval_data=None, refine=None, num_eval_batches: int = 1):
    """The ``Observers`` of estimate_llc's eval_data= and refine= (None when neither is given)."""
    from .chains.observe import Observers

    if eval_data is None and refine is None:
        return None
    sets = {}
    if refine is not None:
        if not isinstance(refine, Mapping) or not refine:
            raise ValueError("refine must be a non-empty dict {subset name: loader or list of batches}, e.g. "
                             "refine={'code': code_loader, 'prose': prose_loader}")
        sets.update(refine)
    if eval_data is not None:
        for taken, by in (("eval", "eval_data= takes"), ("sampling", "the sampling data's estimate takes beside "
                                                                      "eval_data= (result.refined['sampling'])")):
            if taken in sets:
                raise ValueError(f"refine has a subset named {taken!r}, the name {by}: rename it")
        sets["eval"] = eval_data
    return Observers(sets, num_batches=num_eval_batches, primary="eval" if eval_data is not None else None)


def estimate_restricted_llcs(model: torch.nn.Module, data, loss_fn: Callable, components, *,
                             include_full: bool = False, sparse_rows: str = "auto",
                             **estimate_llc_options) -> RestrictedLLCResult:
    """The weight-restricted LLC of every component, from one batched run.

    components: {name: list of parameter-name patterns (exact names or globs such as "layers.3.*") |
        {param name: 0/1 tensor or None} | None (unrestricted)}, or "layers", "heads", "attn-mlp",
        "embeddings" (HuggingFace GPT-2, GPT-NeoX and Llama-style models: ``integrations.components``).
        Components may overlap: each is its own restriction (the weights it does not name stay at w*).
    include_full: add the unrestricted LLC as component "full".
    sparse_rows: "auto" (default): each restricted component's rows hold only its coordinates (weights, gradient,
        RMSProp statistic) and run in one nested vmap per group of components sharing parameter tensors, where
        the run allows it (docs/restricted.md; ``result.facts["row_storage"]`` says which ran, with
        ``state_bytes_per_row``); "on": refuse where it does not apply; "off": every row a full copy.
    estimate_llc_options: every option of ``estimate_llc`` but mask (lr, nbeta, num_chains, seed, eval_data,
        refine, ...); lr, nbeta and gamma per chain apply to chain j of every component.

    The run has num_components x num_chains chain rows, batched in groups within the memory budget; chain j
    of every component reads the same batches and the same noise, so a component's estimate is the one
    ``estimate_llc(mask=that component)`` gives with the same seed. Returns a ``RestrictedLLCResult``
    (``result["l0h1"]`` is an LLCResult; ``.table()``, ``.to_csv()``, ``.save()``, ``.plot()``).
    Under torchrun every rank calls it: the rows are split over the ranks (``llc_fast.distributed.rows``) and every
    rank returns the same result.
    """
    eval_data, refine = estimate_llc_options.pop("eval_data", None), estimate_llc_options.pop("refine", None)
    num_eval_batches = estimate_llc_options.pop("num_eval_batches", 1)
    config = components_config("estimate_restricted_llcs", model, components, include_full, estimate_llc_options,
                               sparse_rows)
    return estimate_config(model, data, loss_fn, config, observers_for(eval_data, refine, num_eval_batches))


EVAL_OPTIONS = ("eval_data", "refine", "num_eval_batches")  # estimate_llc's options that are not LLCConfig's


def components_config(caller: str, model, components, include_full: bool, options: dict,
                      sparse_rows: str = "auto") -> LLCConfig:
    """The LLCConfig of a run over ``components`` (``resolve_components``) with estimate_llc's other ``options``;
    ``mask=`` and unknown options are refused, naming ``caller``. sparse_rows: see estimate_restricted_llcs."""
    if "mask" in options:
        raise ValueError(f"{caller} takes components, not mask=: give each component its restriction")
    restrictions = resolve_components(model, components, include_full=include_full)
    return options_config(caller, options, components=tuple(restrictions.items()), sparse_rows=sparse_rows)


def estimate_llc(
    model: torch.nn.Module,
    data,
    loss_fn: Callable,
    *,
    sampler: str = "sgld",
    lr: float | Sequence[float],
    nbeta: float | Sequence[float] | None = None,
    gamma: float | Sequence[float] = 1.0,
    num_chains: int = 4,
    num_draws: int = 200,
    num_burnin_steps: int = 0,
    num_steps_bw_draws: int = 1,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    rmsprop_alpha: float = 0.99,
    rmsprop_eps: float = 0.1,
    weight_decay: float = 0.0,
    box: float | None = None,
    noise_level: float = 1.0,
    noise_scheme: str = "euler",
    sgnht_diffusion: float | None = None,
    mask: dict[str, torch.Tensor] | None = None,
    num_init_loss_batches: int = 16,
    freeze_preconditioner_at: int | None = None,
    preconditioner: str | None = None,
    preconditioner_samples: int | None = None,
    preconditioner_max_gain: float | None = None,
    backend: str = "auto",
    shared_batches: bool = False,
    chain_batching: str = "auto",
    max_batched_chains: int | None = None,
    batch_memory_bytes: int | None = None,
    row_batching: str = "measured",
    mala_every: int | None = None,
    compile_step: bool = False,
    checkpoint: str | None = None,
    checkpoint_every: int | None = None,
    resume: str | None = None,
    target_stderr: float | None = None,
    target_rel_error: float | None = None,
    max_draws: int | None = None,
    check_every: int | None = None,
    eval_data=None,
    refine: Mapping | None = None,
    num_eval_batches: int = 1,
) -> LLCResult:
    """Estimate the LLC of ``model`` at its current weights w*.

    The options are ``LLCConfig``'s fields, where each is declared once (its default and check; one line each in
    ``llc_fast.config.options_table()``, README's options table); this signature repeats their names and defaults
    and ``tests/test_config_options.py`` checks that it does.
    data: a DataLoader or any re-iterable of batches; cycled as needed. Each chain reads its
        own stream of batches (a shuffling loader is re-seeded per chain and pass).
    loss_fn(model, batch) -> scalar tensor: the mean loss of the batch.
    sampler: "sgld", "rmsprop_sgld" (devinterp's preconditioner), "rmsprop_sgld_bc"
        (bias-corrected, V starting at 1; Hitchcock & Hoogland 2025) or "sgnht" (Ding et al. 2014: a momentum
        per weight and a thermostat per chain, localized like the others; sgnht_diffusion: its diffusion factor
        A, default 0.01; docs/update.md).
    lr, nbeta, gamma: step size epsilon, inverse temperature times n, localization strength; each a
        scalar or one value per chain. nbeta defaults to n/log n when the loader's dataset has a length.
        ``llc_fast.estimate_llc_auto`` chooses lr and gamma itself (a calibration from the curvature at w*).
    num_draws draws per chain, taken every num_steps_bw_draws steps after num_burnin_steps.
    weight_decay, box (clamp to w* +- box), noise_level, mask ({param name: 0/1 tensor}; masked
        weights never move; a tied alias such as lm_head.weight names the tensor it is tied to, sampled under
        every name; result.config["num_params"] counts the sampled weights, result.sampled_mask() gives the
        mask back): optional parts of the update. noise_scheme: "euler" (default) or "lm" (Leimkuhler-Matthews:
        each step's noise is the mean of its own and the next step's normals, so on a quadratic the draws have the
        exact posterior law at any stable lr, where "euler" runs hot by up to 1/(1 - lr·a/4) along curvature a;
        docs/update.md). rmsprop_alpha, rmsprop_eps: the
        preconditioner's decay and floor; freeze_preconditioner_at: step from which V stays fixed.
    preconditioner="curvature" (with sampler="sgld"): SGLD with a fixed diagonal preconditioner G from the
        curvature at w*, gathered before sampling (Hutchinson's estimate of the Hessian's diagonal from
        preconditioner_samples Hessian-vector products, default 32): G = 1 at the stiffest weight, so lr keeps
        its meaning there, and each flatter weight's step enlarged to relax as fast, at most
        preconditioner_max_gain times (default 1000); docs/update.md. result.config's curvature_* facts say
        what it found and cost.
    num_init_loss_batches: batches averaged for L(w*). backend: "auto" or a name from llc_fast.backends().
    shared_batches: all chains read the same batches (devinterp's default) instead of their own.
    chain_batching: "auto" (chains batched in one vmapped forward/backward where the model allows,
        else one at a time, with a warning saying why), "vmap" or "sequential". max_batched_chains
        bounds how many chains share one pass (memory: about that many copies of the weights,
        gradients and activations); the result does not depend on it.
    mala_every: record the MALA acceptance of every k-th step after burn-in (one more forward and
        backward each time); result.mala_acceptance is then [chains, records].
    batch_memory_bytes: budget for the per-chain flat buffers of one batched group (weights,
        gradients, RMSProp statistic); default: half the free memory of the device, planned before
        sampling on the CPU (available memory) as on a GPU. result.config's rows_per_group and
        row_plan say how many rows a group has and why. Activations come on top and scale with the
        group size too: a batched pass that runs out of memory is retried at once in passes of half
        as many chains (a BatchMemoryWarning; the chains are the same). row_batching: "measured"
        (default) times trial passes of the planned most, half and a quarter of the rows before a run of at least
        100 steps and keeps the fastest per row (result.config's rows_per_call, row_times_s); "fit": the most
        that fit.
    checkpoint, checkpoint_every: write the whole run to this file (atomically) every that many steps; a write
        that fails (a full disk) is a warning naming the file and the error, the last checkpoint written stays,
        and sampling goes on. resume: continue the run saved in that file, bit for bit (the same settings are
        required; they are checked). Ctrl-C or SIGTERM while sampling stops at the next step boundary, writes a
        checkpoint (to ``checkpoint``, else ./llc_fast_interrupted_<pid>.ckpt) and raises SamplingInterrupted,
        whose .result is the partial LLCResult (kept even when that checkpoint cannot be written); a second
        Ctrl-C exits at once.
    target_stderr / target_rel_error: draw until the Monte Carlo standard error of the estimate is at
        most this (absolute, or relative to |LLC|), checking every check_every draws after num_draws and
        stopping at max_draws (default 10 x num_draws) with a warning if the target was not met;
        result.config['draws_taken'] and ['stopped_by'] say how it ended.
    compile_step: run the batched forward and backward through torch.compile (a compile of seconds at the
        first step, then far less Python and dispatch per step on small models; the chain is the same up
        to float rounding). Applies to chains batched in one vmapped pass.
    eval_data, refine, num_eval_batches: data-refined estimates from the same chains (docs/update.md). The
        chains are driven by ``data``; at every draw the loss on the first num_eval_batches batches of each
        evaluation set is taken too. eval_data: the estimate is then nbeta * (E[L_eval(w)] - L_eval(w*))
        (result.refined["sampling"] keeps the one from ``data``'s minibatch losses); refine={name: loader}:
        one such estimate per subset in result.refined[name].

    Under torchrun (an initialised process group of several ranks) every rank calls this and the
    chains run on all of them (``llc_fast.distributed.estimate_llc_sharded``, which takes the layout
    options); with eval_data or refine the chains are split over the ranks, each holding the whole model
    (``llc_fast.distributed.rows``). The model's parameters are sampled if floating-point with requires_grad;
    the model itself is left bitwise unchanged. Returns an LLCResult.
    """
    if isinstance(lr, str):
        raise ValueError(f"estimate_llc got lr={lr!r}: it takes a step size (a number, or one per chain)" + (
            "; for lr and gamma chosen from the curvature at w* by a calibration, call "
            "llc_fast.estimate_llc_auto(model, data, loss_fn, ...) with the same options but lr and gamma"
            if lr == "auto" else ", e.g. lr=1e-4"))
    options = {name: value for name, value in locals().items() if name in llc_option_names()}
    config = LLCConfig(**{name: value for name, value in options.items() if name not in EVAL_OPTIONS})
    return estimate_config(model, data, loss_fn, config, observers_for(eval_data, refine, num_eval_batches))


def estimate_susceptibilities(model, data, loss_fn: Callable, components, observables: Mapping, *,
                              per_token_fn: Callable | None = None, include_full: bool = False,
                              num_eval_batches: int = 1, token_losses: bool = False,
                              token_losses_path: str | os.PathLike | None = None,
                              **estimate_llc_options) -> SusceptibilityResult:
    """chi(C, s) for every component C and subset s (module docstring), from one batched restricted run.

    components: as ``estimate_restricted_llcs`` ({name: parameter patterns | restriction} or "heads",
        "layers", ...). observables: {subset name: loader or list of batches}; the first num_eval_batches
        batches of each (and of ``data``, the reference set) are evaluated at every draw.
    per_token_fn(model, batch) -> per-token (or per-sample) losses [..., T] whose mean is loss_fn's loss (checked
        at w* on the first batch of data and of each subset before sampling; e.g. ``integrations.hf``'s
        causal_lm_token_losses with causal_lm_loss): adds per-token susceptibilities (result.token_chi) and,
        with token_losses=True, the losses themselves as [component, chain, draw, token] arrays (streamed to
        .npy files under token_losses_path: their total size is checked against the free space and the files are
        allocated on disk before sampling; subset names become part of the file names).
    estimate_llc_options: lr, nbeta, num_chains, num_draws, seed, ... (as estimate_llc).
    Under torchrun the rows are split over the ranks as ``estimate_restricted_llcs``'s (not with token_losses_path).
    """
    from .chains.observe import Observers
    from .estimators.susceptibility import (REFERENCE, check_token_losses, flat_tokens, susceptibilities_from,
                                            token_storage)

    if token_losses_path is not None:
        refuse_under_torchrun("estimate_susceptibilities(token_losses_path=...)", "leave token_losses_path out (the "
                              "per-token losses are then held in memory, result.token_losses), or launch without "
                              "torchrun")
    if not isinstance(observables, Mapping) or not observables:
        raise ValueError("observables must be a non-empty dict {subset name: loader or list of batches}")
    if token_losses_path is not None:
        for name in observables:
            check_name_for_file(name, "observables subset", f"{token_losses_path}/token_losses_<name>.npy")
    if REFERENCE in observables:
        raise ValueError(f"{REFERENCE!r} names the reference set (the sampling data's batches): rename that subset")
    if (token_losses or token_losses_path is not None) and per_token_fn is None:
        raise ValueError("token_losses needs per_token_fn(model, batch) -> per-token losses")
    config = components_config("estimate_susceptibilities", model, components, include_full, estimate_llc_options)
    sets = {REFERENCE: data, **observables}
    if per_token_fn is not None:
        check_token_losses(model, loss_fn, per_token_fn, {"the sampling data": data, **{
            f"subset {name!r}": subset for name, subset in observables.items()}}, seed=config.seed)
    observers = Observers(sets, num_batches=num_eval_batches,
                          observable=None if per_token_fn is None else flat_tokens(per_token_fn),
                          storage=token_storage(token_losses_path, len(config.components)) if per_token_fn else None)
    llcs = estimate_config(model, data, loss_fn, config, observers)
    return susceptibilities_from(observers, llcs, config.num_chains, list(observables), token_losses,
                                 token_losses_path)
