"""Endless, reproducible streams of batches from a user's loader or re-iterable."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch

STREAM_CHAIN = 0
STREAM_INIT_LOSS = 1
STREAM_PROBE = 2  # the perturbation probe's batches and directions (studies.probe)
STREAM_CURVATURE = 3  # the curvature probes' batches (chains.curvature)
STREAM_EVAL = 4  # evaluation sets' batches (chains.observe)


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


def batches_in_first_pass(data, limit: int) -> int:
    """How many batches one pass over ``data`` yields, counting at most ``limit`` (len() when it exists)."""
    try:
        return min(len(data), limit)
    except TypeError:
        count = 0
        for _ in data:
            count += 1
            if count >= limit:
                break
        return count


class BatchStream:
    """Cycles through ``data`` forever. Each pass (epoch) over a loader is started, and its first
    batch drawn, under a CPU seed derived from (seed, stream, index, epoch): a shuffling DataLoader
    draws its order then, so it yields the same batches for the same chain whatever else ran
    before or between. Lists and tuples are read in order and need no seed."""

    def __init__(self, data, *, seed: int, stream: int, index: int):
        self.data, self.key, self.epoch = data, (seed, stream, index), 0
        self._it, self._pending = None, _END
        self._seeded = not isinstance(data, (list, tuple))
        self.consumed = 0  # batches handed out in the current pass

    @property
    def position(self) -> tuple[int, int]:
        """(passes started, batches handed out in the current one): where ``seek`` brings a new stream back."""
        return self.epoch, self.consumed

    def seek(self, position: tuple[int, int]) -> None:
        """Continue exactly where a stream of the same data and key stood at ``position`` (the pass is restarted
        under its seed and the batches already handed out are read again and dropped)."""
        epoch, consumed = position
        self.epoch, self._it, self._pending, self.consumed = 0, None, _END, 0
        if epoch == 0:
            return
        self.epoch = epoch - 1
        self._restart()
        for _ in range(consumed):
            self._pending = next(self._it, _END)
        self.consumed = consumed

    def _restart(self):
        if self._seeded:
            gen = torch.default_generator
            saved = gen.get_state()
            try:
                gen.manual_seed(derived_seed(*self.key, self.epoch))
                self._it = iter(self.data)
                self._pending = next(self._it, _END)
            finally:
                gen.set_state(saved)
        else:
            self._it = iter(self.data)
            self._pending = next(self._it, _END)
        self.epoch += 1
        self.consumed = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None or self._pending is _END:
            self._restart()
            if self._pending is _END:
                raise ValueError("data yielded no batches: pass a non-empty DataLoader or list of batches")
        batch, self._pending = self._pending, next(self._it, _END)
        self.consumed += 1
        return batch


_END = object()


def batch_streams(data, seed: int, chain_ids, shared: bool) -> list[BatchStream]:
    """One stream per chain (keyed by its index), or one stream read by every chain."""
    if shared:
        return [BatchStream(data, seed=seed, stream=STREAM_CHAIN, index=0)] * len(chain_ids)
    return [BatchStream(data, seed=seed, stream=STREAM_CHAIN, index=int(c)) for c in chain_ids]
