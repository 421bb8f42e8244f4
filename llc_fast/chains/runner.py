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
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..diagnostics.mala import mala_log_acceptance, potential_and_gradient
from ..kernels.dispatch import select_backend
from ..kernels.update_spec import RowMasks
from ..state.flat import FlatLayout, FlatState
from ..state.memory import plan_rows
from .curvature import curvature_preconditioner
from .data import STREAM_CHAIN, STREAM_INIT_LOSS, BatchStream, batches_in_first_pass, derived_seed, move_to_device
from .engines import checked_finite, local_engine
from .interrupt import SamplingInterrupted, StopRequest
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
    first_pass = batches_in_first_pass(data, num_batches)
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


@dataclass
class RunControl:
    """What may stop or continue a run besides its schedule.

    checkpoint, checkpoint_every: write the run to this path every that many steps (and when stopped by a
        signal); resume: a checkpoint payload (``checkpoint.read``) to continue from; meta: what a checkpoint
        records of the run (its config, to refuse a resume with other settings).
    target_stderr, target_rel_error: stop drawing once the MCSE of lambda_hat is at most this (absolute, or
        relative to |lambda_hat|), checked every ``check_every`` draws from ``min_draws`` on; the schedule's
        num_draws is then the most draws taken.
    """

    checkpoint: str | None = None
    checkpoint_every: int | None = None
    resume: dict | None = None
    meta: dict = field(default_factory=dict)
    target_stderr: float | None = None
    target_rel_error: float | None = None
    min_draws: int | None = None
    check_every: int | None = None
    stop_on_signal: bool = True
    rank: int = 0
    world: int = 1
    generation: int = 0  # checkpoints written so far (a resumed run continues the count)

    @property
    def has_target(self) -> bool:
        return self.target_stderr is not None or self.target_rel_error is not None

    def boundaries(self, num_draws: int) -> list[int]:
        """Draw counts at which the run may stop (the last is num_draws)."""
        if not self.has_target:
            return [num_draws]
        first, every = min(self.min_draws or num_draws, num_draws), max(1, self.check_every or num_draws)
        return sorted(set(range(first, num_draws, every)) | {num_draws})


class _Group:
    """One group of chain rows and how far it got: the unit that holds the state's rows while it runs."""

    def __init__(self, start: int, hyper: ChainHyper, streams: list, schedule: Schedule, device):
        G = hyper.num_chains
        self.start, self.hyper, self.streams = start, hyper, streams
        self.t, self.done, self.unmoved = 0, False, []
        self.checked = 0  # steps up to here are in ``bad``
        self.losses = torch.full((G, schedule.num_steps), math.nan, dtype=torch.float64, device=device)
        self.mala = torch.full((G, schedule.num_mala), math.nan, dtype=torch.float64, device=device)
        self.bad = torch.zeros(G, dtype=torch.bool, device=device)
        self.rng = None  # the model-randomness RNG state while the group is not running
        self.rows = None  # the group's state rows while another group holds the state

    @property
    def size(self) -> int:
        return self.hyper.num_chains

    def snapshot(self, state, live: bool) -> dict:
        distinct = {id(s): s for s in self.streams}
        return dict(start=self.start, size=self.size, t=self.t, checked=self.checked, done=self.done,
                    unmoved=list(self.unmoved),
                    losses=self.losses.cpu(), mala=self.mala.cpu(), bad=self.bad.cpu(),
                    rng=_rng_state(self.bad.device) if live else self.rng,
                    rows=state.save_rows(self.size) if live and not self.done else self.rows,
                    streams=[s.position for s in distinct.values()])

    def restore(self, snap: dict, device) -> None:
        self.t, self.done, self.unmoved, self.checked = snap["t"], snap["done"], list(snap["unmoved"]), snap["checked"]
        self.losses.copy_(snap["losses"].to(device))
        self.mala.copy_(snap["mala"].to(device))
        self.bad.copy_(snap["bad"].to(device))
        self.rng, self.rows = snap["rng"], snap["rows"]
        for stream, position in zip({id(s): s for s in self.streams}.values(), snap["streams"]):
            stream.seek(tuple(position))


def _rng_state(device) -> dict:
    return dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(rng: dict, device) -> None:
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)


def run_chains(engine, state, data, hyper: ChainHyper, *, settings, schedule: Schedule, seed: int, backend,
               device: torch.device, init_loss: float, shared_batches: bool = False, progress: bool = False,
               on_step: Callable[[], None] | None = None, control: RunControl | None = None,
               observers=None) -> ChainTrace:
    """Run every chain of ``hyper`` from w*, in groups of ``state.num_chains`` rows (one row for an
    unbatched engine), and return their trace. shared_batches: every chain reads the same batch sequence
    (devinterp's default). on_step: called after each step's forward pass (e.g. to stop when another rank
    failed). control: checkpoints, resume, a stopping target, signals (``RunControl``). observers: an
    ``observe.Observers`` with its batches taken and its values at w* measured; each draw's observables are
    recorded in it (``trace.observed``). Rows of ``hyper.component`` sample their component
    (``state.row_masks``); a stopping target must then be met by every component.

    Groups run one after another; with a stopping target they take turns in rounds of ``check_every`` draws
    (each group's rows and RNG put aside meanwhile), so every chain has the same number of draws when the
    MCSE is checked. A chain is the same whatever the rounds, checkpoints and resumes.
    """
    control = control or RunControl(stop_on_signal=False)
    size = state.num_chains if engine.batched else 1
    if control.resume is not None:
        size = control.resume["group_size"]
    groups = [_Group(start, hyper.rows(slice(start, min(hyper.num_chains, start + size))),
                     batch_streams(data, seed, hyper.chain_ids[start:start + size], shared_batches), schedule, device)
              for start in range(0, hyper.num_chains, size)]
    if observers is not None:
        observers.allocate(hyper.num_chains, schedule.num_draws)
    if control.resume is not None:
        for group, snap in zip(groups, control.resume["groups"]):
            group.restore(snap, device)
        for name, values in control.resume.get("observed", {}).items():
            observers.values[name][...] = values
    run = _Run(engine, state, groups, settings=settings, schedule=schedule, seed=seed, backend=backend, device=device,
               init_loss=init_loss, shared_batches=shared_batches, on_step=on_step, control=control, size=size,
               observers=observers)
    boundaries = control.boundaries(schedule.num_draws)
    draws = boundaries[-1]
    with _progress_bar(hyper.num_chains * schedule.num_steps, progress) as run.bar, \
            StopRequest(control.stop_on_signal) as run.stop:
        run.bar.update(sum(g.size * min(g.t, schedule.num_steps) for g in groups))
        for draws in boundaries:
            last_step = schedule.num_burnin_steps + (draws - 1) * schedule.num_steps_bw_draws
            for group in groups:
                if not group.done and group.t <= last_step:
                    run.advance(group, last_step, keep=len(groups) > 1)
            if draws < boundaries[-1] and run.converged(draws):
                break
    done = replace(schedule, num_draws=draws)
    trace = ChainTrace.empty(hyper.num_chains, done)
    trace.engine = engine.name
    for g in groups:
        trace.record(g.start, g.losses[:, :done.num_steps].cpu().numpy(), g.mala[:, :done.num_mala].cpu().numpy(),
                     done, init_loss)
        trace.unmoved += [g.start + r for r in g.unmoved]
    trace.draws_target = schedule.num_draws
    if observers is not None:
        observers.blank_after(trace.diverged_at, done.first_draw_from)
        observers.values = trace.observed = {name: values[:, :draws] for name, values in observers.values.items()}
    return trace


class _Run:
    """The step loop over groups (``run_chains``'s state)."""

    def __init__(self, engine, state, groups, *, settings, schedule, seed, backend, device, init_loss, shared_batches,
                 on_step, control, size, observers=None):
        self.engine, self.state, self.groups = engine, state, groups
        self.settings, self.schedule, self.seed, self.backend, self.device = settings, schedule, seed, backend, device
        self.init_loss, self.shared_batches, self.on_step, self.control, self.size = (
            init_loss, shared_batches, on_step, control, size)
        self.observers = observers
        self.saved = self.save_error = None  # the last checkpoint written by this run; why the last write failed
        self.bound = divergence_bound(init_loss)
        self.bar = self.stop = None

    def converged(self, draws: int) -> bool:
        """Whether lambda_hat's MCSE over the first ``draws`` draws of every chain meets the target (for each
        component, when the rows sample components)."""
        from ..diagnostics.convergence import chain_diagnostics

        steps = list(self.schedule.draw_steps)[:draws]
        y = torch.cat([(g.hyper.nbeta.to(self.device)[:, None] * (g.losses[:, steps] - self.init_loss))
                       for g in self.groups]).cpu().numpy()
        parts = [g.hyper.component for g in self.groups]
        component = torch.cat(parts).numpy() if parts[0] is not None else np.zeros(y.shape[0], dtype=np.int64)
        c = self.control
        for k in np.unique(component):
            yk = y[component == k]
            yk = yk[np.isfinite(yk).all(axis=1)]
            if yk.shape[0] == 0:
                return False
            target = c.target_stderr if c.target_stderr is not None else c.target_rel_error * abs(float(yk.mean()))
            if not chain_diagnostics(yk)["mcse"] <= target:
                return False
        return True

    def save(self, live: "_Group | None", path=None) -> str | None:
        """Write the run to this rank's checkpoint file: its path, or None when the write failed (OSError: a full
        disk, ...), after a warning naming the file and the error; the last checkpoint written stays as it was
        (``self.saved``) and sampling goes on."""
        import warnings

        from . import checkpoint

        path = checkpoint.rank_path(path or self.control.checkpoint, self.control.rank, self.control.world)
        self.control.generation += 1  # counted even if the write fails: ranks keep the same generation per step
        payload = dict(self.control.meta, init_loss=self.init_loss, engine=self.engine.name, group_size=self.size,
                       rows=self.state.num_chains, generation=self.control.generation,
                       groups=[g.snapshot(self.state, g is live) for g in self.groups])
        if self.observers is not None:
            payload["observed"] = {name: values.copy() for name, values in self.observers.values.items()}
        try:
            checkpoint.write(path, payload, keep_previous=self.control.world > 1)
        except OSError as e:
            self.save_error = f"the checkpoint {path} could not be written ({e})"
            kept = f"the last one written, {self.saved}, is kept" if self.saved else \
                "no checkpoint of this run was written yet"
            warnings.warn(f"{self.save_error}; {kept}. Sampling goes on; free space there (or pass another "
                          "checkpoint path) for the next checkpoint to be written", checkpoint.CheckpointWriteWarning,
                          stacklevel=2)
            return None
        self.saved = str(path)
        return self.saved

    def advance(self, group: _Group, last_step: int, keep: bool) -> None:
        """Run ``group`` from its next step through ``last_step`` (or to its end), holding the state's rows."""
        G, state, schedule, device = group.size, self.state, self.schedule, self.device
        if group.rows is not None:
            state.load_rows(G, group.rows)
            group.rows = None
        elif group.t == 0:
            state.reset()
        stat = state.stat_rows(G)
        hyper = group.hyper
        step_args = dict(lr=hyper.lr.to(device), nbeta=hyper.nbeta.to(device), gamma=hyper.gamma.to(device),
                         settings=self.settings, seed=self.seed, chain_ids=hyper.chain_ids.to(device),
                         mask=state.row_masks(hyper.component) if hasattr(state, "row_masks") else state.flat_mask)
        streams, losses_by_step, bad = group.streams, group.losses, group.bad
        every = self.control.checkpoint_every if self.control.checkpoint else None
        prepared = None  # the group's update, checked and packed at its first step
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if group.rng is None:
                torch.manual_seed(derived_seed(self.seed, STREAM_CHAIN, int(hyper.chain_ids[0]), 2**32))  # dropout
            else:
                _set_rng_state(group.rng, device)
            for t in range(group.t, last_step + 1):
                shared = next(streams[0]) if self.shared_batches else None
                batches = [move_to_device(shared, device)] * G if self.shared_batches else \
                    [move_to_device(next(s), device) for s in streams]
                losses, grad = self.engine.loss_and_grad(G, batches)
                losses_by_step[:, t] = losses
                draw = schedule.draw_at(t) if self.observers is not None else None
                if draw is not None:
                    self.observers.record(group.start, draw, self.observers.measure(self.engine, G))
                last = t == schedule.num_steps - 1
                if (t + 1) % DIVERGENCE_CHECK_EVERY == 0 or last:  # one check of the steps since the last one
                    window = losses_by_step[:, group.checked:t + 1]
                    bad |= (~torch.isfinite(window) | ((window - self.init_loss).abs() > self.bound)).any(dim=1)
                    group.checked = t + 1
                    if bool(bad.all()):
                        self.bar.update(G * (schedule.num_steps - t))  # the steps the group will not take
                        group.done = True
                        break
                if self.on_step is not None:
                    self.on_step()
                self.bar.update(G)
                if last:
                    group.done = True
                    break
                k = schedule.mala_at(t)
                if k is not None:
                    w_old, grad_old = state.w[:G].clone(), (state.grad[:G] if grad is None else grad).clone()
                segments = state.segments(G, grad)
                if prepared is None:
                    prepared = self.backend.prepare_segments(segments, state.w_star, stat, **step_args)
                prepared.launch(schedule.counters(t), grads=[g for _, g, _, _ in segments])
                if k is not None:
                    group.mala[:, k] = _mala(self.engine, G, batches, w_old, grad_old, losses, state, stat,
                                             self.settings, schedule.counters(t), step_args)
                group.t = t + 1
                if every and group.t % every == 0:
                    self.save(group)
                if self.stopping():
                    self._interrupt(group)
            if group.done:
                group.t = schedule.num_steps
                group.unmoved = state.unmoved_rows(G)
            elif keep:
                group.rng, group.rows = _rng_state(device), state.save_rows(G)

    def stopping(self) -> bool:
        """Whether to stop at this step boundary: a signal arrived (on any rank of a shard group, whose ranks
        must stop at the same step; the FSDP engine's ``agree`` asks them every step)."""
        agree = getattr(self.engine, "agree", None)
        return agree(self.stop.requested) if agree is not None else self.stop.requested

    def _interrupt(self, group: _Group) -> None:
        import signal as _signal

        path = self.control.checkpoint or f"llc_fast_interrupted_{os.getpid()}.ckpt"
        fresh = self.save(group, path)
        written = fresh or self.saved  # a failed write leaves the last checkpoint written to resume from
        partial = replace(self.schedule, num_draws=max(1, self._draws_done()))
        trace = ChainTrace.empty(sum(g.size for g in self.groups), partial)
        trace.engine = self.engine.name
        for g in self.groups:
            trace.record(g.start, g.losses[:, :partial.num_steps].cpu().numpy(),
                         g.mala[:, :partial.num_mala].cpu().numpy(), partial, self.init_loss)
        if self.observers is not None:
            trace.observed = {n: v[:, :partial.num_draws] for n, v in self.observers.values.items()}
        name = _signal.Signals(self.stop.signum).name if self.stop.signum else "a signal to another rank"
        saved = f"the run is saved in {fresh}" if fresh else \
            f"{self.save_error}, so the run is saved only as far as its last checkpoint, {written}" if written else \
            f"{self.save_error}: there is no checkpoint to resume"
        resume = f": resume it with the same call plus resume={written!r} (llc-fast estimate: --resume {written})" \
            if written else ""
        raise SamplingInterrupted(
            f"sampling stopped by {name} after step {group.t - 1} of the group starting at chain {group.start}; "
            f"{saved}{resume}. The partial result is in this exception's .result.",
            written, trace, self.init_loss, self.stop.signum)

    def _draws_done(self) -> int:
        """Draws recorded by the least advanced group that has started (the partial result's width)."""
        started = [g for g in self.groups if g.t > 0 or g.done]
        if not started:
            return 0
        t = min(min(g.t, self.schedule.num_steps) for g in started)
        return len([s for s in self.schedule.draw_steps if s < t])


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
    mask = step_args["mask"]
    if isinstance(mask, RowMasks):
        mask = mask.dense(state.w.shape[1])
    return mala_log_acceptance(w_old, state.w[:G], g_old, g_new, u_old, u_new, step_args["lr"], precond, mask)


def control_for(config, rank: int = 0, world: int = 1, agree: Callable | None = None) -> RunControl:
    """The RunControl of an ``LLCConfig``: its checkpoint settings, the checkpoint it resumes (read and checked
    against the config) and its stopping target.

    agree: for ranks that must resume from the same step (an FSDP shard group), a function that takes this rank's
    available checkpoint generations and returns the one every rank of the group has (a rank killed between
    two ranks' writes leaves them one generation apart; each rank keeps its previous checkpoint for this)."""
    from . import checkpoint

    meta = dict(config=config.fingerprint(), world=world)
    resume = None
    if config.resume is not None:
        path = checkpoint.rank_path(config.resume, rank, world)
        candidates = checkpoint.read_generations(path)
        if agree is not None:
            chosen = agree(sorted(candidates))
            if chosen not in candidates:
                raise ValueError(f"the ranks' checkpoints {path} have no generation in common: they were not written "
                                 "by one run (or more than one save apart); start the run again")
            resume = candidates[chosen]
        else:
            resume = candidates[max(candidates)]
        checkpoint.check_same_config(resume, meta["config"], path)
        if resume.get("world", 1) != world:
            raise ValueError(f"checkpoint {path} was written by {resume.get('world', 1)} process(es); resume it with "
                             f"as many (now {world})")
    return RunControl(checkpoint=config.checkpoint, checkpoint_every=config.checkpoint_every, resume=resume, meta=meta,
                      target_stderr=config.target_stderr, target_rel_error=config.target_rel_error,
                      min_draws=config.num_draws, check_every=config.check_every, rank=rank, world=world,
                      generation=resume.get("generation", 0) if resume is not None else 0)


def sample_local(model, data, loss_fn, config, *, chains: list[int] | None = None,
                 on_step: Callable[[], None] | None = None, progress: bool | None = None,
                 control: RunControl | None = None, observers=None) -> ChainRun:
    """Run ``config``'s chain rows (or only the rows at ``chains``) in this process.

    config: an ``LLCConfig`` with nbeta resolved; control: its RunControl (default ``control_for(config)``);
    observers: evaluation sets measured at every draw (``observe.Observers``; ``trace.observed``).
    Returns the ChainRun of those rows, in that order.
    """
    control = control or control_for(config)
    resume = control.resume
    layout = FlatLayout.for_sampling(model)
    warn_model_randomness(model)
    device = torch.device(config.device) if config.device is not None else layout.device
    backend = select_backend(config.backend, device)
    settings, schedule = config.settings, config.schedule
    hyper = config.hyper if chains is None else config.hyper.rows(chains)
    rows, row_plan = plan_group_rows(config, hyper.num_chains, layout, device)
    if resume is not None:  # the layout of the run being continued
        rows = resume["rows"]
    initial_statistic, curvature_facts = settings.initial_statistic, {}
    if config.preconditioner is not None:  # a statistic fixed before sampling (chains.curvature)
        initial_statistic, curvature_facts = curvature_preconditioner(model, layout, data, loss_fn, config, device)
    state = FlatState(layout, rows, device=device, preconditioned=settings.preconditioned,
                      initial_statistic=initial_statistic, mask=config.mask,
                      components=None if config.components is None else [r for _, r in config.components])
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), state.isolation():
        engine, reason = local_engine(model, state, loss_fn, "sequential", None)
        if resume is None:
            init_loss = initial_loss(engine, data, seed=config.seed, num_batches=config.num_init_loss_batches,
                                     device=device)
        else:
            init_loss = resume["init_loss"]
        if observers is not None:
            observers.take_batches(device)
            if resume is None or "observed_w_star" not in resume:
                observers.measure_w_star(engine)
            else:
                observers.at_w_star = dict(resume["observed_w_star"])
            control.meta["observed_w_star"] = observers.at_w_star
        t_init = time.perf_counter()
        if hyper.num_chains:
            def probe_batches():
                streams = batch_streams(data, config.seed, hyper.chain_ids[:rows], False)
                return [move_to_device(next(s), device) for s in streams]

            batching = config.chain_batching if resume is None else resume["engine"]
            engine, reason = local_engine(model, state, loss_fn, batching, probe_batches,
                                          compile=config.compile_step)
            if config.compile_step and not getattr(engine, "compiled", False):
                import warnings

                warnings.warn("compile_step=True applies to chains batched in one vmapped pass; this run samples one "
                              "chain at a time" + (f" ({reason})" if reason else ""), RuntimeWarning, stacklevel=5)
            trace = run_chains(engine, state, data, hyper, settings=settings, schedule=schedule, seed=config.seed,
                               backend=backend, device=device, init_loss=init_loss,
                               shared_batches=config.shared_batches,
                               progress=config.progress if progress is None else progress, on_step=on_step,
                               control=control, observers=observers)
            trace.fallback_reason = reason
        else:
            trace = ChainTrace.empty(0, schedule)
            trace.engine = "none"
    t_end = time.perf_counter()
    facts = dict(device=str(device), backend=backend.name, engine=trace.engine, **model_facts(model, layout),
                 **curvature_facts)
    facts.update(row_facts(state.num_chains, row_plan, resume is not None, engine))
    if config.compile_step:
        facts["compiled"] = bool(getattr(engine, "compiled", False)) if hyper.num_chains else False
    return ChainRun(init_loss, trace, dict(init_loss_s=t_init - t0, sampling_s=t_end - t_init), facts)


def plan_group_rows(config, num_chains: int, layout: FlatLayout, device: torch.device) -> tuple[int, str]:
    """(chain rows per batched group, why), before sampling: one row for chain_batching="sequential", else up to
    max_batched_chains rows whose buffers fit batch_memory_bytes or half the device's free memory, on the CPU
    as on a GPU (``state.memory.plan_rows``)."""
    if config.chain_batching == "sequential":
        return 1, "1 row: chain_batching='sequential'"
    wanted = max(1, min(num_chains, config.max_batched_chains or num_chains))
    rows, why = plan_rows(wanted, layout.numel, layout.dtype, config.settings.preconditioned, device,
                          config.batch_memory_bytes)
    return rows, why + (f" (max_batched_chains={config.max_batched_chains})" if config.max_batched_chains else "")


def row_facts(rows: int, plan: str, resumed: bool, engine) -> dict:
    """What result.config says of the grouping: rows_per_group and row_plan (why that many); rows_per_pass too
    when a batched pass ran out of memory and the engine split the groups' passes."""
    plan = f"{rows} rows, as in the run resumed" if resumed else plan
    if not engine.batched and rows > 1:
        rows, plan = 1, f"1 row: the model could not be batched over chains (planned: {plan})"
    out = dict(rows_per_group=rows, row_plan=plan)
    if getattr(engine, "memory_note", ""):
        out.update(rows_per_pass=engine.rows_per_pass, row_plan=f"{out['row_plan']}; then {engine.memory_note}")
    return out


def model_facts(model, layout: FlatLayout) -> dict:
    """What is sampled: the number of sampled elements, their dtype, the parameters left frozen and the tied ones."""
    sampled = {id(p) for p in layout.params}
    return dict(num_params=layout.numel, param_dtype=str(layout.dtype).replace("torch.", ""),
                frozen_params=[n for n, p in model.named_parameters(remove_duplicate=False) if id(p) not in sampled],
                tied_params=dict(layout.aliases))


def warn_model_randomness(model) -> None:
    """Dropout active in train mode makes the loss random: say what that means for the estimate."""
    active = [name or type(m).__name__ for name, m in model.named_modules()
              if m.training and isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0]
    if active:
        import warnings

        warnings.warn(f"dropout is active (train mode) in {active[:3]}{'...' if len(active) > 3 else ''}: every "
                      "forward pass draws new dropout masks, so the chains sample the posterior of a randomised loss "
                      "and batched and one-at-a-time runs differ. Call model.eval() to estimate the LLC of the model "
                      "as it predicts", RuntimeWarning, stacklevel=5)


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
