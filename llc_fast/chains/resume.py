"""Checkpoint and resume of a run of the loop: what may stop or continue it (``RunControl``), the snapshot of a
row batch, and the writer of this rank's checkpoint file (the file format is ``checkpoint.py``'s).

A payload holds the run (``meta``: its config fingerprint, the world size; L(w*), the engine, the rows per
batch under the key ``group_size`` and the state's rows) and one snapshot per row batch under ``groups``.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import checkpoint


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


def read_resume(path, fingerprint: dict, rank: int = 0, world: int = 1, agree: Callable | None = None) -> dict:
    """The checkpoint payload this rank resumes from ``path``, checked against the run's ``fingerprint``.

    agree: for ranks that must resume from the same step (an FSDP shard group), a function that takes this rank's
    available checkpoint generations and returns the one every rank of the group has (a rank killed between
    two ranks' writes leaves them one generation apart; each rank keeps its previous checkpoint for this)."""
    checkpoint.check_world(path, rank, world)
    path = checkpoint.rank_path(path, rank, world)
    candidates = checkpoint.read_generations(path)
    if agree is not None:
        chosen = agree(sorted(candidates))
        if chosen not in candidates:
            raise ValueError(f"the ranks' checkpoints {path} have no generation in common: they were not written "
                             "by one run (or more than one save apart); start the run again")
        resume = candidates[chosen]
    else:
        resume = candidates[max(candidates)]
    checkpoint.check_same_config(resume, fingerprint, path)
    if resume.get("world", 1) != world:
        raise ValueError(f"checkpoint {path} was written by {resume.get('world', 1)} process(es); resume it with "
                         f"as many (now {world})")
    return resume


def rng_state(device) -> dict:
    """The RNG state that drives randomness inside the model (dropout): CPU, and the device's on CUDA."""
    return dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(rng: dict, device) -> None:
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)


def snapshot(batch, state, live: bool) -> dict:
    """A row batch (``runner.RowBatch``) as a checkpoint stores it; live: it holds the state's rows now."""
    distinct = {id(s): s for s in batch.streams}
    return dict(start=batch.start, size=batch.size, t=batch.t, checked=batch.checked, done=batch.done,
                unmoved=list(batch.unmoved),
                losses=batch.losses.cpu(), mala=batch.mala.cpu(), bad=batch.bad.cpu(),
                rng=rng_state(batch.bad.device) if live else batch.rng,
                rows=state.save_rows(batch.size) if live and not batch.done else batch.rows,
                streams=[s.position for s in distinct.values()])


def restore(batch, snap: dict, device) -> None:
    """Put a row batch back as ``snapshot`` stored it (its rows and RNG wait in it until it runs)."""
    batch.t, batch.done, batch.unmoved, batch.checked = snap["t"], snap["done"], list(snap["unmoved"]), snap["checked"]
    batch.losses.copy_(snap["losses"].to(device))
    batch.mala.copy_(snap["mala"].to(device))
    batch.bad.copy_(snap["bad"].to(device))
    batch.rng, batch.rows = snap["rng"], snap["rows"]
    for stream, position in zip({id(s): s for s in batch.streams}.values(), snap["streams"]):
        stream.seek(tuple(position))


def restore_run(resume: dict, batches: list, observers, device) -> None:
    """Every row batch, and the observed values, as the checkpoint ``resume`` holds them."""
    for batch, snap in zip(batches, resume["groups"]):
        restore(batch, snap, device)
    for name, values in resume.get("observed", {}).items():
        observers.values[name][...] = values


class CheckpointWriter:
    """Writes a run to this rank's checkpoint file; remembers the last file written (``saved``) and why the last
    write failed (``error``)."""

    def __init__(self, control: RunControl):
        self.control, self.saved, self.error = control, None, None

    def write(self, run: dict, batches: list, state, live, observers=None, path=None) -> str | None:
        """Write ``run`` (L(w*), engine, sizes) and every row batch (``live``: the one holding the state's rows):
        the path, or None when the write failed (OSError: a full disk, ...), after a warning naming the file and
        the error; the last checkpoint written stays as it was and sampling goes on."""
        c = self.control
        path = checkpoint.rank_path(path or c.checkpoint, c.rank, c.world)
        c.generation += 1  # counted even if the write fails: ranks keep the same generation per step
        payload = dict(c.meta, **run, generation=c.generation,
                       groups=[snapshot(b, state, b is live) for b in batches])
        if observers is not None:
            payload["observed"] = {name: values.copy() for name, values in observers.values.items()}
        try:
            checkpoint.write(path, payload, keep_previous=c.world > 1)
        except OSError as e:
            self.error = f"the checkpoint {path} could not be written ({e})"
            kept = f"the last one written, {self.saved}, is kept" if self.saved else \
                "no checkpoint of this run was written yet"
            warnings.warn(f"{self.error}; {kept}. Sampling goes on; free space there (or pass another "
                          "checkpoint path) for the next checkpoint to be written", checkpoint.CheckpointWriteWarning,
                          stacklevel=3)
            return None
        self.saved = str(path)
        return self.saved
