"""What a run reads, as digests: the data at w*, the model's weights, the evaluation sets.

A saved or resumed result is reused only when it provably answers the same question: the run's
fingerprint (``LLCConfig.fingerprint``) holds every resolved option, the content of every mask, and these
digests. ``differences`` names each place where two fingerprints disagree.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np
import torch

from .data import STREAM_INIT_LOSS, BatchStream, batches_in_first_pass, dataset_size

DIGEST_BYTES = 16  # 128-bit blake2b: collisions are not a practical concern for telling runs apart


def _feed(h, obj) -> None:
    """Feed a batch-like object (tensors, arrays, numbers, strings, nested sequences and mappings) to ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
        if t.device.type == "meta":
            h.update(b"meta")
            return
        if hasattr(t, "to_local"):  # a DTensor (a model sharded by an earlier run): this rank's shard and layout
            h.update(f"{t.placements};".encode())
            t = t.to_local()
        t = t.cpu().contiguous()
        if t.dtype.itemsize and t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, np.ndarray):
        h.update(f"array {obj.dtype} {obj.shape};".encode())
        h.update(np.ascontiguousarray(obj).view(np.uint8).data)
    elif isinstance(obj, Mapping):
        h.update(f"map {len(obj)};".encode())
        for key in sorted(obj, key=repr):
            h.update(f"{key!r}:".encode())
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__} {len(obj)};".encode())
        for item in obj:
            _feed(h, item)
    else:
        h.update(f"{type(obj).__name__} {obj!r};".encode())


def digest(obj) -> str:
    """A hex digest of ``obj``'s content (dtypes, shapes and bytes of its tensors, its other values)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    _feed(h, obj)
    return h.hexdigest()


def weights_digest(model: torch.nn.Module) -> str | None:
    """A digest of every parameter and buffer of ``model`` by name (tied tensors once); None for what is not a
    module (the sampler refuses it, saying so)."""
    if not isinstance(model, torch.nn.Module):
        return None
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        _feed(h, tensor)
    return h.hexdigest()


def data_identity(data, *, seed: int, num_batches: int) -> dict:
    """The data's size (None when unknown) and a digest of the batches a run reads at w*: the first
    ``num_batches`` of the initial-loss stream (at most one pass), as ``runner.initial_loss`` reads them."""
    stream = BatchStream(data, seed=seed, stream=STREAM_INIT_LOSS, index=0)
    batches = [next(stream) for _ in range(batches_in_first_pass(data, num_batches))]
    return dict(size=dataset_size(data), batches=digest(batches), num_batches=len(batches))


def callable_name(fn) -> str:
    """module.qualname of a function (of the function it wraps, if any): how a fingerprint names a loss."""
    fn = getattr(fn, "__wrapped__", fn)
    fn = getattr(fn, "func", fn)  # functools.partial
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def normalised(obj):
    """``obj`` as it reads back from JSON (tuples as lists, keys as strings), so saved and new fingerprints
    compare equal when they hold the same values."""
    return json.loads(json.dumps(obj, default=str))


def differences(saved, now, where: str = "") -> list[str]:
    """Each place where two fingerprints differ, as 'key: saved X, now Y' (nested keys joined by '.')."""
    if isinstance(saved, Mapping) and isinstance(now, Mapping):
        out = []
        for key in sorted(set(saved) | set(now), key=str):
            here = f"{where}.{key}" if where else str(key)
            if key not in saved:
                out.append(f"{here}: absent before, now {_short(now[key])}")
            elif key not in now:
                out.append(f"{here}: before {_short(saved[key])}, absent now")
            else:
                out += differences(saved[key], now[key], here)
        return out
    return [] if saved == now else [f"{where or 'value'}: before {_short(saved)}, now {_short(now)}"]


#: Parts compared by name only (a function's code cannot be fingerprinted): a difference is reported, not refused.
BY_NAME_ONLY = ("identity.loss_fn",)


def check_same(saved: dict, now: dict, what: str, advice: str) -> None:
    """Raise ValueError naming every difference between two fingerprints (``what`` was made with ``saved``);
    a difference only in a part compared by name is a warning."""
    import warnings

    diff = differences(saved, now)
    by_name = [d for d in diff if d.split(":")[0] in BY_NAME_ONLY]
    hard = [d for d in diff if d not in by_name]
    if hard:
        raise ValueError(f"{what} was made with other settings or inputs, so it does not answer this question; "
                         f"{advice}. Differences: " + "; ".join(hard))
    if by_name:
        warnings.warn(f"{what}: the loss function has another name ({'; '.join(by_name)}); it is reused on the "
                      "assumption that it computes the same loss", RuntimeWarning, stacklevel=3)


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
