"""The sampling loop: SGLD chains from w*, between the data, an engine, a chain state and the fused update.

``run_chains`` is the only loop, for one process and for FSDP shard groups alike. Chains run in
groups of the state's rows; each step, the engine computes a group's losses and gradients
(``engines.py``; ``llc_fast.distributed.engine`` for sharded models) and one fused call of the
backend updates the group (``ChainState.segments``). Each chain reads its own batch stream keyed by
its index, and its noise is keyed by (seed, chain, step, element), so a chain's trace does not
depend on the grouping, the engine or the sharding (randomness inside the model, such as dropout,
is the exception: it is drawn per group).

``sample_local`` sets up one process (layout, flat state, engine) and runs the loop.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..diagnostics.mala import mala_log_acceptance, potential_and_gradient
from ..kernels.dispatch import select_backend
from ..state.flat import FlatLayout, FlatState
from ..state.memory import rows_within
from .data import STREAM_CHAIN, STREAM_INIT_LOSS, BatchStream, derived_seed, move_to_device
from .engines import checked_finite, local_engine
from .schedule import ChainHyper, Schedule
from .trace import ChainTrace, divergence_bound

DIVERGENCE_CHECK_EVERY = 16  # steps between host checks for a diverged loss
CHAIN_BATCHING = ("auto", "vmap", "sequential")


@dataclass
class ChainRun:
    """What sampling produced: L(w*), the chains' trace, clocks (init_loss_s, sampling_s) and the facts
    of the run recorded in the result's config (device, backend, engine, sizes)."""

    init_loss: float
    trace: ChainTrace
    timing: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)
    report: bool = True  # this process reports warnings (rank 0 under torchrun)


def batch_streams(data, seed: int, chain_ids, shared: bool) -> list[BatchStream]:
    """One stream per chain (keyed by its index), or one stream read by every chain."""
    if shared:
        return [BatchStream(data, seed=seed, stream=STREAM_CHAIN, index=0)] * len(chain_ids)
    return [BatchStream(data, seed=seed, stream=STREAM_CHAIN, index=int(c)) for c in chain_ids]


def initial_loss(engine, data, *, seed: int, num_batches: int, device: torch.device) -> float:
    """L(w*) averaged over ``num_batches`` batches (fewer if one pass over the data is shorter)."""
    first_pass = _count_upto(data, num_batches)
    if first_pass == 0:
        raise ValueError("data yielded no batches: pass a non-empty DataLoader or list of batches")
    batches = BatchStream(data, seed=seed, stream=STREAM_INIT_LOSS, index=0)
    total = 0.0
    for k in range(first_pass):
        where = f"at w* (initial-loss batch {k})"
        batch = move_to_device(next(batches), device)
        total += checked_finite(engine.loss_at_w_star(batch), where)
        if k == 0 and hasattr(engine, "check_gradient"):
            engine.check_gradient(batch)
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


def run_chains(engine, state, data, hyper: ChainHyper, *, settings, schedule: Schedule, seed: int, backend,
               device: torch.device, init_loss: float, shared_batches: bool = False, progress: bool = False,
               on_step: Callable[[], None] | None = None) -> ChainTrace:
    """Run every chain of ``hyper`` from w*, in groups of ``state.num_chains`` rows (one row for an
    unbatched engine). shared_batches: every chain reads the same batch sequence (devinterp's default).
    on_step: called after each step's forward pass (e.g. to stop when another rank failed)."""
    trace = ChainTrace.empty(hyper.num_chains, schedule)
    trace.engine = engine.name
    group = state.num_chains if engine.batched else 1
    with _progress_bar(hyper.num_chains * schedule.num_steps, progress) as bar:
        for start in range(0, hyper.num_chains, group):
            rows = hyper.rows(slice(start, min(hyper.num_chains, start + group)))
            step_losses, mala, unmoved = _run_group(engine, state, data, rows, settings=settings, schedule=schedule,
                                                    seed=seed, backend=backend, device=device, init_loss=init_loss,
                                                    shared_batches=shared_batches, bar=bar, on_step=on_step)
            trace.record(start, step_losses, mala, schedule, init_loss)
            trace.unmoved += [start + r for r in unmoved]
    return trace


def _run_group(engine, state, data, hyper: ChainHyper, *, settings, schedule: Schedule, seed, backend, device,
               init_loss, shared_batches, bar, on_step) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The per-step losses [G, T] (NaN after the group stopped), log MALA acceptances [G, K] and the rows that
    never moved from w* of one group."""
    G = hyper.num_chains
    state.reset()
    streams = batch_streams(data, seed, hyper.chain_ids, shared_batches)
    losses_by_step = torch.full((G, schedule.num_steps), math.nan, dtype=torch.float64, device=device)
    mala = torch.full((G, schedule.num_mala), math.nan, dtype=torch.float64, device=device)
    bad = torch.zeros(G, dtype=torch.bool, device=device)
    bound = divergence_bound(init_loss)
    stat = state.stat_rows(G)
    step_args = dict(lr=hyper.lr.to(device), nbeta=hyper.nbeta.to(device), gamma=hyper.gamma.to(device),
                     settings=settings, seed=seed, chain_ids=hyper.chain_ids.to(device), mask=state.flat_mask)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derived_seed(seed, STREAM_CHAIN, int(hyper.chain_ids[0]), 2**32))  # dropout etc.
        for t in range(schedule.num_steps):
            shared = next(streams[0]) if shared_batches else None
            batches = [move_to_device(shared, device)] * G if shared_batches else \
                [move_to_device(next(s), device) for s in streams]
            losses, grad = engine.loss_and_grad(G, batches)
            losses_by_step[:, t] = losses
            bad |= ~torch.isfinite(losses) | ((losses.to(torch.float64) - init_loss).abs() > bound)
            last = t == schedule.num_steps - 1
            if (t + 1) % DIVERGENCE_CHECK_EVERY == 0 or last:
                if bool(bad.all()):
                    break
            if on_step is not None:
                on_step()
            bar.update(G)
            if last:
                break
            k = schedule.mala_at(t)
            if k is not None:
                w_old, grad_old = state.w[:G].clone(), (state.grad[:G] if grad is None else grad).clone()
            backend.update_segments(state.segments(G, grad), state.w_star, stat, counters=schedule.counters(t),
                                    **step_args)
            if k is not None:
                mala[:, k] = _mala(engine, G, batches, w_old, grad_old, losses, state, stat, settings,
                                   schedule.counters(t), step_args)
    if bool(bad.all()):  # account for the steps the group will not take
        bar.update(G * (schedule.num_steps - t))
    return losses_by_step.cpu().numpy(), mala.cpu().numpy(), state.unmoved_rows(G)


def _mala(engine, G, batches, w_old, grad_old, loss_old, state, stat, settings, counters, step_args):
    """log MALA acceptance [G] of the step just taken (one more forward/backward on the same batches)."""
    nbeta, gamma = step_args["nbeta"], step_args["gamma"]
    loss_new, grad_new = engine.loss_and_grad(G, batches)
    if grad_new is None:
        grad_new = state.grad[:G]
    u_old, g_old = potential_and_gradient(loss_old, grad_old, w_old, state.w_star, nbeta, gamma, settings.weight_decay)
    u_new, g_new = potential_and_gradient(loss_new, grad_new, state.w[:G], state.w_star, nbeta, gamma,
                                          settings.weight_decay)
    precond = 1.0
    if settings.preconditioned:
        scale = settings.statistic_scale(counters.stat_step)
        precond = 1.0 / (torch.sqrt(stat.to(torch.float64) * scale) + settings.rmsprop_eps)
    return mala_log_acceptance(w_old, state.w[:G], g_old, g_new, u_old, u_new, step_args["lr"], precond,
                               state.flat_mask)


def sample_local(model, data, loss_fn, config, *, chains: list[int] | None = None,
                 on_step: Callable[[], None] | None = None, progress: bool | None = None) -> ChainRun:
    """Run ``config``'s chains (or only the chains at ``chains``) in this process.

    config: an ``LLCConfig`` with nbeta resolved. Returns the ChainRun of those chains, in that order.
    """
    layout = FlatLayout.for_sampling(model)
    device = torch.device(config.device) if config.device is not None else layout.device
    backend = select_backend(config.backend, device)
    settings, schedule = config.settings, config.schedule
    hyper = config.hyper if chains is None else config.hyper.rows(chains)
    rows = 1 if config.chain_batching == "sequential" else \
        min(hyper.num_chains, config.max_batched_chains or hyper.num_chains)
    budget = config.batch_memory_bytes
    if budget is None and device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] // 2
    rows = rows_within(budget, layout.numel, layout.dtype, settings.preconditioned, max(1, rows))
    state = FlatState(layout, rows, device=device, preconditioned=settings.preconditioned,
                      initial_statistic=settings.initial_statistic, mask=config.mask)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), state.isolation():
        engine, reason = local_engine(model, state, loss_fn, "sequential", None)
        init_loss = initial_loss(engine, data, seed=config.seed, num_batches=config.num_init_loss_batches,
                                 device=device)
        t_init = time.perf_counter()
        if hyper.num_chains:
            def probe_batches():
                streams = batch_streams(data, config.seed, hyper.chain_ids[:rows], False)
                return [move_to_device(next(s), device) for s in streams]

            engine, reason = local_engine(model, state, loss_fn, config.chain_batching, probe_batches)
            trace = run_chains(engine, state, data, hyper, settings=settings, schedule=schedule, seed=config.seed,
                               backend=backend, device=device, init_loss=init_loss,
                               shared_batches=config.shared_batches,
                               progress=config.progress if progress is None else progress, on_step=on_step)
            trace.fallback_reason = reason
        else:
            trace = ChainTrace.empty(0, schedule)
            trace.engine = "none"
    t_end = time.perf_counter()
    facts = dict(device=str(device), backend=backend.name, engine=trace.engine, num_params=layout.numel,
                 param_dtype=str(layout.dtype).replace("torch.", ""))
    return ChainRun(init_loss, trace, dict(init_loss_s=t_init - t0, sampling_s=t_end - t_init), facts)


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
