"""estimate_llc: the Local Learning Coefficient of a trained model by localized, tempered SGLD.

    lambda_hat = nbeta * (E_w[L(w)] - L(w*)),  w ~ exp(-nbeta*L(w) - gamma/2*|w - w*|^2)

E_w[L] is the mean over draws (burn-in excluded) of the minibatch loss along each chain;
L(w*) is averaged over several batches. Per-chain estimates, then mean and std over chains.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence

import torch

from .. import __version__
from ..chains.data import STREAM_INIT_LOSS, BatchStream, check_reiterable, dataset_size, move_to_device
from ..chains.runner import CHAIN_BATCHING, ChainHyper, Schedule, run_chains
from ..kernels.dispatch import select_backend
from ..kernels.update_spec import SamplerSettings
from ..state.flat import FlatState, isolated_buffers
from . import validation as check
from .result import LLCResult


class LLCDivergenceWarning(RuntimeWarning):
    """A chain's loss became NaN or infinite; the chain was stopped and left out of the mean."""


class AllChainsDivergedError(RuntimeError):
    """Every chain diverged. ``.result`` holds the partial traces."""

    def __init__(self, message: str, result: LLCResult):
        super().__init__(message)
        self.result = result


def default_nbeta(n: int) -> float:
    """Watanabe's nbeta = n / log n (beta* = 1/log n)."""
    return n / math.log(n)


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
    mask: dict[str, torch.Tensor] | None = None,
    num_init_loss_batches: int = 16,
    freeze_preconditioner_at: int | None = None,
    backend: str = "auto",
    shared_batches: bool = False,
    chain_batching: str = "auto",
    max_batched_chains: int | None = None,
    batch_memory_bytes: int | None = None,
    mala_every: int | None = None,
) -> LLCResult:
    """Estimate the LLC of ``model`` at its current weights w*.

    data: a DataLoader or any re-iterable of batches; cycled as needed. Each chain reads its
        own stream of batches (a shuffling loader is re-seeded per chain and pass).
    loss_fn(model, batch) -> scalar tensor: the mean loss of the batch.
    sampler: "sgld", "rmsprop_sgld" (devinterp's preconditioner) or "rmsprop_sgld_bc"
        (bias-corrected, V starting at 1; Hitchcock & Hoogland 2025).
    lr, nbeta, gamma: step size epsilon, inverse temperature times n, localization strength; each a
        scalar or one value per chain. nbeta defaults to n/log n when the loader's dataset has a length.
    num_draws draws per chain, taken every num_steps_bw_draws steps after num_burnin_steps.
    weight_decay, box (clamp to w* +- box), noise_level, mask ({param name: 0/1 tensor}; masked
        weights never move): optional parts of the update. rmsprop_alpha, rmsprop_eps: the
        preconditioner's decay and floor; freeze_preconditioner_at: step from which V stays fixed.
    num_init_loss_batches: batches averaged for L(w*). backend: "auto" or a name from llc_fast.backends().
    shared_batches: all chains read the same batches (devinterp's default) instead of their own.
    chain_batching: "auto" (chains batched in one vmapped forward/backward where the model allows,
        else one at a time, with a warning saying why), "vmap" or "sequential". max_batched_chains
        bounds how many chains share one pass (memory: about that many copies of the weights,
        gradients and activations); the result does not depend on it.
    mala_every: record the MALA acceptance of every k-th step after burn-in (one more forward and
        backward each time); result.mala_acceptance is then [chains, records].
    batch_memory_bytes: budget for the per-chain flat buffers of one batched group (weights,
        gradients, RMSProp statistic); default: half the free memory on a GPU, no limit on CPU.
        Activations come on top and scale with the group size too: lower max_batched_chains if a
        batched pass runs out of memory.

    The model's parameters are sampled if floating-point with requires_grad; the model itself
    is left bitwise unchanged. Returns an LLCResult.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        from ..distributed import sharded  # torchrun: FSDP2 within shard groups, chain groups in parallel
        return sharded.estimate_llc_sharded(**{k: v for k, v in locals().items() if k != "sharded"})
    # --- inputs, before any sampling work --------------------------------------------------
    settings, hyper, schedule, n = checked_inputs(locals())
    layout = check.check_model(model, device)
    device = torch.device(device) if device is not None else layout.device
    chosen = select_backend(backend, device)
    backend_name, update = chosen.name, chosen.update
    flat_mask = layout.flat_mask(mask, device) if mask else None

    config = dict(
        sampler=sampler, lr=hyper.lr.tolist(), nbeta=hyper.nbeta.tolist(), gamma=hyper.gamma.tolist(),
        num_chains=num_chains, num_draws=num_draws, num_burnin_steps=num_burnin_steps,
        num_steps_bw_draws=num_steps_bw_draws, seed=seed, device=str(device), rmsprop_alpha=rmsprop_alpha,
        rmsprop_eps=rmsprop_eps, weight_decay=weight_decay, box=box, noise_level=noise_level,
        mask=sorted(mask) if mask else None, num_init_loss_batches=num_init_loss_batches,
        freeze_preconditioner_at=freeze_preconditioner_at, backend=backend_name, dataset_size=n,
        shared_batches=shared_batches, chain_batching=chain_batching, max_batched_chains=max_batched_chains,
        mala_every=mala_every,
        num_params=layout.numel, param_dtype=str(layout.dtype).replace("torch.", ""),
        llc_fast_version=__version__, torch_version=torch.__version__,
    )

    # --- sampling ----------------------------------------------------------------------------
    rows = _group_size(layout, settings, num_chains, chain_batching, max_batched_chains, batch_memory_bytes, device)
    state = FlatState(layout, rows, device=device, preconditioned=settings.preconditioned,
                      initial_statistic=settings.initial_statistic)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), isolated_buffers(layout, device):
        init_loss = _init_loss(model, state, data, loss_fn, seed, num_init_loss_batches, device)
        t_init = time.perf_counter()
        with _progress_bar(num_chains * schedule.num_steps, progress) as bar:
            trace = run_chains(
                model, state, data, loss_fn, hyper, settings=settings, schedule=schedule, seed=seed,
                update=update, device=device, mask=flat_mask, shared_batches=shared_batches,
                chain_batching=chain_batching, on_step=bar.update,
            )
    if trace.fallback_reason:
        warnings.warn(f"the model could not be batched over chains ({trace.fallback_reason}); chains ran one at "
                      "a time. Pass chain_batching='sequential' to skip the attempt.", RuntimeWarning, stacklevel=2)
    config["engine"] = trace.engine
    t_end = time.perf_counter()
    steps = num_chains * schedule.num_steps
    timing = dict(init_loss_s=t_init - t0, sampling_s=t_end - t_init, steps=steps,
                  steps_per_s=steps / max(t_end - t_init, 1e-12))
    result = LLCResult.from_traces(trace.loss_trace, init_loss, hyper.nbeta.numpy(), trace.diverged_at, config, timing,
                                   burnin_loss_trace=trace.burnin_loss_trace, mala_acceptance=trace.mala_acceptance)
    _report_divergence(result, hyper)
    return result


def checked_inputs(a: dict) -> tuple[SamplerSettings, ChainHyper, Schedule, int | None]:
    """Check estimate_llc's arguments (``a``: its keyword arguments by name) before any work.

    Returns the sampler settings, the per-chain hyperparameters (nbeta resolved), the schedule,
    and n (the dataset size, or None). Every error says what was wrong and what to pass.
    """
    settings = SamplerSettings(sampler=a["sampler"], rmsprop_alpha=a["rmsprop_alpha"], rmsprop_eps=a["rmsprop_eps"],
                               weight_decay=a["weight_decay"], box=a["box"], noise_level=a["noise_level"])
    for name in ("num_chains", "num_draws", "num_steps_bw_draws", "num_init_loss_batches"):
        check.check_count(name, a[name], 1)
    check.check_count("num_burnin_steps", a["num_burnin_steps"], 0)
    for name in ("freeze_preconditioner_at", "mala_every", "max_batched_chains", "batch_memory_bytes"):
        if a[name] is not None:
            check.check_count(name, a[name], 1)
    if a["chain_batching"] not in CHAIN_BATCHING:
        raise ValueError(f"chain_batching must be one of {CHAIN_BATCHING}, got {a['chain_batching']!r}")
    seed = a["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    check.check_positive("lr", a["lr"], hint="lr is the SGLD step size epsilon, e.g. 1e-4.")
    check.check_positive("gamma", a["gamma"], allow_zero=True, hint="gamma is the localization strength (0 turns it off).")
    if not callable(a["loss_fn"]):
        raise TypeError("loss_fn must be a callable loss_fn(model, batch) -> scalar mean loss")
    check_reiterable(a["data"])
    n = dataset_size(a["data"])
    nbeta = a["nbeta"]
    if nbeta is None:
        if n is None or n < 2:
            raise ValueError(
                "nbeta is required when the data's size is unknown: pass nbeta=n/log(n) for n training samples "
                "(or a fixed value such as 10-30 for language models)"
            )
        nbeta = default_nbeta(n)
    check.check_positive("nbeta", nbeta, hint="nbeta is n*beta, e.g. n/log(n) for n training samples.")
    num_chains = a["num_chains"]
    for name, value in (("lr", a["lr"]), ("nbeta", nbeta), ("gamma", a["gamma"])):
        check.check_per_chain_length(name, value, num_chains)
    schedule = Schedule(num_draws=a["num_draws"], num_burnin_steps=a["num_burnin_steps"],
                        num_steps_bw_draws=a["num_steps_bw_draws"],
                        freeze_preconditioner_at=a["freeze_preconditioner_at"], mala_every=a["mala_every"])
    hyper = ChainHyper(*(torch.as_tensor(v, dtype=torch.float64).expand(num_chains).clone()
                         for v in (a["lr"], nbeta, a["gamma"])), chain_ids=torch.arange(num_chains, dtype=torch.int64))
    return settings, hyper, schedule, n


def _group_size(layout, settings: SamplerSettings, num_chains: int, chain_batching: str, max_batched: int | None,
                budget: int | None, device: torch.device) -> int:
    """How many chains share one batched pass: all, unless max_batched or the memory budget says fewer."""
    if chain_batching == "sequential":
        return 1
    rows = min(num_chains, max_batched or num_chains)
    if budget is None and device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] // 2
    if budget is not None:
        param_bytes = torch.finfo(layout.dtype).bits // 8
        stat_bytes = 2 * param_bytes if param_bytes == 2 else param_bytes  # fp32 statistic for bf16 weights
        per_chain = layout.numel * (3 * param_bytes + (stat_bytes if settings.preconditioned else 0))
        rows = max(1, min(rows, budget // max(per_chain, 1)))
    return rows


def _init_loss(model, state: FlatState, data, loss_fn, seed: int, num_batches: int, device) -> float:
    """L(w*) averaged over ``num_batches`` batches (fewer if one pass over the data is shorter)."""
    first_pass = _count_upto(data, num_batches)
    if first_pass == 0:
        raise ValueError("data yielded no batches: pass a non-empty DataLoader or list of batches")
    batches = BatchStream(data, seed=seed, stream=STREAM_INIT_LOSS, index=0)
    total = 0.0
    with torch.no_grad(), state.install(0):
        for k in range(first_pass):
            loss = check.checked_loss(loss_fn(model, move_to_device(next(batches), device)),
                                      f"at w* (initial-loss batch {k})")
            total += float(loss)
    return total / first_pass


def _count_upto(data, limit: int) -> int:
    """How many batches one pass yields, counting at most ``limit`` (uses len() when it exists)."""
    try:
        return min(len(data), limit)
    except TypeError:
        count = 0
        for _ in data:
            count += 1
            if count >= limit:
                break
        return count


def _report_divergence(result: LLCResult, hyper: ChainHyper) -> None:
    for c in result.diverged_chains:
        warnings.warn(
            f"chain {c} diverged at step {result.diverged_at_step[c]} (its loss became NaN/Inf) and is left out "
            f"of the mean; try a smaller step size than lr={hyper.lr[c].item():g}, or a larger gamma",
            LLCDivergenceWarning, stacklevel=3,
        )
    if result.diverged_chains and len(result.diverged_chains) == result.num_chains:
        raise AllChainsDivergedError(
            f"all {result.num_chains} chains diverged (loss became NaN/Inf); no estimate. Try a smaller lr "
            f"(now {hyper.lr.tolist()}) or a larger gamma. The partial traces are in this error's .result.",
            result,
        )


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", unit="step", dynamic_ncols=True)
