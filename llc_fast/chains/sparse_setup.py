"""Setting up a restricted run on sparse rows (``state.sparse``, ``chains.sparse``): when it applies, the state, the
engine, one trial pass, then the shared set-up ``setup.run_on_state`` and the one loop ``runner.run_chains``.

``run_sparse`` returns (ChainRun, "") or (None, why not): ``setup.run_local`` then runs the full-row path. With
``sparse_rows="auto"`` a model the sparse engine cannot run (dropout or BatchNorm in train mode, a forward vmap
cannot batch) falls back with a warning saying why; with ``sparse_rows="on"`` it is refused with the fix.
"""
from __future__ import annotations

import warnings

import torch

from ..kernels.dispatch import select_backend
from ..state.flat import FlatLayout, FlatState
from ..state.sparse import SparseRowState
from .data import batch_streams, move_to_device
from .engines import SequentialEngine
from ..state.memory import AVAILABLE_FRACTION, available_bytes
from .resume import RunControl
from . import row_timing
from .row_timing import candidates, describe, peak_memory, timed, timing_facts, worth_measuring
from .settings import SetupSettings
from .sparse import SparseVmapEngine, model_refusal

SPARSE_ROWS = ("auto", "on", "off")
ROW_STORAGE = "row_storage"  # the checkpoint's record (control.meta) of how the rows were stored


class SparseRowsWarning(RuntimeWarning):
    """A restricted run falls back from sparse rows to full rows (the same chains, more memory and time)."""


def run_refusal(settings: SetupSettings, control: RunControl, observers) -> str | None:
    """Why the run's settings keep it on full rows (None: they allow sparse rows)."""
    comps, hyper = settings.components, settings.loop.hyper
    resumed = control.resume.get(ROW_STORAGE) if control.resume is not None else None
    reasons = [
        (comps is None, "the run samples no components"),
        (comps is not None and all(c is None for c in comps), "no component is restricted"),
        (settings.chain_batching == "sequential", "chain_batching='sequential'"),
        (observers is not None, "evaluation sets (eval_data=, refine=, observables) run on full rows"),
        (settings.curvature is not None, "preconditioner='curvature' runs on full rows"),
        (settings.loop.update.thermostat, "sampler='sgnht' runs on full rows"),
        (settings.loop.schedule.num_mala > 0, "mala_every= needs full rows"),
        (settings.compile_step, "compile_step=True runs on full rows"),
        (control.resume is not None and resumed != "sparse", "the run resumed was sampled on full rows"),
    ]
    for bad, why in reasons:
        if bad:
            return why
    return None if tiled_rows(hyper, len(comps)) else ("the rows are not every component x the same chains (each "
                                                       "component's rows holding the same chain ids in order)")


def tiled_rows(hyper, num_components: int) -> bool:
    """Whether ``hyper``'s rows are every component x the same C >= 1 chains: row k·C + j of component k, with the
    chain id of row j for every k (0..C-1 in one process; a subset, e.g. chains 1 and 3, on a rank of a torchrun
    run split by chains, ``distributed.rows``). That is all sparse rows need: a row's batches and noise are keyed
    by its chain id, and row k·C + j reads chain j's batch (``chains.sparse``)."""
    K = num_components
    C = hyper.num_rows // K
    ids = hyper.chain_ids
    return (C >= 1 and hyper.num_rows == C * K and hyper.component is not None
            and torch.equal(hyper.component, torch.arange(K).repeat_interleave(C))
            and torch.equal(ids, ids[:C].repeat(K)))


def first_batches(state: SparseRowState, data, settings: SetupSettings, device) -> list:
    """Every row's first batch (row k·C + j reads chain j's)."""
    streams = batch_streams(data, settings.loop.seed, settings.loop.hyper.chain_ids, False)
    batches = [move_to_device(next(s), device) for s in streams[:state.chains]]
    return batches * len(state.components)


def probe(engine: SparseVmapEngine, state: SparseRowState, data, settings: SetupSettings, device) -> str | None:
    """One trial call per component group, of its first component, on the chains' first batches (buffers and RNG
    isolated): None, or why it failed. The calls of a group differ only in which coordinates their rows hold, so
    one per group tries every code path; a whole pass (one sampler step of every row) cost as much as a step."""
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), state.isolation():
            engine.loss_and_grad(state.num_rows, first_batches(state, data, settings, device), first_only=True)
    except Exception as e:  # any failure means: run this model on full rows
        return f"the nested vmap failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def plan_calls(engine: SparseVmapEngine, state: SparseRowState, settings: SetupSettings, device) -> str:
    """Set ``engine.per_call``: each component group's components per vmapped call, as many as fit the budget
    (batch_memory_bytes, else ``AVAILABLE_FRACTION`` of the free memory) at ``call_bytes_per_row`` per row and
    ``max_batched_chains`` rows; at least one component (C rows). Returns the plan's sentence."""
    C, cap = state.chains, settings.max_batched_chains
    budget, source = settings.batch_memory_bytes, f"batch_memory_bytes={settings.batch_memory_bytes}"
    if budget is None:
        free, name = available_bytes(device)
        budget = None if free is None else int(free * AVAILABLE_FRACTION)
        source = f"{AVAILABLE_FRACTION:.0%} of the {name}" if free is not None else f"the {name} (unread)"
    per_call = []
    for group in engine.groups:
        fit = len(group.ks) if budget is None else budget // (C * group.call_bytes_per_row())
        per_call.append(max(1, min(len(group.ks), fit, cap // C if cap else fit)))
    engine.per_call = per_call
    most = max(per_call, default=1) * C
    split = any(p < len(g.ks) for p, g in zip(per_call, engine.groups))
    return (f"{state.num_rows} rows, each holding its component's coordinates (sparse rows), in calls of at most "
            f"{most} rows per component group ({'split to fit' if split else 'one call per group fits'} {source}"
            + (f", max_batched_chains={cap}" if cap else "") + ")")


def measure_calls(engine: SparseVmapEngine, state: SparseRowState, data, settings: SetupSettings,
                  device) -> tuple[int, dict]:
    """The fastest components per call (at most the planned ``engine.per_call``), from timed trial steps on the
    chains' first batches (no chain state advanced); sets ``engine.per_call``. (rows per call, {rows: s/row})."""
    C, fit = state.chains, list(engine.per_call)
    sizes = candidates(max(fit, default=1))
    if len(sizes) == 1:
        return sizes[0] * C, {}

    def trial(size: int) -> float:
        engine.per_call = [min(f, size) for f in fit]
        return timed(lambda: engine.loss_and_grad(state.num_rows, batches), device)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), state.isolation():
        batches = first_batches(state, data, settings, device)
        choice, per_row = row_timing.fastest(sizes, trial, rows_timed=lambda s: state.num_rows)
    engine.per_call = [min(f, choice) for f in fit]
    return choice * C, {s * C: t for s, t in per_row.items()}


def sparse_state(model, layout: FlatLayout, settings: SetupSettings, device) -> SparseRowState:
    comps = list(settings.components)
    return SparseRowState(layout, comps, settings.loop.hyper.num_rows // len(comps), device=device,
                          preconditioned=settings.loop.update.preconditioned,
                          initial_statistic=settings.loop.update.initial_statistic)


def refused(mode: str, why: str, warn: bool):
    """(None, why) for the full-row path; raises for sparse_rows='on', warns for a model's reason."""
    if mode == "on":
        raise ValueError(f"sparse_rows='on' cannot run this restricted run: {why}. Fix that, or pass "
                         "sparse_rows='auto' (full rows where sparse rows do not apply) or 'off'")
    if warn:
        warnings.warn(f"restricted run on full rows instead of sparse rows: {why} (the same chains, each row "
                      "holding the whole model)", SparseRowsWarning, stacklevel=5)
    return None, why


def run_sparse(model, data, loss_fn, settings: SetupSettings, *, control: RunControl, on_step=None,
               observers=None) -> tuple:
    """(ChainRun, "") of ``settings``'s rows on sparse rows, or (None, why not) (module docstring)."""
    from .setup import model_facts, run_on_state  # setup imports this module

    mode = settings.sparse_rows
    if mode not in SPARSE_ROWS:
        raise ValueError(f"sparse_rows must be one of {SPARSE_ROWS}, got {mode!r}")
    resumed = control.resume.get(ROW_STORAGE) if control.resume is not None else None
    if mode == "off":
        if resumed == "sparse":
            raise ValueError("the run resumed was sampled on sparse rows: resume it with sparse_rows='auto'")
        return None, "sparse_rows='off'"
    why = run_refusal(settings, control, observers)
    if why is not None:
        return refused(mode, why, warn=False)
    why = model_refusal(model)
    if why is not None:
        return refused(mode, why, warn=False)
    layout = FlatLayout.for_sampling(model)
    device = torch.device(settings.device) if settings.device is not None else layout.device
    state = sparse_state(model, layout, settings, device)
    engine = SparseVmapEngine(model, state, loss_fn)
    plan = plan_calls(engine, state, settings, device)
    why = probe(engine, state, data, settings, device)
    if why is not None:
        return refused(mode, why, warn=True)
    timing = {}
    if worth_measuring(settings):
        choice, per_row = measure_calls(engine, state, data, settings, device)
        if per_row:
            plan, timing = f"{plan}; {describe(choice, per_row)}", timing_facts(choice, per_row)
    backend = select_backend(settings.backend, device, settings.loop.update.sampler, settings.loop.update.noise_scheme)
    at_w_star = SequentialEngine(model, FlatState(layout, 1, device=device, preconditioned=False), loss_fn)
    control.meta[ROW_STORAGE] = "sparse"
    run, _ = run_on_state(state, at_w_star, data, settings, backend=backend, device=device, control=control,
                          sampling_engine=lambda: (engine, ""), observers=None, on_step=on_step)
    run.facts = dict(device=str(device), backend=backend.name, engine=run.trace.engine, **model_facts(model, layout))
    run.facts.update(rows_per_group=state.num_rows, row_plan=plan,
                     rows_per_call=max(engine.per_call, default=1) * state.chains)
    run.facts.update(timing)
    run.facts.update(peak_memory(device))
    run.facts.update(row_storage_facts(state.bytes_per_row(), layout, settings, "sparse"))
    return run, ""


def row_storage_facts(per_row: list[int], layout: FlatLayout, settings: SetupSettings, storage: str,
                      why: str = "") -> dict:
    """What a restricted run's result says of its rows: row_storage ("sparse" or "full"), the reason for full rows,
    state_bytes_per_row (each component's row: weights, gradient and RMSProp statistic) and full_row_bytes."""
    item = torch.empty(0, dtype=layout.dtype).element_size()
    stat = (4 if layout.dtype != torch.float64 else 8) if settings.loop.update.preconditioned else 0
    out = dict(row_storage=storage, state_bytes_per_row=list(per_row), full_row_bytes=layout.numel * (2 * item + stat))
    if why:
        out["row_storage_note"] = why
    return out
