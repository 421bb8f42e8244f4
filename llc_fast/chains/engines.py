"""Forward/backward engines: the loss and its gradient for a row batch (B chain rows).

An engine answers two questions for the sampling loop (``runner.run_chains``):
``loss_and_grad(num_rows, batches)`` -> (losses [B], gradients [B, N] or None when they were left in
the state's own gradient storage), and ``loss_at_w_star(batch)`` -> L(w*) of one batch (a float).

``SequentialEngine`` runs each chain on the real module, one after another, with gradients landing
in the flat gradient buffer. ``VmapEngine`` runs all rows of a row batch in one forward and backward
pass over the stacked flat weights (torch.func ``vmap`` of ``grad_and_value``), keeping the
``loss_fn(model, batch)`` contract: inside, the module's parameters are the chain's slices of the
flat vector, so tied weights stay tied. The FSDP engine (sharded models) is in
``llc_fast.distributed.engine``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch.func import grad_and_value, vmap

from ..state.flat import FlatState, swapped_parameters

CHAIN_BATCHING = ("auto", "vmap", "sequential")  # local_engine's chain_batching


def checked_loss(loss, where: str) -> torch.Tensor:
    """The loss_fn's return value, checked to be a real scalar tensor; returned as a 0-d tensor."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a scalar torch.Tensor, got {type(loss).__name__} {where}")
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn must return the scalar mean loss of the batch, got a tensor of shape {tuple(loss.shape)} "
            f"{where}; reduce it (e.g. loss.mean())"
        )
    return loss.reshape(())


def check_differentiable(loss: torch.Tensor, where: str) -> None:
    """Raise if the loss carries no gradient to the sampled parameters: the chains would then be driven by
    the noise alone and give a plausible-looking but meaningless estimate."""
    if not loss.is_floating_point() or not loss.requires_grad:
        why = (f"an integer tensor ({loss.dtype})" if not loss.is_floating_point() else
               "a tensor without gradient (computed under torch.no_grad(), .detach()ed, or not from the model's "
               "sampled parameters)")
        raise ValueError(f"loss_fn returned {why} {where}; return the loss computed from model(...) in floating "
                         "point so that its gradient with respect to the parameters drives the chains")


def checked_finite(value: float, where: str) -> float:
    if not torch.isfinite(torch.tensor(value)):
        raise ValueError(f"loss_fn returned a non-finite value ({value}) {where}: check the model and data")
    return value


class SequentialEngine:
    """One chain after another on the real module (any model; gradients into ``state.grad``)."""

    name = "sequential"
    batched = False

    def __init__(self, model: torch.nn.Module, state: FlatState, loss_fn: Callable):
        self.model, self.state, self.loss_fn = model, state, loss_fn

    def loss_at_w_star(self, batch) -> float:
        """L(w*) of one batch (row 0 of the state holds w* before sampling)."""
        with torch.no_grad(), self.state.install(0):
            return float(checked_loss(self.loss_fn(self.model, batch), "at w*"))

    def check_gradient(self, batch) -> None:
        """Before sampling: raise if loss_fn's loss on ``batch`` carries no gradient to the sampled parameters."""
        with torch.enable_grad(), self.state.install(0):
            check_differentiable(checked_loss(self.loss_fn(self.model, batch), "at w*"), "at w*")

    def evaluate(self, num_rows: int, batch, observable: Callable | None = None) -> torch.Tensor:
        """``observable(model, batch)`` (default: loss_fn's scalar loss) at rows 0..B-1 on one shared batch,
        without gradients: [B, *its shape]."""
        fn = observable or self.loss_fn
        with torch.no_grad():
            out = []
            for row in range(num_rows):
                with self.state.install(row):
                    out.append(checked_observable(fn(self.model, batch), observable is None))
        return torch.stack(out)

    def loss_and_grad(self, num_rows: int, batches: list) -> tuple[torch.Tensor, None]:
        """Losses [B] of rows 0..B-1; their gradients are left in ``state.grad[:B]``."""
        grad = self.state.grad[:num_rows]
        grad.zero_()
        losses = []
        for row in range(num_rows):
            with self.state.install(row):
                loss = checked_loss(self.loss_fn(self.model, batches[row]), "while sampling")
                check_differentiable(loss, "while sampling")
                loss.backward()
            losses.append(loss.detach().reshape(()))
        return torch.stack(losses), None


def checked_observable(value, is_loss: bool) -> torch.Tensor:
    """An evaluation's value: loss_fn's scalar loss (checked as a loss) or an observable's tensor."""
    if is_loss:
        return checked_loss(value, "on an evaluation set").detach()
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"observable must return a floating-point torch.Tensor (e.g. per-token losses [T]), got "
                        f"{type(value).__name__ if not isinstance(value, torch.Tensor) else value.dtype}")
    return value.detach()


class BatchMemoryWarning(RuntimeWarning):
    """A batched forward/backward ran out of memory and now runs in smaller passes (the same chains, slower)."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure: torch.OutOfMemoryError (a GPU), MemoryError, or a
    RuntimeError saying so ("out of memory"; torch's CPU allocator: "can't allocate memory")."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if isinstance(error, MemoryError) or (oom is not None and isinstance(error, oom)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("out of memory", "can't allocate memory", "cannot allocate memory"))


class Unstackable(ValueError):
    """The chains' batches differ in structure or shape and cannot be stacked."""


def stack_batches(batches: list):
    """Stack the chains' batches leaf by leaf (tensors along a new dim 0); non-tensors must agree."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        if any(not isinstance(b, torch.Tensor) or b.shape != first.shape for b in batches):
            raise Unstackable("batch tensors differ in shape")
        return torch.stack(batches)
    if isinstance(first, Mapping):
        return type(first)((k, stack_batches([b[k] for b in batches])) for k in first)
    if isinstance(first, (list, tuple)):
        if any(len(b) != len(first) for b in batches):
            raise Unstackable("batches differ in length")
        items = [stack_batches([b[i] for b in batches]) for i in range(len(first))]
        return type(first)(*items) if hasattr(first, "_fields") else type(first)(items)
    if any(b != first for b in batches):
        raise Unstackable("non-tensor parts of the batches differ")
    return first


def _tensor_dims(batch, dim):
    """in_dims for vmap: ``dim`` for every tensor leaf, None elsewhere."""
    if isinstance(batch, torch.Tensor):
        return dim
    if isinstance(batch, Mapping):
        return type(batch)((k, _tensor_dims(v, dim)) for k, v in batch.items())
    if isinstance(batch, (list, tuple)):
        items = [_tensor_dims(v, dim) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return None


class VmapEngine(SequentialEngine):
    """All rows of a row batch in one vmapped forward and backward pass.

    compile: run the vmapped forward and backward through ``torch.compile`` (one graph per batch layout,
    compiled at its first use: seconds on a CPU), the parameters bound by torch's reparametrisation instead
    of the swap; the chain is the same up to float rounding (the compiled kernels round differently).
    """

    name = "vmap"
    batched = True

    def __init__(self, model: torch.nn.Module, state: FlatState, loss_fn: Callable, compile: bool = False):
        super().__init__(model, state, loss_fn)
        layout = state.layout
        sizes = [s.numel for s in layout.slots]
        shapes = [s.shape for s in layout.slots]
        names = [s.name for s in layout.slots]

        def flat_loss(row: torch.Tensor, batch):
            pieces = [p.view(shape) for p, shape in zip(row.split(sizes), shapes)]
            with swapped_parameters(layout, pieces):
                loss = loss_fn(model, batch)
            return loss.reshape(())

        def reparametrised_loss(row: torch.Tensor, batch):
            from torch.nn.utils.stateless import _reparametrize_module

            params = {n: p.view(shape) for n, p, shape in zip(names, row.split(sizes), shapes)}
            with _reparametrize_module(model, params, tie_weights=True):
                return loss_fn(model, batch).reshape(())

        self.compiled = compile
        self.rows_per_pass: int | None = None  # None: a row batch's rows in one pass; set when a pass ran out of memory
        self.memory_note = ""  # why passes are smaller than row batches ("" while they are not)
        self._flat_loss = flat_loss
        self._grad_and_value = grad_and_value(reparametrised_loss if compile else flat_loss)
        self._graphs: dict = {}

    def _call(self, w: torch.Tensor, batch, batch_dim):
        in_dims = (0, _tensor_dims(batch, batch_dim))
        if self.compiled:
            key = repr(in_dims)
            if key not in self._graphs:
                self._graphs[key] = torch.compile(vmap(self._grad_and_value, in_dims=in_dims, randomness="different"),
                                                  dynamic=False)
            fn = self._graphs[key]
        else:
            fn = vmap(self._grad_and_value, in_dims=in_dims, randomness="different")
        grad, loss = fn(w, batch)
        return loss.detach(), grad.detach()

    def evaluate(self, num_rows: int, batch, observable: Callable | None = None) -> torch.Tensor:
        """``observable(model, batch)`` (default: the loss) at rows 0..B-1 on one shared batch, in one vmapped
        forward pass without gradients: [B, *its shape]."""
        if observable is None:
            return self.losses(num_rows, batch)
        layout, model = self.state.layout, self.model
        sizes = [s.numel for s in layout.slots]
        shapes = [s.shape for s in layout.slots]

        def flat_observable(row, batch):
            with swapped_parameters(layout, [p.view(shape) for p, shape in zip(row.split(sizes), shapes)]):
                return checked_observable(observable(model, batch), False)

        with torch.no_grad():
            return vmap(flat_observable, in_dims=(0, None), randomness="different")(self.state.w[:num_rows], batch)

    def losses(self, num_rows: int, batch) -> torch.Tensor:
        """Losses [B] of rows 0..B-1 on one shared batch, without gradients (one vmapped forward pass)."""
        with torch.no_grad():
            return vmap(self._flat_loss, in_dims=(0, None), randomness="different")(self.state.w[:num_rows], batch)

    def loss_and_grad(self, num_rows: int, batches: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Losses [B] and gradients of rows 0..B-1: [B, N] from one pass, or, once a pass of this many rows ran
        out of memory, passes of ``rows_per_pass`` rows with the gradients left in ``state.grad[:B]`` (None).

        A pass that runs out of memory (``is_out_of_memory``) is retried in passes of half as many rows, with a
        ``BatchMemoryWarning`` at once; later steps start there. Each chain's loss and gradient do not depend
        on the rows it shares a pass with, so the chains are the same. Out of memory with one row is raised."""
        while True:
            per = min(num_rows, self.rows_per_pass or num_rows)
            try:
                if per == num_rows:
                    return self._pass(0, num_rows, batches)
                grad, losses = self.state.grad, []
                for r in range(0, num_rows, per):
                    loss, part = self._pass(r, min(num_rows, r + per), batches)
                    grad[r:r + len(loss)].copy_(part)
                    losses.append(loss)
                return torch.cat(losses), None
            except Exception as e:
                if per == 1 or not is_out_of_memory(e):
                    raise
                why = type(e).__name__ + (f": {str(e).splitlines()[0]}" if str(e).strip() else "")
            self._halve(per, why)  # outside the except block: the failed pass's tensors are freed first

    def _halve(self, per: int, why: str) -> None:
        import warnings

        if self.state.w.is_cuda:
            torch.cuda.empty_cache()
        self.rows_per_pass = (per + 1) // 2
        self.memory_note = (f"passes of {self.rows_per_pass} rows: a batched pass of {per} rows ran out of memory "
                            f"({why[:200]})")
        warnings.warn(f"a batched forward/backward of {per} chains ran out of memory ({why[:200]}); running "
                      f"{self.rows_per_pass} chain{'s' if self.rows_per_pass > 1 else ''} per pass instead (the "
                      "chains are the same). Pass "
                      f"max_batched_chains={self.rows_per_pass} (or a smaller batch_memory_bytes) to start there",
                      BatchMemoryWarning, stacklevel=4)

    def _pass(self, start: int, stop: int, batches: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Losses and gradients [stop - start, N] of rows start..stop-1 in one pass (per row if batches differ)."""
        w, batches = self.state.w[start:stop], batches[start:stop]
        if all(b is batches[0] for b in batches):  # shared batches
            loss, grad = self._call(w, batches[0], None)
            return loss, grad.contiguous()
        try:
            loss, grad = self._call(w, stack_batches(batches), 0)
            return loss, grad.contiguous()
        except Unstackable:
            parts = [self._call(w[r : r + 1], batches[r], None) for r in range(len(batches))]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]).contiguous()


def local_engine(model, state: FlatState, loss_fn: Callable, chain_batching: str, probe_batches,
                 compile: bool = False) -> tuple:
    """(engine, fallback reason) for one process: vmap when asked or when it works ("auto": one trial
    forward/backward on ``probe_batches()``, the row batch's first batches), else sequential. Running out of
    memory is no reason to give up batching: the trial is split into smaller passes like any batched pass
    (``VmapEngine.loss_and_grad``); only a model that cannot be batched at all runs one chain at a time.
    compile: the batched engine's pass through torch.compile (``VmapEngine``)."""
    if chain_batching == "sequential" or state.num_rows == 1:
        return SequentialEngine(model, state, loss_fn), ""
    engine = VmapEngine(model, state, loss_fn, compile=compile)
    if chain_batching == "vmap":
        return engine, ""
    batches = probe_batches()
    try:
        engine.loss_and_grad(len(batches), batches)
        return engine, ""
    except Exception as e:  # any failure means: run this model one chain at a time
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return SequentialEngine(model, state, loss_fn), reason
