"""Setting up a run: L(w*), the set-up every sampler shares (``run_on_state``), and the one-process sampler
(``run_local``: layout, flat state, engine). The FSDP sampler (``llc_fast.distributed.sharded``) builds its
own state and engine and calls ``run_on_state`` too.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..kernels.dispatch import select_backend
from ..state.flat import FlatLayout, FlatState
from ..state.memory import plan_rows
from ..state.protocol import ChainState
from .curvature import curvature_preconditioner
from .data import STREAM_INIT_LOSS, BatchStream, batch_streams, batches_in_first_pass, move_to_device
from .engines import checked_finite, local_engine
from .resume import RunControl
from .row_timing import describe, measure_full, peak_memory, timing_facts, worth_measuring
from .runner import run_chains
from .settings import SetupSettings
from .trace import ChainTrace


@dataclass
class ChainRun:
    """What sampling produced: L(w*), the chains' trace, clocks (init_loss_s, sampling_s) and the facts
    of the run recorded in the result's config (device, backend, engine, sizes)."""

    init_loss: float
    trace: ChainTrace
    timing: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)
    report: bool = True  # this process reports warnings (rank 0 under torchrun)


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


def run_on_state(state: ChainState, engine, data, settings: SetupSettings, *, backend, device: torch.device,
                 control: RunControl, sampling_engine: Callable[[], tuple] | None = None, observers=None,
                 on_step: Callable[[], None] | None = None) -> tuple[ChainRun, object]:
    """The set-up every sampler shares, around the loop: L(w*) through ``engine`` (or the resumed run's), the
    evaluation sets at w*, then ``run_chains`` on ``settings.loop``'s rows, with the model's buffers and RNG
    isolated and the model holding w* afterwards (``state.restore``).

    sampling_engine: () -> (engine, fallback reason), the engine to sample with (default: ``engine``).
    Returns (the ChainRun, with timing and no facts yet; the engine that sampled)."""
    rows = settings.loop.hyper.num_rows
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), state.isolation():
            resume = control.resume
            init_loss = initial_loss(engine, data, seed=settings.loop.seed, device=device,
                                     num_batches=settings.num_init_loss_batches) if resume is None \
                else resume["init_loss"]
            if observers is not None:
                _observe_w_star(observers, engine, control, device)
            t_init = time.perf_counter()
            if rows:
                engine, reason = sampling_engine() if sampling_engine is not None else (engine, "")
                trace = run_chains(engine, state, data, settings.loop, backend=backend, device=device,
                                   init_loss=init_loss, progress=settings.progress, on_step=on_step,
                                   control=control, observers=observers)
                trace.fallback_reason = reason
            else:
                trace = ChainTrace.empty(0, settings.loop.schedule)
                trace.engine = "none"
    finally:
        state.restore()  # the model's parameters hold w* again, bitwise
    timing = dict(init_loss_s=t_init - t0, sampling_s=time.perf_counter() - t_init)
    return ChainRun(init_loss, trace, timing), engine


def _observe_w_star(observers, engine, control: RunControl, device) -> None:
    """The evaluation sets' batches taken and their values at w* measured (or the resumed run's)."""
    observers.take_batches(device)
    if control.resume is None or "observed_w_star" not in control.resume:
        observers.measure_w_star(engine)
    else:
        observers.at_w_star = dict(control.resume["observed_w_star"])
    control.meta["observed_w_star"] = observers.at_w_star


def run_local(model, data, loss_fn, settings: SetupSettings, *, control: RunControl | None = None,
              on_step: Callable[[], None] | None = None, observers=None) -> ChainRun:
    """Run ``settings.loop.hyper``'s rows in this process: flat state of row batches planned to fit memory, a
    batched engine where the model allows. control: checkpoints, resume, target (default: none); observers:
    evaluation sets measured at every draw (``observe.Observers``; ``trace.observed``)."""
    control = control or RunControl()
    sparse_note = ""
    if settings.components is not None:  # restricted rows hold only their coordinates where that applies
        from .sparse_setup import run_sparse

        run, sparse_note = run_sparse(model, data, loss_fn, settings, control=control, on_step=on_step,
                                      observers=observers)
        if run is not None:
            return run
    resume = control.resume
    layout = FlatLayout.for_sampling(model)
    warn_model_randomness(model)
    device = torch.device(settings.device) if settings.device is not None else layout.device
    hyper, update = settings.loop.hyper, settings.loop.update
    backend = select_backend(settings.backend, device, update.sampler, update.noise_scheme)
    rows, row_plan = plan_batch_rows(settings, hyper.num_rows, layout, device)
    if resume is not None:  # the layout of the run being continued
        rows = resume["rows"]
    initial_statistic, curvature_facts = update.initial_statistic, {}
    if settings.curvature is not None:  # a statistic fixed before sampling (chains.curvature)
        initial_statistic, curvature_facts = curvature_preconditioner(model, layout, data, loss_fn,
                                                                      settings.curvature, device)
    state = FlatState(layout, rows, device=device, preconditioned=update.has_statistic,
                      initial_statistic=initial_statistic, mask=settings.mask,
                      thermostat=update.sgnht_diffusion if update.thermostat else None,
                      components=None if settings.components is None else list(settings.components))

    measured: dict = {}  # the measured rows per call (chains.row_timing)

    def sampling_engine():
        def probe_batches():
            streams = batch_streams(data, settings.loop.seed, hyper.chain_ids[:rows], False)
            return [move_to_device(next(s), device) for s in streams]

        batching = settings.chain_batching if resume is None else resume["engine"]
        engine, reason = local_engine(model, state, loss_fn, batching, probe_batches, compile=settings.compile_step)
        if worth_measuring(settings) and engine.batched and rows > 1:
            measured.update(measured_rows(engine, probe_batches(), device, rows))
        if settings.compile_step and not getattr(engine, "compiled", False):
            warnings.warn("compile_step=True applies to chains batched in one vmapped pass; this run samples one "
                          "chain at a time" + (f" ({reason})" if reason else ""), RuntimeWarning, stacklevel=8)
        return engine, reason

    run, engine = run_on_state(state, local_engine(model, state, loss_fn, "sequential", None)[0], data, settings,
                               backend=backend, device=device, control=control, sampling_engine=sampling_engine,
                               observers=observers, on_step=on_step)
    run.facts = dict(device=str(device), backend=backend.name, engine=run.trace.engine, **model_facts(model, layout),
                     **curvature_facts)
    run.facts.update(row_facts(state.num_rows, row_plan, resume is not None, engine, measured))
    run.facts.update(peak_memory(device))
    if settings.compile_step:
        run.facts["compiled"] = bool(getattr(engine, "compiled", False)) if hyper.num_rows else False
    if settings.components is not None:
        from .sparse_setup import row_storage_facts

        full = row_storage_facts([], layout, settings, "full", sparse_note)
        run.facts.update(full, state_bytes_per_row=[full["full_row_bytes"]] * len(settings.components))
    return run


def plan_batch_rows(settings: SetupSettings, num_rows: int, layout: FlatLayout,
                    device: torch.device) -> tuple[int, str]:
    """(rows per row batch, why), before sampling: one row for chain_batching="sequential", else up to
    max_batched_chains rows whose buffers fit batch_memory_bytes or half the device's free memory, on the CPU
    as on a GPU (``state.memory.plan_rows``)."""
    if settings.chain_batching == "sequential":
        return 1, "1 row: chain_batching='sequential'"
    most = settings.max_batched_chains
    wanted = max(1, min(num_rows, most or num_rows))
    rows, why = plan_rows(wanted, layout.numel, layout.dtype, settings.loop.update.has_statistic, device,
                          settings.batch_memory_bytes)
    return rows, why + (f" (max_batched_chains={most})" if most else "")


def measured_rows(engine, batches: list, device, rows: int) -> dict:
    """The measured rows per vmapped call (``row_timing.measure_full``) as facts, with the plan's sentence."""
    choice, per_row = measure_full(engine, batches, device, rows)
    return dict(timing_facts(choice, per_row), note=describe(choice, per_row)) if per_row else {}


def row_facts(rows: int, plan: str, resumed: bool, engine, measured: dict | None = None) -> dict:
    """What result.config says of the row batches: rows_per_group and row_plan (why that many); rows_per_call and
    row_times_s where the rows per call were measured (``row_timing``); rows_per_pass too when a batched pass ran
    out of memory and the engine split the row batches' passes."""
    plan = f"{rows} rows, as in the run resumed" if resumed else plan
    if not engine.batched and rows > 1:
        rows, plan = 1, f"1 row: the model could not be batched over chains (planned: {plan})"
    measured = dict(measured or {}) if engine.batched else {}
    if measured:
        plan = f"{plan}; {measured.pop('note')}"
    out = dict(rows_per_group=rows, row_plan=plan, **measured)
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
        warnings.warn(f"dropout is active (train mode) in {active[:3]}{'...' if len(active) > 3 else ''}: every "
                      "forward pass draws new dropout masks, so the chains sample the posterior of a randomised loss "
                      "and batched and one-at-a-time runs differ. Call model.eval() to estimate the LLC of the model "
                      "as it predicts", RuntimeWarning, stacklevel=6)
