"""The sampling loop: SGLD chains from w*, between the data, an engine, a chain state and the fused update.

``run_chains`` is the only loop, for one process and for FSDP shard groups alike. Rows run in row batches
of the state's rows; each step, the engine computes a row batch's losses and gradients (``engines.py``;
``llc_fast.distributed.engine`` for sharded models) and one fused call of the backend updates it
(``ChainState.segments``). Each chain reads its own batch stream keyed by its index, and its noise is keyed
by (seed, chain, step, element), so a chain's trace does not depend on the row batches, the engine or the
sharding (randomness inside the model, such as dropout, is the exception: it is drawn per row batch).

Set-up is ``setup.py``'s, checkpoints ``resume.py``'s, MALA and stopping targets ``diagnose.py``'s, Ctrl-C
``interrupt.py``'s.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from . import resume
from .data import STREAM_CHAIN, batch_streams, derived_seed, move_to_device
from .diagnose import mala_acceptance, target_met
from .interrupt import StopRequest, interruption
from .resume import CheckpointWriter, RunControl
from .schedule import ChainHyper, Schedule
from .settings import LoopSettings
from .trace import ChainTrace, divergence_bound

DIVERGENCE_CHECK_EVERY = 16  # steps between host checks for a diverged loss


class RowBatch:
    """B rows of the run that hold the state's rows 0..B-1 together, and how far they got."""

    def __init__(self, start: int, hyper: ChainHyper, streams: list, schedule: Schedule, device):
        B = hyper.num_rows
        self.start, self.hyper, self.streams = start, hyper, streams
        self.t, self.done, self.unmoved = 0, False, []
        self.checked = 0  # steps up to here are in ``bad``
        self.losses = torch.full((B, schedule.num_steps), math.nan, dtype=torch.float64, device=device)
        self.mala = torch.full((B, schedule.num_mala), math.nan, dtype=torch.float64, device=device)
        self.bad = torch.zeros(B, dtype=torch.bool, device=device)
        self.rng = None  # the model-randomness RNG state while the batch is not running
        self.rows = None  # the batch's state rows while another batch holds the state

    @property
    def size(self) -> int:
        return self.hyper.num_rows


def run_chains(engine, state, data, loop: LoopSettings, *, backend, device: torch.device, init_loss: float,
               progress: bool = False, on_step: Callable[[], None] | None = None,
               control: RunControl | None = None, observers=None) -> ChainTrace:
    """Run every row of ``loop.hyper`` from w*, in row batches of ``state.num_rows`` rows (one row for an
    unbatched engine), and return their trace. on_step: called after each step's forward pass (e.g. to stop
    when another rank failed). control: checkpoints, resume, a stopping target, signals (``RunControl``).
    observers: an ``observe.Observers`` with its batches taken and its values at w* measured; each draw's
    observables are recorded in it (``trace.observed``). Rows of ``hyper.component`` sample their component
    (``state.row_masks``); a stopping target must then be met by every component.

    Row batches run one after another; with a stopping target they take turns in rounds of ``check_every``
    draws (each one's rows and RNG put aside meanwhile), so every chain has the same number of draws when the
    MCSE is checked. A chain is the same whatever the rounds, checkpoints and resumes.
    """
    control = control or RunControl(stop_on_signal=False)
    hyper, schedule = loop.hyper, loop.schedule
    size = control.resume["group_size"] if control.resume is not None else state.num_rows if engine.batched else 1
    batches = [RowBatch(start, hyper.rows(slice(start, min(hyper.num_rows, start + size))),
                        batch_streams(data, loop.seed, hyper.chain_ids[start:start + size], loop.shared_batches),
                        schedule, device)
               for start in range(0, hyper.num_rows, size)]
    if observers is not None:
        observers.allocate(hyper.num_rows, schedule.num_draws)
    if control.resume is not None:
        resume.restore_run(control.resume, batches, observers, device)
    run = _Run(engine, state, batches, loop, backend=backend, device=device, init_loss=init_loss, on_step=on_step,
               control=control, size=size, observers=observers)
    boundaries = control.boundaries(schedule.num_draws)
    draws = boundaries[-1]
    with _progress_bar(hyper.num_rows * schedule.num_steps, progress) as run.bar, \
            StopRequest(control.stop_on_signal) as run.stop:
        run.bar.update(sum(b.size * min(b.t, schedule.num_steps) for b in batches))
        for draws in boundaries:
            last_step = schedule.num_burnin_steps + (draws - 1) * schedule.num_steps_bw_draws
            for batch in batches:
                if not batch.done and batch.t <= last_step:
                    run.advance(batch, last_step, keep=len(batches) > 1)
            if draws < boundaries[-1] and run.converged(draws):
                break
    return run.trace(draws, final=True)


class _Run:
    """The step loop over row batches (``run_chains``'s state)."""

    def __init__(self, engine, state, batches: list[RowBatch], loop: LoopSettings, *, backend, device, init_loss,
                 on_step, control: RunControl, size: int, observers=None):
        self.engine, self.state, self.batches, self.loop = engine, state, batches, loop
        self.schedule, self.backend, self.device = loop.schedule, backend, device
        self.init_loss, self.on_step, self.control, self.size = init_loss, on_step, control, size
        self.observers = observers
        self.writer = CheckpointWriter(control)
        self.bound = divergence_bound(init_loss)
        self.bar = self.stop = None

    def trace(self, draws: int, final: bool) -> ChainTrace:
        """The trace of every row's first ``draws`` draws; final: the run ended (not stopped by a signal)."""
        done = replace(self.schedule, num_draws=draws)
        trace = ChainTrace.empty(sum(b.size for b in self.batches), done)
        trace.engine = self.engine.name
        for b in self.batches:
            trace.record(b.start, b.losses[:, :done.num_steps].cpu().numpy(), b.mala[:, :done.num_mala].cpu().numpy(),
                         done, self.init_loss)
            if final:
                trace.unmoved += [b.start + r for r in b.unmoved]
        if final:
            trace.draws_target = self.schedule.num_draws
        if self.observers is not None:
            if final:
                self.observers.blank_after(trace.diverged_at, done.first_draw_from)
            trace.observed = {name: values[:, :draws] for name, values in self.observers.values.items()}
            if final:
                self.observers.values = trace.observed
        return trace

    def converged(self, draws: int) -> bool:
        """Whether lambda_hat's MCSE over the first ``draws`` draws of every chain meets the target (for each
        component, when the rows sample components)."""
        steps = list(self.schedule.draw_steps)[:draws]
        y = torch.cat([(b.hyper.nbeta.to(self.device)[:, None] * (b.losses[:, steps] - self.init_loss))
                       for b in self.batches]).cpu().numpy()
        parts = [b.hyper.component for b in self.batches]
        component = torch.cat(parts).numpy() if parts[0] is not None else np.zeros(y.shape[0], dtype=np.int64)
        return target_met(y, component, self.control)

    def save(self, live: RowBatch | None, path=None) -> str | None:
        """Write the run to this rank's checkpoint file (``resume.CheckpointWriter.write``)."""
        run = dict(init_loss=self.init_loss, engine=self.engine.name, group_size=self.size, rows=self.state.num_rows)
        return self.writer.write(run, self.batches, self.state, live, self.observers, path)

    def take_rows(self, batch: RowBatch) -> None:
        """Give the state's rows 0..B-1 to ``batch``: its rows put aside, or w* when it starts."""
        if batch.rows is not None:
            self.state.load_rows(batch.size, batch.rows)
            batch.rows = None
        elif batch.t == 0:
            self.state.reset()

    def step_args(self, hyper: ChainHyper) -> dict:
        """The fused update's per-row arguments of a row batch (``backend.prepare``)."""
        device = self.device
        args = dict(lr=hyper.lr.to(device), nbeta=hyper.nbeta.to(device), gamma=hyper.gamma.to(device),
                    settings=self.loop.update, seed=self.loop.seed, chain_ids=hyper.chain_ids.to(device),
                    mask=self.state.row_masks(hyper.component))
        if self.loop.update.thermostat:  # SGNHT: the rows' thermostats, kept in the state
            args["thermostat"] = self.state.thermostat_rows(hyper.num_rows)
        return args

    def batches_at(self, batch: RowBatch) -> list:
        """This step's data batch of each row (one shared batch when the rows share a stream)."""
        if self.loop.shared_batches:
            return [move_to_device(next(batch.streams[0]), self.device)] * batch.size
        return [move_to_device(next(s), self.device) for s in batch.streams]

    def diverged(self, batch: RowBatch, t: int) -> bool:
        """One check of the steps since the last one: whether every row of ``batch`` has diverged by step t."""
        window = batch.losses[:, batch.checked:t + 1]
        batch.bad |= (~torch.isfinite(window) | ((window - self.init_loss).abs() > self.bound)).any(dim=1)
        batch.checked = t + 1
        return bool(batch.bad.all())

    def advance(self, batch: RowBatch, last_step: int, keep: bool) -> None:
        """Run ``batch`` from its next step through ``last_step`` (or to its end), holding the state's rows;
        keep: put its rows and RNG aside afterwards (other row batches take turns)."""
        B, state, schedule, device = batch.size, self.state, self.schedule, self.device
        self.take_rows(batch)
        stat = state.stat_rows(B)
        step_args = self.step_args(batch.hyper)
        every = self.control.checkpoint_every if self.control.checkpoint else None
        prepared = None  # the batch's update, checked and packed at its first step
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if batch.rng is None:  # dropout
                torch.manual_seed(derived_seed(self.loop.seed, STREAM_CHAIN, int(batch.hyper.chain_ids[0]), 2**32))
            else:
                resume.set_rng_state(batch.rng, device)
            for t in range(batch.t, last_step + 1):
                batches = self.batches_at(batch)
                losses, grad = self.engine.loss_and_grad(B, batches)
                batch.losses[:, t] = losses
                draw = schedule.draw_at(t) if self.observers is not None else None
                if draw is not None:
                    self.observers.record(batch.start, draw, self.observers.measure(self.engine, B))
                last = t == schedule.num_steps - 1
                if ((t + 1) % DIVERGENCE_CHECK_EVERY == 0 or last) and self.diverged(batch, t):
                    self.bar.update(B * (schedule.num_steps - t))  # the steps the batch will not take
                    batch.done = True
                    break
                if self.on_step is not None:
                    self.on_step()
                self.bar.update(B)
                if last:
                    batch.done = True
                    break
                k = schedule.mala_at(t)
                if k is not None:
                    before = (state.w[:B].clone(), (state.grad[:B] if grad is None else grad).clone(), losses)
                segments = state.segments(B, grad)
                if prepared is None:  # a state with its own update per component prepares it (state.sparse)
                    prepare = getattr(state, "prepare_update", None)
                    prepared = self.backend.prepare(segments, state.w_star, stat, **step_args) if prepare is None \
                        else prepare(self.backend, segments, state.w_star, stat, **step_args)
                prepared.launch(schedule.counters(t), grads=[g for _, g, _, _ in segments])
                if k is not None:
                    batch.mala[:, k] = mala_acceptance(self.engine, B, batches, before, state, stat, self.loop.update,
                                                       schedule.counters(t), step_args)
                batch.t = t + 1
                if every and batch.t % every == 0:
                    self.save(batch)
                if self.stopping():
                    self.interrupt(batch)
            if batch.done:
                batch.t = schedule.num_steps
                batch.unmoved = state.unmoved_rows(B)
            elif keep:
                batch.rng, batch.rows = resume.rng_state(device), state.save_rows(B)

    def stopping(self) -> bool:
        """Whether to stop at this step boundary: a signal arrived (on any rank of a shard group, whose ranks
        must stop at the same step; the FSDP engine's ``agree`` asks them every step)."""
        agree = getattr(self.engine, "agree", None)
        return agree(self.stop.requested) if agree is not None else self.stop.requested

    def interrupt(self, batch: RowBatch) -> None:
        """Save the run and raise ``SamplingInterrupted`` with the partial trace."""
        path = self.control.checkpoint or f"llc_fast_interrupted_{os.getpid()}.ckpt"
        fresh = self.save(batch, path)
        written = fresh or self.writer.saved  # a failed write leaves the last checkpoint written to resume from
        raise interruption(self.stop.signum, fresh, written, self.writer.error, batch.t - 1, batch.start,
                           self.trace(max(1, self.draws_done()), final=False), self.init_loss)

    def draws_done(self) -> int:
        """Draws recorded by the least advanced row batch that has started (the partial result's width)."""
        started = [b for b in self.batches if b.t > 0 or b.done]
        if not started:
            return 0
        t = min(min(b.t, self.schedule.num_steps) for b in started)
        return len([s for s in self.schedule.draw_steps if s < t])


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
