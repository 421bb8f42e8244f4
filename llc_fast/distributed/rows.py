"""Restricted, refined and susceptibility runs under torchrun: the run's chain rows split over the ranks.

A run of K components x C chains (row k*C + j: component k, chain j; K = 1 without components) or a run with
evaluation sets (eval_data=, refine=, observables) samples whole models: shard groups of one rank, every rank
holds w* and runs some of the rows, the W ranks at once.

* K >= W components: component k runs on rank k mod W, with every chain (a rank's rows are its components x
  all chains, so sparse rows apply as in one process: ``chains.sparse_setup``);
* else (fewer components than ranks, or none): chain j runs on rank j mod W, for every component (a rank's
  rows are all components x its chains, the same chain ids for each, so sparse rows apply there too).

Each rank runs its rows with the one-process sampler (``estimators.sampling.sample_local``: row batches planned
to the memory, sparse rows where they apply, the one loop ``chains.runner.run_chains``), then the rows' traces
and observed evaluation-set values are all-gathered inside the failure guard (``failure.py``: a failing rank
stops every rank with an error naming it; nothing waits without a bound), and **every rank** returns the same
result. A chain's batches and noise are keyed by (seed, chain, step, element), so a row is the same chain on
whichever rank runs it: the traces equal one process's bit for bit where a rank computes each row as one
process does (chain_batching="sequential"), else to the float rounding of a batched pass over other rows.

Checkpoints: every rank writes its own rows to ``<checkpoint>.rank<r>-of-<W>`` (as full-model runs do) and
resumes from it, with the same number of processes (another number is refused, naming both). Not supported
here yet (refused before any work): shard groups of several ranks (FSDP: pass shard_group_size=1) and drawing
until a stopping target (every rank would stop at its own draw count).
"""
from __future__ import annotations

import time

import torch.distributed as dist

from ..chains.interrupt import SamplingInterrupted
from ..chains.setup import ChainRun
from ..chains.trace import ChainTrace
from ..estimators.sampling import control_for, sample_local
from ..state.flat import FlatLayout
from ..state.sharded import is_dtensor
from . import mesh as _mesh
from .failure import failure_guard
from .sharded import resolve_device

WHAT = "a restricted, refined or susceptibility run (components or evaluation sets)"


def row_split(num_components: int | None, num_chains: int, world: int) -> tuple[str, list[list[int]]]:
    """("components", the components of each rank) when there are at least ``world`` components, else ("chains",
    the chain indices of each rank); round-robin (module docstring)."""
    if num_components is not None and num_components >= world:
        return "components", _mesh.chain_assignment(num_components, world)
    return "chains", _mesh.chain_assignment(num_chains, world)


def rank_rows(how: str, mine: list[int], num_components: int | None, num_chains: int) -> list[int]:
    """The global row positions (k*C + j) of a rank's ``mine`` (its components or chains, ``row_split``)."""
    K, C = num_components or 1, num_chains
    if how == "components":
        return [k * C + j for k in mine for j in range(C)]
    return [k * C + j for k in range(K) for j in mine]


def check_rows_run(model, config) -> None:
    """Refuse, before any work, what a row-split run cannot do yet (module docstring), saying what works."""
    if config.shard_group_size not in (None, 1):
        raise NotImplementedError(
            f"{WHAT} under torchrun splits its chain rows over the ranks, each holding the whole model: "
            f"shard_group_size={config.shard_group_size} (the model sharded with FSDP) is not supported for it yet. "
            "Pass shard_group_size=1 (or leave it out), or launch without torchrun")
    if any(is_dtensor(p) for p in FlatLayout.for_sampling(model).params):
        raise NotImplementedError(
            f"{WHAT} under torchrun splits its chain rows over the ranks, each holding the whole model: this model "
            "is sharded (fully_shard / DTensor parameters). Pass it unsharded (shard_group_size=1)")
    if config.targeted:
        raise NotImplementedError(
            f"{WHAT} under torchrun cannot draw until a stopping target yet (target_stderr / target_rel_error): "
            "every rank would stop its own rows at its own draw count. Pass num_draws alone, or launch without "
            "torchrun")


def sample_rows(model, data, loss_fn, config, observers=None) -> ChainRun:
    """The rows of ``config`` (an ``LLCConfig`` with nbeta resolved) split over the process group's ranks; the same
    ChainRun on every rank (rank 0 reports). observers: evaluation sets (``chains.observe.Observers``): each rank
    measures its rows; afterwards ``observers.values`` holds every row's, ``at_w_star`` rank 0's."""
    check_rows_run(model, config)
    with failure_guard(grace_s=config.failure_grace_s) as guard:
        return _sample(model, data, loss_fn, config, observers, guard)


def _sample(model, data, loss_fn, config, observers, guard) -> ChainRun:
    world, rank = _mesh.world_size(), _mesh.rank()
    device = resolve_device(config.device, FlatLayout.for_sampling(model))
    K = None if config.components is None else len(config.components)
    how, split = row_split(K, config.num_chains, world)
    mine = split[rank]
    rows = rank_rows(how, mine, K, config.num_chains)
    t0 = time.perf_counter()
    run = None
    if rows:  # a rank without rows (fewer chains than ranks) only joins the gather
        control = control_for(config, rank=rank, world=world)
        local = config.replace(device=device)
        if how == "components":  # its components, every chain: the rows tile them as one process's do
            local = local.replace(components=tuple(config.components[k] for k in mine))
        try:
            run = sample_local(model, data, loss_fn, local, chains=None if how == "components" else rows,
                               on_step=guard.check, progress=config.progress and rank == 0, control=control,
                               observers=observers)
        except SamplingInterrupted as e:  # this rank's rows only: the checkpoints hold the run to resume
            e.trace = None
            raise
    t_sampled = time.perf_counter()
    payloads: list = [None] * world
    dist.all_gather_object(payloads, None if run is None else dict(
        rows=rows, mine=mine, trace=run.trace, init_loss=run.init_loss, facts=run.facts, timing=run.timing,
        at_w_star=None if observers is None else observers.at_w_star))
    t_end = time.perf_counter()
    return _gathered(payloads, config, observers, how, run, dict(t0=t0, sampled=t_sampled, end=t_end), world, rank)


def _gathered(payloads: list, config, observers, how: str, run, clock: dict, world: int, rank: int) -> ChainRun:
    """The one ChainRun of every rank's rows (``payloads``, in rank order; rank 0 always has rows)."""
    ran = [p for p in payloads if p is not None]
    first = ran[0]
    trace = ChainTrace.gather([(p["rows"], p["trace"]) for p in ran], config.num_rows, config.schedule)
    trace.draws_target = config.schedule.num_draws
    if observers is not None:
        observers.values, observers.at_w_star = trace.observed, dict(first["at_w_star"])
    facts = dict(first["facts"])
    if how == "components" and "state_bytes_per_row" in facts:  # per component, from the rank that ran it
        per = [0] * len(config.components)
        for p in ran:
            for k, size in zip(p["mine"], p["facts"]["state_bytes_per_row"]):
                per[k] = size
        facts["state_bytes_per_row"] = per
    init_s = (run or ChainRun(0.0, trace, first["timing"])).timing["init_loss_s"]
    timing = dict(init_loss_s=init_s, sampling_s=clock["end"] - clock["t0"] - init_s,
                  rank_sampling_s=clock["sampled"] - clock["t0"] - init_s)
    facts.update(world_size=world, shard_group_size=1, num_chain_groups=world, row_split=how,
                 distributed_backend=str(dist.get_backend()))
    return ChainRun(first["init_loss"], trace, timing, facts, report=rank == 0)
