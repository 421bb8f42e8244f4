"""Endless, reproducible streams of batches from a user's loader or re-iterable."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch

STREAM_CHAIN = 0
STREAM_INIT_LOSS = 1


def derived_seed(*words: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence), for torch.manual_seed."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0] >> 1)


def move_to_device(batch, device: torch.device):
    """Tensors in a batch (nested in tuples, lists and dicts) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)((k, move_to_device(v, device)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def check_reiterable(data) -> None:
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a DataLoader or a re-iterable of batches (e.g. a list), got {type(data).__name__}")
    if isinstance(data, Iterator):  # not iter(data): starting a DataLoader draws from the global RNG
        raise TypeError(
            "data is a one-shot iterator (a generator or iter(...)); sampling re-reads the data many times, "
            "so pass a DataLoader or a list of batches instead"
        )


def dataset_size(data) -> int | None:
    """n, the number of training samples, when the loader knows it (DataLoader over a sized dataset)."""
    dataset = getattr(data, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


class BatchStream:
    """Cycles through ``data`` forever. Each pass (epoch) is started under a torch seed
    derived from (seed, stream, index, epoch), so a shuffling DataLoader yields the same
    batches for the same chain whatever else ran before it."""

    def __init__(self, data, *, seed: int, stream: int, index: int):
        self.data, self.key, self.epoch, self._it = data, (seed, stream, index), 0, None

    def _restart(self):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(*self.key, self.epoch))
            self._it = iter(self.data)
        self.epoch += 1

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is not None:
            batch = next(self._it, _END)
            if batch is not _END:
                return batch
        self._restart()
        batch = next(self._it, _END)
        if batch is _END:
            raise ValueError("data yielded no batches: pass a non-empty DataLoader or list of batches")
        return batch


_END = object()
