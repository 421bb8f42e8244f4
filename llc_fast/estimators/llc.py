"""The LLC estimate from sampled chains: lambda_hat = nbeta * (E_w[L(w)] - L(w*)).

E_w[L] is the mean over draws (burn-in excluded) of the minibatch loss along each chain; L(w*) is
averaged over several batches. Per-chain estimates, then mean and std over the chains that did not
diverge (``chains.trace`` states the divergence rule). ``estimate`` turns the ``ChainRun`` of a
sampler (one process: ``estimators.sampling.sample_local``; torchrun: ``llc_fast.distributed``) into an
``LLCResult``; ``llc_fast.estimate_llc`` (``api.py``) chooses the sampler.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

from ..chains.interrupt import SamplingInterrupted
import numpy as np

from ..chains.identity import callable_name, data_identity, weights_digest
from ..chains.setup import ChainRun
from .sampling import sample_local
from ..chains.trace import DIVERGENCE_FACTOR
from ..kernels.update_spec import STABILITY_LIMIT

#: The localization step alone multiplies w - w* by 1 - lr·gamma/2 each step: from lr·gamma = OVERSHOOT_LIMIT it
#: flips the sign (overshoots w*), from STABILITY_LIMIT (4) the size grows each step and the chain diverges.
OVERSHOOT_LIMIT = STABILITY_LIMIT / 2
from .result import LLCResult


class LLCDivergenceWarning(RuntimeWarning):
    """A chain's loss became NaN or infinite or left the divergence bound; the chain was stopped and left out of
    the mean."""


class LLCTargetNotMetWarning(RuntimeWarning):
    """Drawing until a target MCSE stopped at max_draws before the target was met."""


class AllChainsDivergedError(RuntimeError):
    """Every chain diverged. ``.result`` holds the partial traces."""

    def __init__(self, message: str, result: LLCResult):
        super().__init__(message)
        self.result = result


def estimate(model, data, loss_fn: Callable, config, sample: Callable = sample_local, observers=None):
    """The estimate of ``config`` (an ``LLCConfig``): the data checked, nbeta resolved, chains sampled by
    ``sample(model, data, loss_fn, config) -> ChainRun``. An ``LLCResult``, or with ``config.components`` a
    ``RestrictedLLCResult`` (one LLCResult per component). observers: evaluation sets measured at every
    draw (``chains.observe``; their data-refined estimates in ``result.refined``)."""
    config, run = sample_run(model, data, loss_fn, config, sample, observers)
    out = assemble(run, config, observers, component_sizes(model, config))
    for label, result in (out.items() if config.components is not None else [("", out)]):
        try:
            report(result, run, config, label)
        except AllChainsDivergedError as e:
            if not label:
                raise
            warnings.warn(f"{e} Its llc_mean is NaN; the other components' estimates stand.", LLCDivergenceWarning,
                          stacklevel=3)
    return out


def sample_run(model, data, loss_fn: Callable, config, sample: Callable = sample_local, observers=None):
    """(config with nbeta resolved, ChainRun): the checks before sampling, and the sampling. An interrupted run's
    partial result rides on the ``SamplingInterrupted`` it raises (``.result``)."""
    if not callable(loss_fn):
        raise TypeError("loss_fn must be a callable loss_fn(model, batch) -> scalar mean loss")
    config = config.for_data(data)
    config = config.replace(identity=run_identity(model, data, loss_fn, seed=config.seed,
                                                   num_batches=config.num_init_loss_batches, observers=observers))
    warn_unstable(config)
    try:
        run = sample(model, data, loss_fn, config, **({} if observers is None else dict(observers=observers)))
    except SamplingInterrupted as e:  # keep what was sampled: the partial result rides on the exception
        if e.trace is not None:
            partial = ChainRun(e.init_loss, e.trace, facts=dict(partial=True, checkpoint=e.checkpoint,
                                                                draws_taken=e.trace.loss_trace.shape[1]))
            e.result = assemble(partial, config, observers, component_sizes(model, config))
        raise
    trace = run.trace
    draws = trace.loss_trace.shape[1]
    steps = config.num_rows * config.schedule.replace(num_draws=draws).num_steps
    run.timing = dict(run.timing, steps=steps, steps_per_s=steps / max(run.timing["sampling_s"], 1e-12))
    run.facts = dict(run.facts, draws_taken=draws)
    if config.targeted:
        run.facts["stopped_by"] = "target" if draws < config.max_draws else "max_draws"
    return config, run


def run_identity(model, data, loss_fn: Callable, *, seed: int, num_batches: int, observers=None) -> dict:
    """What a run reads, for its fingerprint: the data at w* (size, digest of the ``num_batches`` initial-loss
    batches of ``seed``), the weights, the loss function's name and the evaluation sets (``chains.identity``)."""
    return dict(data=data_identity(data, seed=seed, num_batches=num_batches),
                weights=weights_digest(model), loss_fn=callable_name(loss_fn),
                eval=None if observers is None else observers.identity())


def assemble(run: ChainRun, config, observers=None, sizes: list[dict] | None = None):
    """The LLCResult of a run's trace (with its data-refined estimates), or one per component in a
    ``RestrictedLLCResult`` when the run sampled components (rows k*C .. (k+1)*C - 1 are component k).
    sizes: ``component_sizes``, the facts of what each result sampled."""
    trace, nbeta = run.trace, np.asarray(config.nbeta, dtype=np.float64)

    def one(tr, cfg, **facts) -> LLCResult:
        def result(losses, init_loss, **more):
            return LLCResult.from_traces(losses, init_loss, nbeta, tr.diverged_at,
                                         cfg.to_dict(**dict(run.facts, **facts, **more)),
                                         run.timing, burnin_loss_trace=tr.burnin_loss_trace,
                                         mala_acceptance=tr.mala_acceptance)

        main = result(tr.loss_trace, run.init_loss)
        if observers is None or observers.observable is not None:
            return main
        refined = {name: result(tr.observed[name].astype(np.float64), float(observers.at_w_star[name]),
                                eval_set=name) for name in observers.names}
        if observers.primary is None:
            main.refined = refined
            return main
        primary = refined.pop(observers.primary)
        primary.refined = dict(refined, sampling=main)
        return primary

    def sampled(k: int) -> dict:
        return {} if sizes is None else dict(sizes[k], model_num_params=run.facts.get("num_params"))

    if config.components is None:
        return one(trace, config, **sampled(0))
    from .restricted import RestrictedLLCResult

    C = config.num_chains
    results = {}
    for k, (name, restriction) in enumerate(config.components):
        facts = dict(component=name, mask=None if restriction is None else sorted(restriction))
        facts.update(sampled(k))
        alone = config.replace(components=None, mask=restriction)  # its fingerprint: estimate_llc(mask=) alone
        results[name] = one(trace.take(list(range(k * C, (k + 1) * C))), alone, **facts)
    return RestrictedLLCResult(results, timing=dict(run.timing), facts=dict(run.facts))


def component_sizes(model, config) -> list[dict]:
    """What each component (or the run's one ``mask=``, possibly the whole model) samples, as facts of its result:
    num_params, the coordinates it samples (its mask's ones), and mask_content (``FlatLayout.mask_record``;
    None: every sampled weight)."""
    from ..state.flat import FlatLayout

    layout = FlatLayout(model)
    out = []
    for restriction in [r for _, r in config.components] if config.components is not None else [config.mask]:
        content = layout.mask_record(restriction) if restriction else None
        out.append(dict(num_params=layout.numel if content is None else sum(
            layout.slot(n).numel if m is None else m["ones"] for n, m in content.items()), mask_content=content))
    return out


def report(result: LLCResult, run: ChainRun, config, label: str = "") -> None:
    """The warnings of one estimate (on the process that reports): a missed target, a fallback from batching,
    chains that never moved, diverged chains (``report_divergence``). label: the component, if any."""
    if not run.report:
        return
    trace, where = run.trace, f"component {label!r}: " if label else ""
    if config.targeted and run.facts.get("stopped_by") == "max_draws":
        mcse = result.diagnostics()["mcse"]
        target = config.target_stderr if config.target_stderr is not None else \
            f"{config.target_rel_error:g} x |LLC| = {config.target_rel_error * abs(result.llc_mean):.3g}"
        warnings.warn(f"{where}max_draws={config.max_draws} came before the target: the MCSE of the estimate is "
                      f"{mcse:.3g}, the target {target}. Raise max_draws or run more chains", LLCTargetNotMetWarning,
                      stacklevel=5)
    if trace.fallback_reason and (not label or label == config.component_names[0]):  # once per run
        warnings.warn(f"the model could not be batched over chains ({trace.fallback_reason}); chains ran one at "
                      "a time. Pass chain_batching='sequential' to skip the attempt.", RuntimeWarning, stacklevel=5)
    first = config.component_names.index(label) * config.num_chains if label else 0
    unmoved = [r - first for r in trace.unmoved if first <= r < first + config.num_chains]
    if unmoved:
        warn_unmoved(unmoved, config, where)
    report_divergence(result, warn=True, where=where)


class LLCChainsStuckWarning(RuntimeWarning):
    """A chain's weights never left w*: its estimate is only the minibatch noise of the loss at w*."""


def warn_unmoved(chains: list[int], config, where: str = "") -> None:
    import math

    import torch

    lr = min(config.lr[c] for c in chains)
    step = config.noise_level * math.sqrt(lr)
    resolution = {"float32": torch.finfo(torch.float32).eps, "float64": torch.finfo(torch.float64).eps,
                  "bfloat16": torch.finfo(torch.bfloat16).eps}
    why = (f"a step moves a weight by about noise_level*sqrt(lr) = {step:.3g}, below the float resolution of the "
           "weights (relative spacing " + ", ".join(f"{k} {v:.2g}" for k, v in resolution.items()) + ")")
    if config.noise_level == 0:
        why = "noise_level=0 and the drift did not change any weight"
    warnings.warn(f"{where}chain(s) {chains} never moved from w* (every weight is bitwise unchanged after "
                  f"{config.schedule.num_steps - 1} steps): {why}. The estimate is then only the minibatch noise of "
                  f"the loss at w*; use a larger lr (now {lr:g}).", LLCChainsStuckWarning, stacklevel=5)


def warn_unstable(config) -> None:
    """Before sampling: chains whose localization step alone diverges (lr*gamma >= STABILITY_LIMIT, where the pull
    -(lr/2)*gamma*(w - w*) flips w - w* with a larger size every step) will diverge; say which and what works."""
    bad = [c for c, (lr, g) in enumerate(zip(config.lr, config.gamma)) if lr * g >= STABILITY_LIMIT]
    if bad:
        c = bad[0]
        warnings.warn(f"chain(s) {bad} will diverge: lr*gamma = {config.lr[c] * config.gamma[c]:.3g} >= "
                      f"{STABILITY_LIMIT:g}, so the localization step alone overshoots w* by more each step. Use lr < "
                      f"{STABILITY_LIMIT / config.gamma[c]:.3g} ({STABILITY_LIMIT:g}/gamma; well below, since "
                      "nbeta*curvature adds to gamma: llc_fast.calibrate measures the curvature) or a smaller gamma",
                      LLCDivergenceWarning, stacklevel=4)


def divergence_advice(lr: float, nbeta: float, gamma: float) -> str:
    """What to change when a chain with these hyperparameters diverged: the localization, when its step alone
    overshoots w* (lr*gamma >= OVERSHOOT_LIMIT), else the step size against the drift."""
    if lr * gamma >= OVERSHOOT_LIMIT:
        return (f"lr*gamma = {lr * gamma:.3g} is too large (the localization step alone overshoots w* from lr*gamma = "
                f"{OVERSHOOT_LIMIT:g} and diverges from {STABILITY_LIMIT:g}): use a smaller step size, lr < "
                f"{OVERSHOOT_LIMIT / gamma:.3g}, or a smaller gamma")
    return (f"try a smaller step size than lr={lr:g} (the drift is lr/2*nbeta*grad with nbeta={nbeta:g}), or a "
            "larger gamma to hold the chain nearer w*")


def report_divergence(result: LLCResult, warn: bool = True, where: str = "") -> None:
    """Warn about each diverged chain (naming the first bad step and what to change); raise
    AllChainsDivergedError if no chain is left. where: a prefix naming the component."""
    cfg = result.config
    for c in result.diverged_chains if warn else ():
        step = result.diverged_at_step[c]
        warnings.warn(
            f"{where}chain {c} diverged at step {step} (its loss became NaN/Inf or moved more than {DIVERGENCE_FACTOR:g}x "
            f"max(|L(w*)|, 1) away from L(w*) = {result.init_loss:.4g}) and is left out of the mean; "
            + divergence_advice(cfg["lr"][c], cfg["nbeta"][c], cfg["gamma"][c]),
            LLCDivergenceWarning, stacklevel=5,
        )
    if result.diverged_chains and len(result.diverged_chains) == result.num_chains:
        raise AllChainsDivergedError(
            f"{where}all {result.num_chains} chains diverged; no estimate. "
            + divergence_advice(cfg["lr"][0], cfg["nbeta"][0], cfg["gamma"][0])
            + ". The partial traces are in this error's .result.",
            result,
        )
