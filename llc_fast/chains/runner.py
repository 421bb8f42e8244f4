"""Running SGLD chains from w*: the sampling loop between the data, the model and the update.

Chains run in groups; each group is one row block of a ``FlatState`` and takes one fused update
per step. Within a group, the forward/backward passes run either batched (``VmapEngine``: one
vmapped pass for the whole group) or one chain after another (``SequentialEngine``, groups of
one). Each chain reads its own batch stream keyed by its index, and its noise is keyed by
(seed, chain, step, element), so a chain's trace does not depend on the grouping: batched,
grouped and one-at-a-time runs agree to float tolerance (randomness inside the model, such as
dropout, is the exception: it is drawn per group).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..diagnostics.mala import mala_log_acceptance, potential_and_gradient
from ..kernels.update_spec import SamplerSettings, StepCounters
from ..state.flat import FlatState
from .data import STREAM_CHAIN, BatchStream, derived_seed, move_to_device
from .engines import SequentialEngine, VmapEngine

DIVERGENCE_CHECK_EVERY = 16  # steps between host checks for a non-finite loss
CHAIN_BATCHING = ("auto", "vmap", "sequential")


@dataclass(frozen=True)
class Schedule:
    """Which steps are recorded. Draw d is the minibatch loss at the state reached after
    ``num_burnin_steps + d * num_steps_bw_draws`` updates (draw 0 of a run without burn-in is w*).
    ``mala_every``: every that many steps from the first draw on, the step's MALA acceptance is
    computed (one extra forward and backward)."""

    num_draws: int
    num_burnin_steps: int = 0
    num_steps_bw_draws: int = 1
    freeze_preconditioner_at: int | None = None  # V stops taking gradients from this step on
    mala_every: int | None = None

    @property
    def num_steps(self) -> int:
        """Forward passes per chain; the last one is recorded and needs no update."""
        return self.num_burnin_steps + (self.num_draws - 1) * self.num_steps_bw_draws + 1

    @property
    def num_mala(self) -> int:
        if not self.mala_every:
            return 0
        return len(range(self.num_burnin_steps, self.num_steps - 1, self.mala_every))

    def draw_at(self, step: int) -> int | None:
        k = step - self.num_burnin_steps
        if k < 0 or k % self.num_steps_bw_draws:
            return None
        return k // self.num_steps_bw_draws

    def mala_at(self, step: int) -> int | None:
        k = step - self.num_burnin_steps
        if not self.mala_every or k < 0 or k % self.mala_every or step == self.num_steps - 1:
            return None
        return k // self.mala_every

    def counters(self, step: int) -> StepCounters:
        f = self.freeze_preconditioner_at
        if f is None or step < f:
            return StepCounters(step=step, update_statistic=True, stat_step=step)
        return StepCounters(step=step, update_statistic=False, stat_step=f - 1)


@dataclass
class ChainTrace:
    """loss_trace: float64 [C, D], NaN after a chain diverged; burnin_loss_trace [C, B];
    mala_acceptance [C, K] (empty when not recorded); diverged_at: chain row -> step seen;
    engine: "vmap" or "sequential", with fallback_reason when batching was not possible."""

    loss_trace: np.ndarray
    burnin_loss_trace: np.ndarray
    mala_acceptance: np.ndarray
    diverged_at: dict[int, int] = field(default_factory=dict)
    engine: str = "sequential"
    fallback_reason: str = ""


@dataclass(frozen=True)
class ChainHyper:
    """Per-chain hyperparameters, each a [C] float64 tensor, and the chains' global indices [C]."""

    lr: torch.Tensor
    nbeta: torch.Tensor
    gamma: torch.Tensor
    chain_ids: torch.Tensor

    def rows(self, sl: slice) -> "ChainHyper":
        return ChainHyper(self.lr[sl], self.nbeta[sl], self.gamma[sl], self.chain_ids[sl])


def _probe_vmap(engine: VmapEngine, batches: list) -> str:
    """"" if the group's first forward/backward batches under vmap, else why not."""
    try:
        engine.loss_and_grad(len(batches), batches)
        return ""
    except Exception as e:  # any failure means: run this model one chain at a time
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def run_chains(
    model: torch.nn.Module,
    state: FlatState,
    data,
    loss_fn: Callable,
    hyper: ChainHyper,
    *,
    settings: SamplerSettings,
    schedule: Schedule,
    seed: int,
    update: Callable[..., None],
    device: torch.device,
    mask: torch.Tensor | None = None,
    shared_batches: bool = False,
    chain_batching: str = "auto",
    on_step: Callable[[int], None] | None = None,
) -> ChainTrace:
    """Run every chain of ``hyper`` from w*, in groups of ``state.num_chains`` rows.

    chain_batching: "vmap" (batched forward/backward), "sequential" (one chain at a time, groups
    of one) or "auto" (vmap if the model batches, else sequential with the reason recorded).
    shared_batches: every chain reads the same batch sequence (devinterp's default); otherwise
    each chain has its own stream.
    """
    if chain_batching not in CHAIN_BATCHING:
        raise ValueError(f"chain_batching must be one of {CHAIN_BATCHING}, got {chain_batching!r}")
    num_chains = hyper.chain_ids.numel()
    out = ChainTrace(
        loss_trace=np.full((num_chains, schedule.num_draws), np.nan),
        burnin_loss_trace=np.full((num_chains, schedule.num_burnin_steps), np.nan),
        mala_acceptance=np.full((num_chains, schedule.num_mala), np.nan),
    )
    engine_kind = "sequential" if chain_batching == "sequential" or state.num_chains == 1 else "vmap"
    if engine_kind == "vmap" and chain_batching == "auto":
        rows = min(state.num_chains, num_chains)
        probe = _group_streams(data, seed, hyper.rows(slice(0, rows)), shared_batches)
        reason = _probe_vmap(VmapEngine(model, state, loss_fn), [move_to_device(next(s), device) for s in probe])
        if reason:
            engine_kind, out.fallback_reason = "sequential", reason
    out.engine = engine_kind
    group_size = 1 if engine_kind == "sequential" else state.num_chains
    engine = SequentialEngine(model, state, loss_fn) if engine_kind == "sequential" else VmapEngine(model, state, loss_fn)
    for start in range(0, num_chains, group_size):
        sl = slice(start, min(num_chains, start + group_size))
        _run_group(engine, state, data, hyper.rows(sl), sl, out, settings=settings, schedule=schedule, seed=seed,
                   update=update, device=device, mask=mask, shared_batches=shared_batches, on_step=on_step)
    return out


def _group_streams(data, seed: int, hyper: ChainHyper, shared: bool) -> list[BatchStream]:
    if shared:
        stream = BatchStream(data, seed=seed, stream=STREAM_CHAIN, index=0)
        return [stream] * hyper.chain_ids.numel()
    return [BatchStream(data, seed=seed, stream=STREAM_CHAIN, index=int(c)) for c in hyper.chain_ids]


def _run_group(engine, state: FlatState, data, hyper: ChainHyper, rows: slice, out: ChainTrace, *, settings, schedule,
               seed, update, device, mask, shared_batches, on_step) -> None:
    G = hyper.chain_ids.numel()
    state.reset(settings.initial_statistic)
    streams = _group_streams(data, seed, hyper, shared_batches)
    draws = torch.full((G, schedule.num_draws), math.nan, dtype=torch.float64, device=device)
    burnin = torch.full((G, schedule.num_burnin_steps), math.nan, dtype=torch.float64, device=device)
    mala = torch.full((G, schedule.num_mala), math.nan, dtype=torch.float64, device=device)
    nonfinite = torch.zeros(G, dtype=torch.bool, device=device)
    diverged: dict[int, int] = {}
    w, stat = state.w[:G], None if state.stat is None else state.stat[:G]
    step_args = dict(lr=hyper.lr.to(device), nbeta=hyper.nbeta.to(device), gamma=hyper.gamma.to(device),
                     settings=settings, seed=seed, chain_ids=hyper.chain_ids.to(device), mask=mask)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derived_seed(seed, STREAM_CHAIN, int(hyper.chain_ids[0]), 2**32))  # dropout etc.
        for t in range(schedule.num_steps):
            shared = next(streams[0]) if shared_batches else None
            batches = [move_to_device(shared, device)] * G if shared_batches else \
                [move_to_device(next(s), device) for s in streams]
            losses, grad = engine.loss_and_grad(G, batches)
            d = schedule.draw_at(t)
            if d is not None:
                draws[:, d] = losses
            elif t < schedule.num_burnin_steps:
                burnin[:, t] = losses
            nonfinite |= ~torch.isfinite(losses)
            last = t == schedule.num_steps - 1
            if (t + 1) % DIVERGENCE_CHECK_EVERY == 0 or last:
                for row in torch.nonzero(nonfinite).flatten().tolist():
                    diverged.setdefault(row, t)
                if len(diverged) == G:
                    break
            if on_step is not None:
                on_step(G)
            if last:
                break
            k = schedule.mala_at(t)
            if k is not None:
                w_old, grad_old = w.clone(), grad.clone()
            update(w, grad, state.w_star, stat, counters=schedule.counters(t), **step_args)
            if k is not None:
                mala[:, k] = _mala(engine, G, batches, w_old, grad_old, losses, state, stat, settings,
                                   schedule.counters(t), step_args, mask)
    if on_step is not None and len(diverged) == G:  # account for the steps the group will not take
        on_step(G * (schedule.num_steps - t))
    for row, seen in diverged.items():
        draws[row, _first_draw_after(schedule, seen) :] = math.nan
    out.loss_trace[rows] = _nan_after_first_bad(draws.cpu().numpy())
    out.burnin_loss_trace[rows] = burnin.cpu().numpy()
    out.mala_acceptance[rows] = np.exp(mala.cpu().numpy())
    for row, seen in diverged.items():
        out.diverged_at[rows.start + row] = seen


def _first_draw_after(schedule: Schedule, step: int) -> int:
    """Index of the first draw recorded after ``step`` (the divergence was seen there)."""
    k = step + 1 - schedule.num_burnin_steps
    return max(0, -(-k // schedule.num_steps_bw_draws))


def _nan_after_first_bad(trace: np.ndarray) -> np.ndarray:
    for row in trace:
        bad = np.flatnonzero(~np.isfinite(row))
        if bad.size:
            row[bad[0] :] = np.nan
    return trace


def _mala(engine, G, batches, w_old, grad_old, loss_old, state, stat, settings, counters, step_args, mask):
    """log MALA acceptance [G] of the step just taken (one more forward/backward on the same batches)."""
    nbeta, gamma = step_args["nbeta"], step_args["gamma"]
    loss_new, grad_new = engine.loss_and_grad(G, batches)
    u_old, g_old = potential_and_gradient(loss_old, grad_old, w_old, state.w_star, nbeta, gamma, settings.weight_decay)
    u_new, g_new = potential_and_gradient(loss_new, grad_new, state.w[:G], state.w_star, nbeta, gamma,
                                          settings.weight_decay)
    precond = 1.0
    if settings.preconditioned:
        scale = settings.statistic_scale(counters.stat_step)
        precond = 1.0 / (torch.sqrt(stat.to(torch.float64) * scale) + settings.rmsprop_eps)
    return mala_log_acceptance(w_old, state.w[:G], g_old, g_new, u_old, u_new, step_args["lr"], precond, mask)
