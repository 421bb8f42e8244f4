"""What the devinterp compatibility layer shares: its warning and error types, the once-per-process
convention warnings, and the helpers that map devinterp's arguments onto ``llc_fast.estimate_llc``."""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
import warnings
from collections.abc import Mapping

import torch

from ...chains.data import derived_seed
from ...estimators.llc import AllChainsDivergedError, LLCDivergenceWarning

CONVENTIONS = ("devinterp", "llc_fast")


class DevinterpCompatWarning(UserWarning):
    """The compatibility layer reproduces a devinterp convention that the native API does differently."""


class ChainDivergedError(RuntimeError):
    """devinterp 1.x stops when a chain's loss is NaN; so does its compatibility layer. ``.result`` holds the
    llc_fast result (with the traces); the native ``llc_fast.estimate_llc`` leaves such chains out."""

    def __init__(self, message: str, result):
        super().__init__(message)
        self.result = result


_WARNED: set[str] = set()

V2_MESSAGE = (
    "llc_fast.compat.devinterp follows devinterp 2.x's conventions so its numbers match devinterp's: each "
    "chain's mean loss includes the burn-in steps and the steps between draws, llc_std is the standard "
    "deviation with ddof=0, and a chain whose loss became NaN/Inf keeps the estimate of the steps it ran. "
    "The native llc_fast.estimate_llc averages only the draws after burn-in, uses ddof=1 and leaves diverged "
    "chains out (pass conventions='llc_fast' here for those rules). This warning is shown once.")
V1_MESSAGE = (
    "llc_fast.compat.devinterp follows devinterp 1.x: optimizer_kwargs has no nbeta, so nbeta = B/log(B) with "
    "B the batch size (times grad_accum_steps), as devinterp's default_nbeta. Watanabe's choice, the default of "
    "the native llc_fast.estimate_llc, is n/log(n) with n the number of training samples; pass nbeta "
    "explicitly to choose. This warning is shown once.")


def warn_once(key: str, message: str, stacklevel: int = 3) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, DevinterpCompatWarning, stacklevel=stacklevel)


def reset_warnings() -> None:
    """Forget which once-per-process warnings were shown (for tests)."""
    _WARNED.clear()


# ---------------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def train_mode(model: torch.nn.Module):
    """devinterp samples (and computes the initial loss) in train mode; restore every module's mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def only_sampled(model: torch.nn.Module, names: set[str] | None):
    """Sample only the parameters named in ``names`` (devinterp: the others get requires_grad=False)."""
    if names is None:
        yield
        return
    frozen = [p for n, p in model.named_parameters() if n not in names and p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def resolve_masks(model: torch.nn.Module, masks: Mapping | None, what: str, require_all: bool):
    """devinterp's per-parameter masks as (names to sample or None, estimate_llc mask dict or None)."""
    if masks is None:
        return None, None
    if not isinstance(masks, Mapping):
        raise TypeError(f"{what} must be a dict {{parameter name: mask tensor or None}}, got {type(masks).__name__}")
    canonical = {id(p): n for n, p in model.named_parameters()}
    every = dict(model.named_parameters(remove_duplicate=False))
    names, flat = set(), {}
    for name, m in masks.items():
        if name not in every:
            raise ValueError(f"{what} names {name!r}, which is not a parameter of the model; parameters: "
                             f"{list(canonical.values())}")
        cname = canonical[id(every[name])]
        names.add(cname)
        if m is not None and every[name].requires_grad:  # devinterp skips parameters without gradients
            m = torch.as_tensor(m)
            if m.shape != every[name].shape:  # devinterp multiplies by the mask: (1,) switches the whole parameter
                try:
                    m = torch.broadcast_to(m, every[name].shape)
                except RuntimeError:
                    raise ValueError(f"{what}[{name!r}] has shape {tuple(m.shape)}, which does not broadcast to the "
                                     f"parameter's {tuple(every[name].shape)}") from None
            flat[cname] = m.to(torch.bool) if cname not in flat else flat[cname] | m.to(torch.bool)
    if require_all:
        missing = [n for n in canonical.values() if n not in names]
        if missing:
            raise ValueError(f"{what} must give a mask for every parameter (devinterp 1.x indexes it by every "
                             f"name); missing: {missing}. Use torch.ones_like(p, dtype=torch.bool) to keep one free.")
    return names, flat or None


@contextlib.contextmanager
def divergence_handled():
    """Run estimate_llc, keeping its result when every chain diverged and dropping its divergence warnings
    (the caller reports divergence by devinterp's rules); other warnings are passed on."""
    holder: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield holder
        except AllChainsDivergedError as e:
            holder["result"] = e.result
        finally:
            kept = [w for w in caught if not issubclass(w.category, LLCDivergenceWarning)]
    for w in kept:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


_INPLACE_MARKERS = ("modified inplace", "modified by an inplace operation", "inplace arithmetic",
                    "in-place operation", "an inplace operation")


def writes_weights_in_place(error: BaseException) -> bool:
    """Whether ``error`` is torch's complaint about a tensor written in place where batched chains read it: what a
    model that writes its own weights inside ``forward`` (``self.w.fill_(...)``, ``.data.clamp_(...)``) causes."""
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _INPLACE_MARKERS)


def python_state_copy(model: torch.nn.Module):
    """A copy of the model's modules and Python attributes (a forward counter, say) that shares its parameters
    and buffers, taken before a run so that a retry starts where the first try started; None if not copyable."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    try:
        return copy.deepcopy(model, memo)
    except Exception:
        return None


def batched_or_sequential(model: torch.nn.Module, run):
    """``run(model, chain_batching)`` with "auto"; if the batched chains fail because the model writes its own
    weights in place inside ``forward`` (llc_fast's trial pass before sampling catches a model that always does;
    one that starts later, as devinterp's DummyNaNModel, fails mid-run), warn and run again with the chains one
    at a time ("sequential", as devinterp runs them) from a copy of the model's Python state taken before."""
    snapshot = python_state_copy(model)
    try:
        return run(model, "auto")
    except RuntimeError as e:
        if not writes_weights_in_place(e):
            raise
        warnings.warn(
            "the model writes its own weights in place inside forward (torch: "
            f"{str(e).splitlines()[0][:160]!r}); llc_fast's batched chains keep every chain's weights in one stacked "
            "tensor, which such a write cannot target, so the chains run again one at a time "
            "(chain_batching='sequential', as devinterp runs them)" + (
                "" if snapshot is not None else "; the model could not be copied, so its Python state (counters) "
                "is the one the failed try left"), DevinterpCompatWarning, stacklevel=3)
        return run(model if snapshot is None else snapshot, "sequential")


def seed_from(seed) -> int:
    """devinterp's seed (None, an int, or one per chain) as llc_fast's single 63-bit noise key."""
    if seed is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, (list, tuple)):
        return derived_seed(*[int(s) for s in seed])
    seed = int(seed)
    return seed if 0 <= seed < 2**63 else derived_seed(seed % 2**64)


def default_nbeta(dataloader, grad_accum_steps: int = 1, *, gradient_accumulation_steps: int | None = None) -> float:
    """devinterp's default_nbeta: B/log(B) with B = batch size x accumulation steps (1 if B <= 1)."""
    steps = gradient_accumulation_steps or grad_accum_steps
    b = dataloader if isinstance(dataloader, int) else getattr(dataloader, "batch_size", None)
    if not isinstance(b, int):
        raise ValueError(
            f"cannot derive devinterp's default nbeta from {type(dataloader).__name__} (it needs a DataLoader with "
            "a batch_size, or an int); pass nbeta in optimizer_kwargs")
    b *= steps
    if b <= 1:
        warnings.warn("default nbeta is undefined for batch_size * grad_accum_steps == 1, falling back to 1")
        return 1.0
    return b / math.log(b)


