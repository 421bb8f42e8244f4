"""LLCConfig: every option of an LLC run, validated once, before any work.

``estimate_llc(model, data, loss_fn, **options)`` builds one ``LLCConfig(**options)``; every layer
below reads its settings from it: the sampler settings (``settings``), the per-chain
hyperparameters (``hyper``), the schedule of recorded steps (``schedule``). Each error says what
was wrong and what to pass instead.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields, replace

import numpy as np
import torch

from . import __version__
from .chains import curvature
from .chains.data import check_reiterable, dataset_size
from .chains.identity import digest, normalised
from .chains.runner import CHAIN_BATCHING
from .chains.schedule import ChainHyper, Schedule
from .kernels.dispatch import backend_names
from .kernels.update_spec import SamplerSettings

BATCH_SPLIT = ("auto", "split", "replicate")


def default_nbeta(n: int) -> float:
    """Watanabe's nbeta = n / log n (beta* = 1/log n)."""
    return n / math.log(n)


def _values(x) -> list:
    """A scalar or a per-chain sequence (list, tuple, numpy array, tensor) as a flat list."""
    if isinstance(x, torch.Tensor):
        return x.detach().reshape(-1).tolist()
    if isinstance(x, np.ndarray):
        return x.reshape(-1).tolist()
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


def check_positive(name: str, value, *, allow_zero: bool = False, hint: str = "") -> None:
    """A scalar or per-chain sequence of real numbers, all finite and > 0 (>= 0 with allow_zero)."""
    for v in _values(value):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
            need = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{name} must be a finite number {need}, got {v!r}. {hint}".rstrip())


def check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _per_chain(name: str, value, num_chains: int) -> tuple[float, ...]:
    values = _values(value)
    if len(values) not in (1, num_chains):
        raise ValueError(f"{name} must be a scalar or have one value per chain ({num_chains}), got {len(values)} "
                         "values")
    return tuple(float(v) for v in values) * (num_chains if len(values) == 1 else 1)


def _check_device(device) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA GPU is visible (torch.cuda.is_available() is False; torch "
                         f"{torch.__version__}, built with CUDA {torch.version.cuda}); pass device='cpu'")


@dataclass(frozen=True, kw_only=True, eq=False)
class LLCConfig:
    """The options of ``estimate_llc`` (see its docstring), checked on construction.

    lr, nbeta, gamma are stored as one float per chain; nbeta is None until ``for_data`` resolves its
    default n/log n from the data. shard_group_size, batch_split and failure_grace_s apply under torchrun.
    With target_stderr or target_rel_error, num_draws is the fewest draws and max_draws (default 10 x
    num_draws) the most; the MCSE is checked every check_every draws (default max(10, num_draws // 4)).
    components: ((name, restriction or None), ...): every chain runs once per component, restricted to it
    (``estimate_restricted_llcs``); the run then has num_chains x len(components) chain rows (``hyper``).
    preconditioner="curvature": a fixed diagonal preconditioner from the curvature at w* (``chains.curvature``),
    from preconditioner_samples Hessian-vector products (default 32), gains at most preconditioner_max_gain
    (default 1000); None when it is off. rmsprop_alpha and rmsprop_eps do not apply to it.
    """

    sampler: str = "sgld"
    lr: tuple
    nbeta: tuple | None = None
    gamma: tuple = 1.0
    num_chains: int = 4
    num_draws: int = 200
    num_burnin_steps: int = 0
    num_steps_bw_draws: int = 1
    seed: int = 0
    device: str | torch.device | None = None
    progress: bool = True
    rmsprop_alpha: float = 0.99
    rmsprop_eps: float = 0.1
    weight_decay: float = 0.0
    box: float | None = None
    noise_level: float = 1.0
    mask: dict | None = None
    num_init_loss_batches: int = 16
    freeze_preconditioner_at: int | None = None
    preconditioner: str | None = None
    preconditioner_samples: int | None = None
    preconditioner_max_gain: float | None = None
    backend: str = "auto"
    shared_batches: bool = False
    chain_batching: str = "auto"
    max_batched_chains: int | None = None
    batch_memory_bytes: int | None = None
    mala_every: int | None = None
    compile_step: bool = False
    shard_group_size: int | None = None
    batch_split: str = "auto"
    failure_grace_s: float = 10.0
    checkpoint: str | None = None
    checkpoint_every: int | None = None
    resume: str | None = None
    target_stderr: float | None = None
    target_rel_error: float | None = None
    max_draws: int | None = None
    check_every: int | None = None
    components: tuple | None = None
    dataset_size: int | None = None  # n, set by for_data when the data knows it
    identity: dict | None = None  # what the run reads (chains.identity): set by the estimate before sampling

    def __post_init__(self) -> None:
        SamplerSettings(sampler=self.sampler, rmsprop_alpha=self.rmsprop_alpha, rmsprop_eps=self.rmsprop_eps,
                        weight_decay=self.weight_decay, box=self.box, noise_level=self.noise_level)
        for name in ("num_chains", "num_draws", "num_steps_bw_draws", "num_init_loss_batches"):
            check_count(name, getattr(self, name), 1)
        check_count("num_burnin_steps", self.num_burnin_steps, 0)
        for name in ("freeze_preconditioner_at", "mala_every", "max_batched_chains", "batch_memory_bytes"):
            if getattr(self, name) is not None:
                check_count(name, getattr(self, name), 1)
        if self.chain_batching not in CHAIN_BATCHING:
            raise ValueError(f"chain_batching must be one of {CHAIN_BATCHING}, got {self.chain_batching!r}")
        if self.backend not in backend_names():
            raise ValueError(f"backend must be one of {backend_names()}, got {self.backend!r}")
        if self.batch_split not in BATCH_SPLIT:
            raise ValueError(f"batch_split must be one of {BATCH_SPLIT}, got {self.batch_split!r}")
        if self.num_draws == 1 and self.num_burnin_steps == 0:
            raise ValueError("num_draws=1 with num_burnin_steps=0 takes no sampler step: the estimate would be the loss "
                             "at w* on one batch. Ask for more draws (e.g. num_draws=200)")
        if self.mask is not None and not isinstance(self.mask, Mapping):
            raise TypeError(f"mask must be a dict {{parameter name: 0/1 tensor or None}}, got {type(self.mask).__name__}"
                            "; e.g. mask={'layer.weight': torch.ones_like(layer.weight)}")
        if self.device is not None:
            _check_device(self.device)
        if self.components is not None:
            self._check_components()
        self._check_run_control()
        self._check_preconditioner()
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        check_positive("lr", self.lr, hint="lr is the SGLD step size epsilon, e.g. 1e-4.")
        check_positive("gamma", self.gamma, allow_zero=True, hint="gamma is the localization strength (0 turns it off).")
        object.__setattr__(self, "lr", _per_chain("lr", self.lr, self.num_chains))
        object.__setattr__(self, "gamma", _per_chain("gamma", self.gamma, self.num_chains))
        if self.nbeta is not None:
            check_positive("nbeta", self.nbeta, hint="nbeta is n*beta, e.g. n/log(n) for n training samples.")
            object.__setattr__(self, "nbeta", _per_chain("nbeta", self.nbeta, self.num_chains))

    def _check_preconditioner(self) -> None:
        """preconditioner="curvature" (a fixed diagonal preconditioner from the curvature at w*) and its settings,
        resolved to their defaults when it is on."""
        if self.preconditioner is None:
            for name in ("preconditioner_samples", "preconditioner_max_gain"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to preconditioner='curvature': pass that too, or leave {name} "
                                     "out")
            return
        if self.preconditioner not in curvature.PRECONDITIONERS:
            raise ValueError(f"preconditioner must be None (no preconditioner) or one of {curvature.PRECONDITIONERS}"
                             f" (a fixed diagonal preconditioner from the curvature at w*), got "
                             f"{self.preconditioner!r}; for an adaptive one pass sampler='rmsprop_sgld' instead")
        if self.sampler != "sgld":
            raise ValueError(f"preconditioner={self.preconditioner!r} fixes the preconditioner that "
                             f"sampler={self.sampler!r} adapts: pass sampler='sgld' (the default) with it, or leave "
                             "preconditioner out")
        if self.freeze_preconditioner_at is not None:
            raise ValueError(f"preconditioner={self.preconditioner!r} is fixed from step 0: leave "
                             "freeze_preconditioner_at out (it applies to the RMSProp samplers)")
        if self.preconditioner_samples is None:
            object.__setattr__(self, "preconditioner_samples", curvature.DEFAULT_SAMPLES)
        check_count("preconditioner_samples", self.preconditioner_samples, 1)
        if self.preconditioner_max_gain is None:
            object.__setattr__(self, "preconditioner_max_gain", curvature.DEFAULT_MAX_GAIN)
        check_positive("preconditioner_max_gain", self.preconditioner_max_gain,
                       hint="it bounds how many times an element's step may exceed the stiffest one's, e.g. 1000.")
        if self.preconditioner_max_gain < 1:
            raise ValueError(f"preconditioner_max_gain must be >= 1 (the stiffest element keeps gain 1), got "
                             f"{self.preconditioner_max_gain!r}; e.g. 1000")
        object.__setattr__(self, "preconditioner_max_gain", float(self.preconditioner_max_gain))

    def _check_components(self) -> None:
        comps = tuple(self.components)
        if not comps:
            raise ValueError("components is empty: give at least one component {name: parameter patterns}")
        names = [c[0] if isinstance(c, tuple) and len(c) == 2 else None for c in comps]
        if any(not isinstance(n, str) or not n for n in names):
            raise ValueError("components must be (name, restriction) pairs with non-empty string names")
        if len(set(names)) != len(names):
            raise ValueError(f"component names must be unique, got {names}")
        for name, restriction in comps:
            if restriction is not None and not isinstance(restriction, Mapping):
                raise TypeError(f"component {name!r}: a restriction is a dict {{parameter name: 0/1 tensor or None}},"
                                f" got {type(restriction).__name__}")
        if self.mask is not None:
            raise ValueError("mask= and components cannot be combined: give each component its own restriction")
        object.__setattr__(self, "components", comps)

    @property
    def component_names(self) -> list[str] | None:
        return None if self.components is None else [name for name, _ in self.components]

    @property
    def num_rows(self) -> int:
        """Chain rows of the run: num_chains, times the number of components."""
        return self.num_chains * (1 if self.components is None else len(self.components))

    def _check_run_control(self) -> None:
        if self.checkpoint_every is not None:
            check_count("checkpoint_every", self.checkpoint_every, 1)
            if self.checkpoint is None:
                raise ValueError("checkpoint_every needs checkpoint=PATH (the file to write the run to)")
        for name in ("checkpoint", "resume"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, bytes)) and not hasattr(value, "__fspath__"):
                raise TypeError(f"{name} must be a file path, got {type(value).__name__}")
        if self.checkpoint is not None:
            from pathlib import Path

            parent = Path(self.checkpoint).expanduser().parent
            if not parent.is_dir():
                raise ValueError(f"checkpoint={str(self.checkpoint)!r}: the directory {parent} does not exist")
            object.__setattr__(self, "checkpoint", str(self.checkpoint))
        if self.resume is not None:
            object.__setattr__(self, "resume", str(self.resume))
        if self.target_stderr is not None and self.target_rel_error is not None:
            raise ValueError("pass target_stderr or target_rel_error, not both")
        for name in ("target_stderr", "target_rel_error"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name), hint="it bounds the MCSE of the estimate, e.g. 0.05.")
        targeted = self.target_stderr is not None or self.target_rel_error is not None
        for name in ("max_draws", "check_every"):
            if getattr(self, name) is not None:
                check_count(name, getattr(self, name), 1)
                if not targeted:
                    raise ValueError(f"{name} applies when drawing until a target: pass target_stderr or "
                                     "target_rel_error too")
        if targeted:
            if self.max_draws is None:
                object.__setattr__(self, "max_draws", 10 * self.num_draws)
            if self.max_draws < self.num_draws:
                raise ValueError(f"max_draws={self.max_draws} is below num_draws={self.num_draws} (the fewest draws)")
            if self.check_every is None:
                object.__setattr__(self, "check_every", max(10, self.num_draws // 4))

    @property
    def targeted(self) -> bool:
        return self.target_stderr is not None or self.target_rel_error is not None

    def fingerprint(self) -> dict:
        """Everything that determines the run's numbers, as JSON values: every resolved option (defaults
        included), the content of the mask and of each component's restriction, and ``identity`` (the data at
        w*, the weights, the evaluation sets). A checkpoint is resumed, and a saved result reused, only under
        an equal fingerprint (``chains.identity.differences`` names what differs). Without a preconditioner its
        options are left out, so fingerprints saved before they existed still match."""
        skip = {"progress", "checkpoint", "checkpoint_every", "resume", "failure_grace_s", "mask", "components"}
        if self.preconditioner is None:
            skip |= {"preconditioner", "preconditioner_samples", "preconditioner_max_gain"}
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        out.update(lr=list(self.lr), nbeta=list(self.nbeta) if self.nbeta else None, gamma=list(self.gamma),
                   device=None if self.device is None else str(self.device))

        def content(mask):
            return None if not mask else {k: None if v is None else digest(torch.as_tensor(v).float())
                                          for k, v in sorted(mask.items())}

        out["mask"] = content(self.mask)
        if self.components is not None:
            out["components"] = [[name, content(r) if r is not None else "full"] for name, r in self.components]
        return normalised(out)

    def replace(self, **changes) -> "LLCConfig":
        return replace(self, **changes)

    def for_data(self, data) -> "LLCConfig":
        """This config with the data checked and nbeta resolved (default n/log n, n = the data's size)."""
        check_reiterable(data)
        n = dataset_size(data)
        if self.nbeta is not None:
            return replace(self, dataset_size=n)
        if n is None or n < 2:
            raise ValueError(
                "nbeta is required when the data's size is unknown: pass nbeta=n/log(n) for n training samples "
                "(or a fixed value such as 10-30 for language models)"
            )
        return replace(self, nbeta=default_nbeta(n), dataset_size=n)

    @property
    def settings(self) -> SamplerSettings:
        """The update's settings. With preconditioner="curvature" the update is the RMSProp one with its statistic
        fixed before sampling (``chains.curvature``): sampler "rmsprop_sgld", eps from preconditioner_max_gain."""
        if self.preconditioner is not None:
            return SamplerSettings(sampler="rmsprop_sgld", rmsprop_alpha=self.rmsprop_alpha,
                                   rmsprop_eps=curvature.statistic_eps(self.preconditioner_max_gain),
                                   weight_decay=self.weight_decay, box=self.box, noise_level=self.noise_level)
        return SamplerSettings(sampler=self.sampler, rmsprop_alpha=self.rmsprop_alpha, rmsprop_eps=self.rmsprop_eps,
                               weight_decay=self.weight_decay, box=self.box, noise_level=self.noise_level)

    @property
    def schedule(self) -> Schedule:
        """The steps of the run: num_draws draws (max_draws when drawing until a target)."""
        return Schedule(num_draws=self.max_draws if self.targeted else self.num_draws, num_burnin_steps=self.num_burnin_steps,
                        num_steps_bw_draws=self.num_steps_bw_draws,
                        freeze_preconditioner_at=0 if self.preconditioner is not None else
                        self.freeze_preconditioner_at, mala_every=self.mala_every)

    @property
    def hyper(self) -> ChainHyper:
        """Per-chain lr, nbeta, gamma ([C] float64) and chain indices; needs nbeta resolved (``for_data``)."""
        if self.nbeta is None:
            raise ValueError("nbeta is not resolved: call LLCConfig.for_data(data) first")
        k = 1 if self.components is None else len(self.components)
        return ChainHyper(*(torch.tensor(v, dtype=torch.float64).repeat(k) for v in (self.lr, self.nbeta, self.gamma)),
                          chain_ids=torch.arange(self.num_chains, dtype=torch.int64).repeat(k),
                          component=None if self.components is None else
                          torch.arange(k, dtype=torch.int64).repeat_interleave(self.num_chains))

    def to_dict(self, **run_facts) -> dict:
        """The settings as recorded in ``LLCResult.config``, plus ``run_facts`` (backend, engine, sizes...)."""
        skip = {"progress", "batch_memory_bytes", "shard_group_size", "batch_split", "failure_grace_s", "mask",
                "checkpoint", "checkpoint_every", "resume", "components", "identity"}
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        out.update(lr=list(self.lr), nbeta=list(self.nbeta), gamma=list(self.gamma), device=None,
                   mask=sorted(self.mask) if self.mask else None)
        out.update(run_facts)
        out.update(fingerprint=self.fingerprint(), llc_fast_version=__version__, torch_version=torch.__version__)
        return out


#: The default of every option that has one (as ``estimate_llc`` takes them).
DEFAULTS = {f.name: f.default for f in fields(LLCConfig) if f.default is not MISSING}
