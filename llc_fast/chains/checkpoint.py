"""Checkpoints of a sampling run: everything needed to continue it bit for bit.

A checkpoint holds, for every row batch (``runner.RowBatch``): the next step, the losses and MALA acceptances so far,
the divergence flags, the chains' rows of the sampler state (weights and RMSProp statistic; a rank's own
shards when sharded), the positions of the batch streams and the state of the RNG that drives randomness
inside the model; and for the run: L(w*), the engine, the row batches' size and the config it was made with
(a resume from another config is refused, naming the differences). It is written atomically with
``torch.save``; under torchrun every rank writes its own file (``rank_path``). What a run writes, and
reads back to resume, is ``resume.py``'s.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from ..files import write_atomically
from .identity import check_same

FORMAT = 1


def rank_path(path: str | os.PathLike, rank: int, world: int) -> Path:
    """The checkpoint file of one rank (the path itself on one process)."""
    path = Path(path)
    return path if world == 1 else path.with_name(f"{path.name}.rank{rank}-of-{world}")


def check_world(path: str | os.PathLike, rank: int, world: int) -> None:
    """Refuse, naming both counts, to resume with ``world`` processes a checkpoint ``path`` that only other numbers of
    processes wrote (this rank's file is missing and another world size's files are there)."""
    path = Path(path)
    if rank_path(path, rank, world).is_file() or not path.parent.is_dir():
        return
    found = {int(f.name.rsplit("-of-", 1)[1]) for f in path.parent.glob(f"{path.name}.rank*-of-*")
             if f.name.rsplit("-of-", 1)[1].isdigit()}
    if world > 1 and path.is_file():
        found.add(1)
    found.discard(world)
    if found:
        counts = " or ".join(str(n) for n in sorted(found))
        how = "without torchrun" if found == {1} else f"with torchrun --nproc_per_node={max(found)}"
        raise ValueError(f"checkpoint {path} was written by {counts} process(es); resume it with as many (now "
                         f"{world}): launch it {how}")


def previous_path(path: str | os.PathLike) -> Path:
    return Path(f"{path}.previous")


class CheckpointWriteWarning(RuntimeWarning):
    """A checkpoint could not be written (e.g. the disk is full): the run goes on, the last one written is kept."""


def write(path: str | os.PathLike, payload: dict, keep_previous: bool = False) -> Path:
    """torch.save ``payload`` to ``path`` atomically (a complete file or none); keep_previous: the file it
    replaces stays as ``<path>.previous`` (ranks that must agree on a generation need the one before). A write
    that fails (OSError: a full disk, ...) raises with ``path`` and ``<path>.previous`` as they were and no
    temporary file left."""
    buf = io.BytesIO()
    torch.save(dict(payload, format=FORMAT), buf)
    if keep_previous and Path(path).exists():
        staged = write_atomically(f"{path}.next", buf.getvalue())  # complete before anything is moved
        os.replace(path, previous_path(path))
        os.replace(staged, path)
        return Path(path)
    return write_atomically(path, buf.getvalue())


def read_generations(path: str | os.PathLike) -> dict[int, dict]:
    """{generation: payload} of the checkpoint at ``path`` and of the one it replaced, where present."""
    out = {}
    for p in (Path(path), previous_path(path)):
        if p.is_file():
            payload = read(p)
            out[payload.get("generation", 0)] = payload
    if not out:
        read(path)  # raises, saying what is missing
    return out


def read(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (under torchrun each rank reads its own "
                                f"{path.name}.rank<r>-of-<W>)")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an llc_fast sampling checkpoint (format {FORMAT})")
    return payload


def check_same_config(payload: dict, config: dict, path) -> None:
    """Refuse to resume a checkpoint written by a run of another question (``LLCConfig.fingerprint``: options,
    masks, data, weights, evaluation sets), naming each difference."""
    check_same(payload["config"], config, f"checkpoint {path}",
               "resume it with the same options and inputs, or start a new run without resume=")
