"""From an ``LLCConfig`` to the chains layer's plain settings, and the one-process sampler of a config.

The chains layer never reads the config: ``setup_settings`` and ``control_for`` turn it into values
(``chains.settings.SetupSettings``, ``chains.resume.RunControl``) and ``sample_local`` runs them
(``chains.setup.run_local``).
"""
from __future__ import annotations

from collections.abc import Callable

from ..chains.resume import RunControl, read_resume
from ..chains.settings import CurvatureSpec, LoopSettings, SetupSettings
from ..chains.setup import ChainRun, run_local


def curvature_spec(config) -> CurvatureSpec | None:
    """The curvature preconditioner of ``config`` (nbeta resolved), or None when it has none."""
    if config.preconditioner is None:
        return None
    restrictions = [r for _, r in config.components] if config.components is not None else [config.mask]
    return CurvatureSpec(seed=config.seed, samples=config.preconditioner_samples,
                         max_gain=config.preconditioner_max_gain, nbeta=config.nbeta, gamma=config.gamma,
                         restrictions=tuple(restrictions))


def setup_settings(config) -> SetupSettings:
    """The plain settings of ``config`` (an ``LLCConfig`` with nbeta resolved), every row of ``config.hyper``."""
    loop = LoopSettings(hyper=config.hyper, update=config.settings, schedule=config.schedule, seed=config.seed,
                        shared_batches=config.shared_batches)
    return SetupSettings(loop, num_init_loss_batches=config.num_init_loss_batches, backend=config.backend,
                         device=config.device, progress=config.progress, mask=config.mask,
                         components=None if config.components is None else tuple(r for _, r in config.components),
                         chain_batching=config.chain_batching, max_batched_chains=config.max_batched_chains,
                         batch_memory_bytes=config.batch_memory_bytes, compile_step=config.compile_step,
                         curvature=curvature_spec(config), sparse_rows=config.sparse_rows,
                         row_batching=config.row_batching)


def control_for(config, rank: int = 0, world: int = 1, agree: Callable | None = None) -> RunControl:
    """The RunControl of an ``LLCConfig``: its checkpoint settings, the checkpoint it resumes (read and checked
    against the config, ``chains.resume.read_resume``; agree: see there) and its stopping target."""
    meta = dict(config=config.fingerprint(), world=world)
    resume = None
    if config.resume is not None:
        resume = read_resume(config.resume, meta["config"], rank, world, agree)
    return RunControl(checkpoint=config.checkpoint, checkpoint_every=config.checkpoint_every, resume=resume, meta=meta,
                      target_stderr=config.target_stderr, target_rel_error=config.target_rel_error,
                      min_draws=config.num_draws, check_every=config.check_every, rank=rank, world=world,
                      generation=resume.get("generation", 0) if resume is not None else 0)


def sample_local(model, data, loss_fn, config, *, chains: list[int] | None = None,
                 on_step: Callable[[], None] | None = None, progress: bool | None = None,
                 control: RunControl | None = None, observers=None) -> ChainRun:
    """Run ``config``'s chain rows (or only the rows at ``chains``) in this process.

    config: an ``LLCConfig`` with nbeta resolved; control: its RunControl (default ``control_for(config)``);
    observers: evaluation sets measured at every draw (``chains.observe.Observers``; ``trace.observed``).
    Returns the ChainRun of those rows, in that order.
    """
    control = control or control_for(config)
    settings = setup_settings(config)
    if chains is not None:
        settings = settings.for_rows(chains)
    if progress is not None:
        settings = settings.replace(progress=progress)
    return run_local(model, data, loss_fn, settings, control=control, on_step=on_step,
                     observers=observers)
