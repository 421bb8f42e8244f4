"""Drop-in replacements for devinterp's LLC entry points, computed by ``llc_fast.estimate_llc``.

Change the import, keep the call::

    from devinterp.slt.llc import llc                       ->  from llc_fast.compat.devinterp import llc
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary
                                                            ->  from llc_fast.compat.devinterp import ...
    from devinterp.optim import SGLD, SGMCMC                ->  from llc_fast.compat.devinterp import SGLD, SGMCMC

devinterp 2.x (``llc``, ``sample``, ``compute_llc``, ``create_param_masks``): same signatures and
defaults as devinterp 2.0.1, same output variables and dims. All chains read the same batches in the
same order as devinterp's (its seeded DataLoader order, replayed every pass); only the noise differs,
which comes from llc_fast's counter-based generator. devinterp 1.x (``estimate_learning_coeff_with_summary``,
``estimate_learning_coeff``): same arguments and returned keys as devinterp 1.3.2. The samplers ``SGLD``,
``RMSpropSGLD``, ``SGMCMC.sgld`` and ``SGMCMC.rmsprop_sgld`` are torch optimizers stepping with the fused
update (``llc_fast.compat._optim``); they can also be passed to devinterp itself.

Conventions: numbers follow devinterp by default, including its questionable choices (2.x: the
burn-in steps and the steps between draws are averaged into each chain's loss, llc_std has ddof=0, a
chain whose loss became NaN/Inf keeps the estimate of the steps it ran; 1.x: nbeta defaults to
B/log B with B the batch size). A warning says so once per process. The native API,
``llc_fast.estimate_llc``, averages only the draws after burn-in, uses ddof=1 and leaves diverged chains
out; ``llc``/``sample``/``compute_llc`` take ``conventions="llc_fast"`` for those rules.

Not supported (clear errors): observables in ``sample`` (susceptibilities), ``init_noise``,
``save_metrics``, SGNHT, 1.x ``callbacks`` (for MALA acceptance use ``estimate_llc(mala_every=k)``).
Recorded per-token losses are collapsed to the mean loss of each step: the ``batch_sampling``/``batch``
and ``token_pos`` dims have size 1 (the LLC does not change) and ``sampling_input_ids_micro`` is absent.

Known differences besides the noise: with fewer batches than ``num_init_loss_batches`` per epoch, 2.x
cycles them for the initial loss, this layer averages one pass; with
``match_sampling_input_ids_across_chains=False`` each chain reads its own llc_fast-seeded shuffles (not
devinterp's per-chain generators); 1.x returns llc = inf for an infinite loss, this layer raises
``ChainDivergedError`` as for NaN.
"""
from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Mapping

import numpy as np
import torch

from ..chains.data import derived_seed
from ..estimators.llc import AllChainsDivergedError, LLCDivergenceWarning, estimate_llc
from ._masks import create_param_masks
from ._optim import SGLD, SGMCMC, RMSpropSGLD, sampler_name

__all__ = [
    "llc", "sample", "compute_llc", "create_param_masks", "estimate_learning_coeff_with_summary",
    "estimate_learning_coeff", "default_nbeta", "SGLD", "RMSpropSGLD", "SGMCMC", "DevinterpCompatWarning",
    "ChainDivergedError",
]

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

_V2_MESSAGE = (
    "llc_fast.compat.devinterp follows devinterp 2.x's conventions so its numbers match devinterp's: each "
    "chain's mean loss includes the burn-in steps and the steps between draws, llc_std is the standard "
    "deviation with ddof=0, and a chain whose loss became NaN/Inf keeps the estimate of the steps it ran. "
    "The native llc_fast.estimate_llc averages only the draws after burn-in, uses ddof=1 and leaves diverged "
    "chains out (pass conventions='llc_fast' here for those rules). This warning is shown once.")
_V1_MESSAGE = (
    "llc_fast.compat.devinterp follows devinterp 1.x: optimizer_kwargs has no nbeta, so nbeta = B/log(B) with "
    "B the batch size (times grad_accum_steps), as devinterp's default_nbeta. Watanabe's choice, the default of "
    "the native llc_fast.estimate_llc, is n/log(n) with n the number of training samples; pass nbeta "
    "explicitly to choose. This warning is shown once.")


def _warn_once(key: str, message: str, stacklevel: int = 3) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, DevinterpCompatWarning, stacklevel=stacklevel)


def _reset_warnings() -> None:
    """Forget which once-per-process warnings were shown (for tests)."""
    _WARNED.clear()


# ---------------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _train_mode(model: torch.nn.Module):
    """devinterp samples (and computes the initial loss) in train mode; restore every module's mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def _only_sampled(model: torch.nn.Module, names: set[str] | None):
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


def _resolve_masks(model: torch.nn.Module, masks: Mapping | None, what: str, require_all: bool):
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
            if m.shape != every[name].shape:
                raise ValueError(f"{what}[{name!r}] has shape {tuple(m.shape)}, the parameter {tuple(every[name].shape)}")
            flat[cname] = m.to(torch.bool) if cname not in flat else flat[cname] | m.to(torch.bool)
    if require_all:
        missing = [n for n in canonical.values() if n not in names]
        if missing:
            raise ValueError(f"{what} must give a mask for every parameter (devinterp 1.x indexes it by every "
                             f"name); missing: {missing}. Use torch.ones_like(p, dtype=torch.bool) to keep one free.")
    return names, flat or None


@contextlib.contextmanager
def _divergence_handled():
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


def _seed_from(seed) -> int:
    """devinterp's seed (None, an int, or one per chain) as llc_fast's single 63-bit noise key."""
    if seed is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, (list, tuple)):
        return derived_seed(*[int(s) for s in seed])
    seed = int(seed)
    return seed if 0 <= seed < 2**63 else derived_seed(seed % 2**64)


def _nan_after_first_bad(trace: np.ndarray) -> np.ndarray:
    trace = trace.copy()
    for row in trace:
        bad = np.flatnonzero(~np.isfinite(row))
        if bad.size:
            row[bad[0]:] = np.nan
    return trace


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


# ---------------------------------------------------------------------------------------------------
# devinterp 2.x: llc / sample / compute_llc
# ---------------------------------------------------------------------------------------------------
def lm_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a language model, called as devinterp 2.x does (HF, TransformerLens or plain modules)."""
    if hasattr(model, "cfg") and hasattr(model.cfg, "n_heads"):  # TransformerLens
        return model(input_ids, return_type="logits")
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        return model(input_ids, return_dict=False, use_cache=False)[0]
    out = model(input_ids)
    return out.logits if hasattr(out, "logits") else out


def per_token_loss(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per token, (batch, seq-1): devinterp 2.x's default loss (without its
    host-side finiteness check, so that chains can be batched; a NaN loss still marks a chain diverged)."""
    log_probs = torch.log_softmax(lm_logits(model, input_ids), dim=-1)
    return -log_probs[..., :-1, :].gather(dim=-1, index=input_ids[..., 1:, None])[..., 0]


class _MeanTokenLoss:
    """llc_fast's loss_fn(model, batch) from devinterp 2.x's per-token loss_fn(model, input_ids)."""

    def __init__(self, loss_fn):
        self.loss_fn = loss_fn or per_token_loss

    def __call__(self, model, batch):
        input_ids = batch["input_ids"]
        loss = self.loss_fn(model, input_ids)
        expected = tuple(input_ids.shape[:-1]) + (input_ids.shape[-1] - 1,)
        if tuple(loss.shape) != expected:
            raise ValueError(f"loss_fn must return per-token loss of shape {expected}, got {tuple(loss.shape)}")
        return loss.float().mean()


class _Batches:
    """devinterp 2.x's batches: micro-batches of ``batch_size`` rows (drop_last) in its DataLoader order,
    ``accumulation`` consecutive micro-batches concatenated into one batch. With a fixed ``order`` every pass
    replays it (devinterp cycles its first epoch); with ``order=None`` each pass draws a fresh shuffle from
    torch's global RNG, which llc_fast seeds per chain and pass."""

    def __init__(self, dataset, batch_size: int, accumulation: int, order: torch.Tensor | None, shuffle: bool):
        self.dataset, self.batch_size, self.accumulation = dataset, batch_size, accumulation
        self.order, self.shuffle = order, shuffle
        self.n = len(dataset)
        micro = self.n // batch_size
        if micro == 0:
            raise ValueError(f"the dataset has {self.n} rows, fewer than batch_size={batch_size}")
        self.repeats = accumulation // math.gcd(micro, accumulation)  # passes of micro-batches per cycle
        self.num_batches = micro * self.repeats // accumulation

    def __len__(self) -> int:
        return self.num_batches

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.tolist()
        if hasattr(self.dataset, "column_names"):  # HuggingFace Dataset: one gather
            col = self.dataset[idx]["input_ids"]
        else:
            col = [self.dataset[i]["input_ids"] for i in idx]
        if isinstance(col, torch.Tensor):
            return col.long()
        return torch.stack([torch.as_tensor(r) for r in col]).long()

    def __iter__(self):
        micro = self.n // self.batch_size
        used = micro * self.batch_size
        orders = []
        for _ in range(self.repeats):
            if self.order is not None:
                orders.append(self.order[:used])
            elif self.shuffle:
                orders.append(torch.randperm(self.n)[:used])
            else:
                orders.append(torch.arange(used))
        flat = torch.cat(orders)
        rows = self.batch_size * self.accumulation
        for k in range(self.num_batches):
            yield {"input_ids": self._rows(flat[k * rows:(k + 1) * rows])}


def _loader_order(n: int, batch_size: int, shuffle: bool, seed: int) -> torch.Tensor:
    """The row order of devinterp's DataLoader(shuffle, generator seeded ``seed``, drop_last) first epoch."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    batches = list(torch.utils.data.DataLoader(range(n), batch_size=batch_size, shuffle=shuffle, generator=gen,
                                               drop_last=True))
    return torch.cat(batches) if batches else torch.zeros(0, dtype=torch.int64)


def sample(model, dataset, observables, *, lr: float, n_beta: float, param_masks=None, num_chains: int = 4,
           num_draws: int = 200, batch_size: int = 32, num_burnin_steps: int = 0, num_steps_bw_draws: int = 1,
           num_init_loss_batches: int = 32, init_seed: int = 100, batches_per_draw: int = 3, obs_seed: int = 1337,
           gradient_accumulation_steps: int = 1, localization: float = 0.0, noise_level: float = 1.0,
           llc_weight_decay: float = 0.0, bounding_box_size: float | None = None,
           sampling_method="sgmcmc_sgld", sampling_method_kwargs: dict | None = None,
           rmsprop_eps: float | None = None, rmsprop_alpha: float | None = None, shuffle: bool = True,
           match_sampling_input_ids_across_chains: bool = True, init_noise: float | None = None,
           device: str | None = None, save_metrics: bool = False, output_path=None, loss_fn=None,
           conventions: str = "devinterp", backend: str = "auto", progress: bool = True):
    """devinterp 2.0.1's ``sample``: SGLD chains over a language-model dataset (``input_ids`` column), on
    llc_fast's engine. Returns an ``xarray.DataTree`` with ``sampling_loss_micro`` (chain, step,
    batch_sampling, token_pos), ``sampling_loss`` (chain, draw, batch, token_pos), ``init_loss`` (chain,
    token_pos) and devinterp's ``metadata`` attribute; the batch and token dims have size 1 (the mean loss
    of each step). llc_fast extras: ``conventions`` (recorded for ``compute_llc``), ``backend``, ``progress``.
    """
    import xarray as xr

    if conventions not in CONVENTIONS:
        raise ValueError(f"conventions must be one of {CONVENTIONS}, got {conventions!r}")
    if observables:
        raise NotImplementedError(
            "observables (per-draw losses on other datasets, for susceptibilities) are not computed by llc_fast; "
            "pass observables={} (llc() does not use them)")
    if init_noise:
        raise NotImplementedError("init_noise is not supported: llc_fast starts every chain at the trained weights")
    if save_metrics:
        raise NotImplementedError("save_metrics is not supported; for MALA acceptance use llc_fast.estimate_llc(mala_every=k)")
    kw = dict(sampling_method_kwargs or {})
    if not isinstance(sampling_method, str) or sampling_method in ("sgmcmc_sgld", "rmsprop_sgld"):
        sampler = sampler_name(sampling_method)
    else:
        raise ValueError(f"Unknown sampling method {sampling_method}")
    for name, value in (("eps", rmsprop_eps), ("alpha", rmsprop_alpha)):
        if value is None:
            continue
        if sampler != "rmsprop_sgld":
            raise ValueError(f"rmsprop_{name} can only be set when sampling_method='rmsprop_sgld', "
                             f"got sampling_method={sampling_method!r}")
        if name in kw:
            raise ValueError(f"rmsprop_{name} is set both as a top-level argument and in "
                             f"sampling_method_kwargs[{name!r}]; specify only one.")
        kw[name] = value
    if kw.pop("add_grad_correction", False):
        raise NotImplementedError("add_grad_correction=True is not implemented (devinterp raises too)")
    alpha, eps = kw.pop("alpha", 0.99), kw.pop("eps", 0.1)
    if kw:
        raise TypeError(f"unexpected sampling_method_kwargs {sorted(kw)}")
    for name, value in (("batch_size", batch_size), ("gradient_accumulation_steps", gradient_accumulation_steps),
                        ("num_steps_bw_draws", num_steps_bw_draws), ("num_draws", num_draws)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    context_length = len(dataset[0]["input_ids"]) - 1
    if context_length < 1:
        raise ValueError(f"Sequences must have length >= 2 for next-token loss (got {context_length + 1}).")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    config = dict(
        lr=lr, n_beta=n_beta, batch_size=batch_size, num_chains=num_chains, num_draws=num_draws,
        num_burnin_steps=num_burnin_steps, num_steps_bw_draws=num_steps_bw_draws,
        gradient_accumulation_steps=gradient_accumulation_steps, num_init_loss_batches=num_init_loss_batches,
        init_seed=init_seed, localization=localization, noise_level=noise_level, llc_weight_decay=llc_weight_decay,
        bounding_box_size=bounding_box_size,
        sampling_method=sampling_method if isinstance(sampling_method, str) else
        {"sgld": "sgmcmc_sgld"}.get(sampler, sampler),
        sampling_method_kwargs=dict(sampling_method_kwargs or {}), init_noise=init_noise, save_metrics=save_metrics,
        shuffle=shuffle, epoch_mode="cycle",
        match_sampling_input_ids_across_chains=match_sampling_input_ids_across_chains,
        scheduler_type="constant", scheduler_kwargs=None, cores=1, online=False,
    )
    if output_path is not None:
        cached = _cached(output_path, config)
        if cached is not None:
            return cached

    order = _loader_order(len(dataset), batch_size, shuffle, init_seed) if match_sampling_input_ids_across_chains \
        else None
    data = _Batches(dataset, batch_size, gradient_accumulation_steps, order, shuffle)
    names, mask = _resolve_masks(model, param_masks, "param_masks", require_all=False)
    num_steps = num_draws * num_steps_bw_draws + num_burnin_steps
    with _train_mode(model), _only_sampled(model, names), _divergence_handled() as holder:
        holder["result"] = estimate_llc(
            model, data, _MeanTokenLoss(loss_fn), sampler=sampler, lr=lr, nbeta=n_beta, gamma=localization,
            num_chains=num_chains, num_draws=num_draws * num_steps_bw_draws, num_burnin_steps=num_burnin_steps,
            num_steps_bw_draws=1, seed=_seed_from(init_seed), device=device, progress=progress,
            rmsprop_alpha=alpha, rmsprop_eps=eps, weight_decay=llc_weight_decay,
            box=bounding_box_size, noise_level=noise_level, mask=mask,
            num_init_loss_batches=num_init_loss_batches, backend=backend,
            shared_batches=match_sampling_input_ids_across_chains)
    result = holder["result"]
    steps = _nan_after_first_bad(np.concatenate([result.burnin_loss_trace, result.loss_trace], axis=1))
    for c in result.diverged_chains:
        ran = int(np.isfinite(steps[c]).sum())
        warnings.warn(f"Chain failed: chain {c}'s loss became NaN/Inf after {ran} of {num_steps} steps; as in "
                      "devinterp 2.x its LLC is computed from the steps before (llc_fast.estimate_llc would leave "
                      "the chain out)", RuntimeWarning, stacklevel=2)
    draws = steps[:, num_burnin_steps::num_steps_bw_draws][:, :num_draws]
    f32 = np.float32
    ds = xr.Dataset(
        {
            "init_loss": (("chain", "token_pos"), np.full((num_chains, 1), result.init_loss, dtype=f32)),
            "sampling_loss_micro": (("chain", "step", "batch_sampling", "token_pos"), steps[:, :, None, None].astype(f32)),
            "sampling_loss": (("chain", "draw", "batch", "token_pos"), draws[:, :, None, None].astype(f32)),
        },
        attrs={
            "metadata": {"config": {"sampler": config, "observables": [], "chain_buffer_size": min(50, num_draws),
                                    "shared_observable_dims": ["token", "token_pos"],
                                    "tokenizer_context_length": context_length + 1}},
            "completed": 1,
            "llc_fast": {"conventions": conventions, "diverged_chains": result.diverged_chains,
                         "engine": result.config.get("engine"), "backend": result.config.get("backend"),
                         "seed": result.config["seed"], "timing": result.timing},
        },
    )
    tree = xr.DataTree(ds)
    if output_path is not None:
        tree.to_zarr(str(output_path), consolidated=False)
    return tree


def _cached(output_path, config: dict):
    """devinterp's cache: an existing complete output with the same sampler config is returned as is."""
    from pathlib import Path

    import xarray as xr

    if not Path(output_path).exists():
        return None
    try:
        existing = xr.open_datatree(str(output_path), engine="zarr", consolidated=False)
    except Exception as e:
        raise RuntimeError(f"Output path '{output_path}' exists but couldn't be opened as zarr:\n  {e!r}\n"
                           f"Delete and retry: rm -rf '{output_path}'") from e
    stored = existing.attrs.get("metadata", {}).get("config", {}).get("sampler")
    if existing.attrs.get("completed") != 1 or stored != config:
        raise RuntimeError(f"Output path '{output_path}' holds an incomplete run or one with a different sampler "
                           f"config.\nDelete and retry: rm -rf '{output_path}'")
    return existing


def compute_llc(samples, *, conventions: str | None = None):
    """devinterp 2.0.1's ``compute_llc``: LLC from a sampling DataTree (this module's or devinterp's).

    conventions "devinterp" (the default, unless ``sample`` recorded another): each chain's mean loss over
    every step (burn-in included), ``llc_std`` with ddof=0, NaN steps skipped. "llc_fast": only the draws
    after burn-in, ddof=1, a chain with a NaN/Inf draw left out. Returns an ``xarray.Dataset`` with
    llc_mean, llc_std, llc_per_chain (chain), llc_scalar, loss_trace (chain, step), init_loss.
    """
    return _compute_llc(samples, conventions, stacklevel=4)


def _compute_llc(samples, conventions: str | None, stacklevel: int):
    import xarray as xr

    ds = samples.dataset if hasattr(samples, "dataset") and not isinstance(samples, xr.Dataset) else samples
    if conventions is None:
        conventions = ds.attrs.get("llc_fast", {}).get("conventions", "devinterp")
    if conventions not in CONVENTIONS:
        raise ValueError(f"conventions must be one of {CONVENTIONS}, got {conventions!r}")
    sampler_cfg = ds.attrs["metadata"]["config"]["sampler"]
    n_beta = float(sampler_cfg["n_beta"])
    init_loss = float(ds.init_loss.values.mean())
    loss_trace = ds.sampling_loss_micro.mean(dim=["batch_sampling", "token_pos"])
    if conventions == "devinterp":
        _warn_once("v2", _V2_MESSAGE, stacklevel=stacklevel)
        per_chain = n_beta * (loss_trace.mean(dim="step") - init_loss)
        llc_mean, llc_std = per_chain.mean(), per_chain.std()
        llc_scalar = n_beta * (float(ds.sampling_loss_micro.mean()) - init_loss)
    else:
        burnin, every = int(sampler_cfg["num_burnin_steps"]), int(sampler_cfg["num_steps_bw_draws"])
        draws = loss_trace.isel(step=slice(burnin, None, every)).isel(step=slice(0, int(sampler_cfg["num_draws"])))
        per_chain = n_beta * (draws.mean(dim="step", skipna=False) - init_loss)
        ok = per_chain.values[np.isfinite(per_chain.values)]
        llc_mean = xr.DataArray(np.float32(ok.mean()) if ok.size else np.float32(np.nan))
        llc_std = xr.DataArray(np.float32(ok.std(ddof=1)) if ok.size > 1 else np.float32(np.nan))
        llc_scalar = float(llc_mean)
    return xr.Dataset({"llc_mean": llc_mean, "llc_std": llc_std, "llc_per_chain": per_chain,
                       "llc_scalar": llc_scalar, "loss_trace": loss_trace, "init_loss": init_loss})


def llc(model, dataset, observables, *, lr: float, n_beta: float, param_masks=None, loss_fn=None, **kwargs):
    """devinterp 2.0.1's ``llc``: sample and compute the LLC in one call (``sample``'s keyword arguments
    pass through). Returns an ``xarray.Dataset`` with llc_mean, llc_std, llc_per_chain, llc_scalar,
    loss_trace and init_loss. ``observables`` are not used by the LLC and not computed here."""
    if observables:
        warnings.warn("observables are not computed by llc_fast (llc() does not use them)", DevinterpCompatWarning,
                      stacklevel=2)
    samples = sample(model, dataset, {}, lr=lr, n_beta=n_beta, param_masks=param_masks, loss_fn=loss_fn, **kwargs)
    return _compute_llc(samples, None, stacklevel=4)


from ._v1 import estimate_learning_coeff, estimate_learning_coeff_with_summary  # noqa: E402
