"""LLCConfig: every option of an LLC run, declared once and validated once, before any work.

Each option is one field: its default, help, check and scope (``config.options.option``). From the fields come
``estimate_llc``'s checks (here, on construction), the command line's arguments (``llc_fast.cli.options``) and the
options table of the docs (``options_table``); ``estimate_llc``'s explicit signature is checked against them by the
tests. ``estimate_llc(model, data, loss_fn, **options)`` builds one ``LLCConfig(**options)``; every layer below
reads its settings from it: the sampler settings (``settings``), the per-chain hyperparameters (``hyper``), the
schedule of recorded steps (``schedule``). Each error says what was wrong and what to pass instead.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields, replace

import torch

from .. import __version__
from ..chains import curvature
from ..chains.data import check_reiterable, dataset_size
from ..chains.identity import digest, normalised
from ..chains.engines import CHAIN_BATCHING
from ..chains.row_timing import ROW_BATCHING
from ..chains.schedule import ChainHyper, Schedule
from ..chains.sparse_setup import SPARSE_ROWS
from ..kernels.dispatch import backend_names
from ..kernels.update_spec import NOISE_SCHEMES, SAMPLERS, SamplerSettings
from . import options as _options
from .checks import (check_count, check_device, check_mask, check_path, check_positive, check_seed, count, one_of,
                     per_chain, positive)
from .options import option, option_fields

__all__ = ["LLCConfig", "DEFAULTS", "BATCH_SPLIT", "default_nbeta", "check_count", "check_positive", "option",
           "option_fields", "options_table", "write_options_table"]

BATCH_SPLIT = ("auto", "split", "replicate")
SGNHT_DIFFUSION = 0.01  # sampler="sgnht": the diffusion factor A by default (devinterp's)


def default_nbeta(n: int) -> float:
    """Watanabe's nbeta = n / log n (beta* = 1/log n)."""
    return n / math.log(n)


def check_preconditioner(name: str, value) -> None:
    if value not in curvature.PRECONDITIONERS:
        raise ValueError(f"{name} must be None (no preconditioner) or one of {curvature.PRECONDITIONERS} (a fixed "
                         f"diagonal preconditioner from the curvature at w*), got {value!r}; for an adaptive one pass "
                         "sampler='rmsprop_sgld' instead")


POSITIVE_LR = positive(hint="lr is the SGLD step size epsilon, e.g. 1e-4.")
MCSE_TARGET = positive(hint="it bounds the MCSE of the estimate, e.g. 0.05.")


@dataclass(frozen=True, kw_only=True, eq=False)
class LLCConfig:
    """The options of ``estimate_llc`` (see its docstring; one line each in ``options_table()``), checked on
    construction: each field's own check (its metadata), then the checks across fields.

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

    sampler: str = option("sgld", "the update: SGLD, devinterp's RMSProp-preconditioned SGLD, that one "
                          "bias-corrected (V starting at 1), or SGNHT (a momentum and a thermostat per chain)",
                          choices=SAMPLERS)
    lr: tuple = option(help="step size epsilon: a number, or one per chain", type=float, check=POSITIVE_LR)
    nbeta: tuple | None = option(None, "inverse temperature times n, one or one per chain (None: n/log n, n the "
                                 "dataset's length)", type=float, check=positive(
                                     hint="nbeta is n*beta, e.g. n/log(n) for n training samples."))
    gamma: tuple = option(1.0, "localization strength, one or one per chain (0 turns it off)", type=float, check=positive(
        allow_zero=True, hint="gamma is the localization strength (0 turns it off)."))
    num_chains: int = option(4, "independent chains", check=count(1))
    num_draws: int = option(200, "draws per chain (with a target: the fewest)", check=count(1))
    num_burnin_steps: int = option(0, "steps before the first draw", check=count(0))
    num_steps_bw_draws: int = option(1, "steps between draws", check=count(1))
    seed: int = option(0, "seed of the noise and the batch order (the run is reproducible bit for bit)",
                       check=check_seed)
    device: str | torch.device | None = option(None, "device to sample on (None: the model's)", check=check_device)
    progress: bool = option(True, "show a progress bar")
    rmsprop_alpha: float = option(0.99, "RMSProp samplers: decay of the preconditioner's statistic V")
    rmsprop_eps: float = option(0.1, "RMSProp samplers: floor of the preconditioner")
    weight_decay: float = option(0.0, "weight decay towards 0 in the update")
    box: float | None = option(None, "clamp every weight to w* +- box (None: no clamp)")
    noise_level: float = option(1.0, "scale of the injected noise (1: SGLD)")
    noise_scheme: str = option("euler", "the step's noise: 'euler' (a fresh normal per step) or 'lm' (Leimkuhler-"
                               "Matthews: the mean of this step's and the next step's normals; no step bias on a "
                               "quadratic)", choices=NOISE_SCHEMES)
    sgnht_diffusion: float | None = option(None, "sampler='sgnht': the thermostat's diffusion factor A (None: "
                                           f"{SGNHT_DIFFUSION}, devinterp's default)", check=positive(
                                               hint="it is SGNHT's diffusion factor A, e.g. 0.01."))
    mask: dict | None = option(None, "restriction {parameter name: 0/1 tensor or None (the whole parameter)}: only "
                               "its ones are sampled", check=check_mask, cli=False)
    num_init_loss_batches: int = option(16, "batches averaged for L(w*)", check=count(1))
    freeze_preconditioner_at: int | None = option(None, "RMSProp samplers: step from which V stays fixed",
                                                  check=count(1))
    preconditioner: str | None = option(None, "'curvature': SGLD with a fixed diagonal preconditioner from the "
                                        "Hessian's diagonal at w* (docs/update.md)", check=check_preconditioner,
                                        choices=curvature.PRECONDITIONERS)
    preconditioner_samples: int | None = option(None, "with preconditioner: Hessian-vector products for the "
                                                f"diagonal (None: {curvature.DEFAULT_SAMPLES})")
    preconditioner_max_gain: float | None = option(None, "with preconditioner: most a weight's step is enlarged "
                                                   f"(None: {curvature.DEFAULT_MAX_GAIN:g})")
    backend: str = option("auto", "the fused update's backend: 'auto' or a name from llc_fast.backends()",
                          check=one_of(backend_names))
    shared_batches: bool = option(False, "every chain reads the same batches (devinterp's default)")
    chain_batching: str = option("auto", "chains in one vmapped pass ('vmap'), one at a time ('sequential'), or "
                                 "vmap where the model allows ('auto')", choices=CHAIN_BATCHING)
    max_batched_chains: int | None = option(None, "most chains in one pass (memory); the result does not depend on "
                                            "it", check=count(1))
    batch_memory_bytes: int | None = option(None, "budget of a batched group's flat buffers (None: half the free "
                                            "memory)", check=count(1))
    row_batching: str = option("measured", "rows per vmapped pass: the fastest of timed trial passes within the memory "
                               "plan ('measured', runs of >= 100 steps) or the most that fit ('fit'); the chains are "
                               "the same",
                               choices=ROW_BATCHING)
    mala_every: int | None = option(None, "record the MALA acceptance of every k-th step after burn-in",
                                    check=count(1))
    compile_step: bool = option(False, "run the batched forward and backward through torch.compile")
    shard_group_size: int | None = option(None, "ranks per chain group (None: all)", scope="torchrun")
    batch_split: str = option("auto", "split a chain's batch over its shard group, or give every rank all of it",
                              choices=BATCH_SPLIT, scope="torchrun")
    failure_grace_s: float = option(10.0, "seconds a rank waits in a collective after another rank failed",
                                    scope="torchrun")
    checkpoint: str | None = option(None, "write the whole run to this file (every checkpoint_every steps and on "
                                    "Ctrl-C)", check=check_path)
    checkpoint_every: int | None = option(None, "steps between checkpoints", check=count(1))
    resume: str | None = option(None, "continue the run saved in this checkpoint, bit for bit", check=check_path)
    target_stderr: float | None = option(None, "draw until the MCSE of the estimate is at most this",
                                         check=MCSE_TARGET)
    target_rel_error: float | None = option(None, "draw until the MCSE is at most this fraction of |LLC|",
                                            check=MCSE_TARGET)
    max_draws: int | None = option(None, "with a target: the most draws (None: 10 x num_draws)", check=count(1))
    check_every: int | None = option(None, "with a target: draws between checks of the MCSE (None: max(10, "
                                     "num_draws // 4))", check=count(1))
    components: tuple | None = option(None, "((name, restriction or None), ...): set by estimate_restricted_llcs",
                                      scope="internal")
    sparse_rows: str = option("auto", "rows of a restricted run hold only their component's coordinates: 'auto' "
                              "(where that applies), 'on' or 'off': set by estimate_restricted_llcs",
                              choices=SPARSE_ROWS, scope="internal")
    dataset_size: int | None = option(None, "n, set by for_data when the data knows it", scope="internal")
    identity: dict | None = option(None, "what the run reads (chains.identity): set by the estimate before sampling",
                                   scope="internal")

    def __post_init__(self) -> None:
        self._check_sgnht()
        SamplerSettings(sampler=self.sampler, rmsprop_alpha=self.rmsprop_alpha, rmsprop_eps=self.rmsprop_eps,
                        weight_decay=self.weight_decay, box=self.box, noise_level=self.noise_level,
                        noise_scheme=self.noise_scheme, **self._sgnht_settings())
        for f in fields(self):
            _options.check_value(f, getattr(self, f.name))
        if self.num_draws == 1 and self.num_burnin_steps == 0:
            raise ValueError("num_draws=1 with num_burnin_steps=0 takes no sampler step: the estimate would be the loss "
                             "at w* on one batch. Ask for more draws (e.g. num_draws=200)")
        if self.components is not None:
            self._check_components()
        self._check_run_control()
        self._check_preconditioner()
        for name in ("lr", "gamma", "nbeta"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, per_chain(name, getattr(self, name), self.num_chains))

    def _check_sgnht(self) -> None:
        """sampler="sgnht" and its diffusion factor (resolved to its default), and what it does not combine with."""
        if self.sampler != "sgnht":
            if self.sgnht_diffusion is not None:
                raise ValueError(f"sgnht_diffusion applies to sampler='sgnht' (got sampler={self.sampler!r}): pass "
                                 "that too, or leave sgnht_diffusion out")
            return
        for name, why in (("mala_every", "the MALA acceptance is that of a Langevin step, and SGNHT's step is not one"),
                          ("freeze_preconditioner_at", "it applies to the RMSProp samplers")):
            if getattr(self, name) is not None:
                raise ValueError(f"sampler='sgnht' takes no {name}: {why}; leave {name} out")
        if self.sgnht_diffusion is None:
            object.__setattr__(self, "sgnht_diffusion", SGNHT_DIFFUSION)
        check_positive("sgnht_diffusion", self.sgnht_diffusion, hint="it is SGNHT's diffusion factor A, e.g. 0.01.")
        object.__setattr__(self, "sgnht_diffusion", float(self.sgnht_diffusion))

    def _sgnht_settings(self) -> dict:
        return {} if self.sgnht_diffusion is None else dict(sgnht_diffusion=self.sgnht_diffusion)

    def _check_preconditioner(self) -> None:
        """preconditioner="curvature" (a fixed diagonal preconditioner from the curvature at w*) and its settings,
        resolved to their defaults when it is on."""
        if self.preconditioner is None:
            for name in ("preconditioner_samples", "preconditioner_max_gain"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to preconditioner='curvature': pass that too, or leave {name} "
                                     "out")
            return
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
        if self.checkpoint_every is not None and self.checkpoint is None:
            raise ValueError("checkpoint_every needs checkpoint=PATH (the file to write the run to)")
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
        targeted = self.target_stderr is not None or self.target_rel_error is not None
        for name in ("max_draws", "check_every"):
            if getattr(self, name) is not None:
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
        skip = {"progress", "checkpoint", "checkpoint_every", "resume", "failure_grace_s", "mask", "components",
                "sparse_rows", "row_batching"}  # rows' storage and calls change no draw beyond float rounding
        if self.preconditioner is None:
            skip |= {"preconditioner", "preconditioner_samples", "preconditioner_max_gain"}
        if self.sgnht_diffusion is None:
            skip.add("sgnht_diffusion")
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
                                   weight_decay=self.weight_decay, box=self.box, noise_level=self.noise_level,
                                   noise_scheme=self.noise_scheme)
        return SamplerSettings(sampler=self.sampler, rmsprop_alpha=self.rmsprop_alpha, rmsprop_eps=self.rmsprop_eps,
                               weight_decay=self.weight_decay, box=self.box, noise_level=self.noise_level,
                               noise_scheme=self.noise_scheme, **self._sgnht_settings())

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
                "checkpoint", "checkpoint_every", "resume", "components", "identity", "sparse_rows"}
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        out.update(lr=list(self.lr), nbeta=list(self.nbeta), gamma=list(self.gamma), device=None,
                   mask=sorted(self.mask) if self.mask else None)
        out.update(run_facts)
        out.update(fingerprint=self.fingerprint(), llc_fast_version=__version__, torch_version=torch.__version__)
        return out


#: The default of every option that has one (as ``estimate_llc`` takes them).
DEFAULTS = {f.name: f.default for f in fields(LLCConfig) if f.default is not MISSING}


def options_table() -> str:
    """The markdown table of LLCConfig's options (README.md's, between config.options.OPTIONS_TABLE_BEGIN/END)."""
    return _options.options_table(LLCConfig)


def write_options_table(path="README.md") -> None:
    """Regenerate the options table in ``path`` (README.md): ``python -c "import llc_fast.config as c;
    c.write_options_table()"`` from the repository's root."""
    from pathlib import Path

    Path(path).write_text(_options.with_table(Path(path).read_text(), options_table()))
