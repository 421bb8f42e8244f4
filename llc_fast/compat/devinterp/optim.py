"""devinterp's samplers as ``torch.optim.Optimizer`` subclasses that step with llc_fast's fused update.

``SGLD``, ``RMSpropSGLD`` and the factories ``SGMCMC.sgld`` / ``SGMCMC.rmsprop_sgld`` take devinterp's
keyword arguments (lr, nbeta, localization, noise_level, weight_decay, bounding_box_size, optimize_over /
mask, and alpha / eps for RMSProp) and follow the update of ``docs/update.md``, which is devinterp's
(1.3.2 and 2.0.1) update with llc_fast's counter-based noise.

On construction the sampled parameters (floating point, ``requires_grad``) of all param groups are
copied into one ``FlatState`` (``llc_fast.state``: one chain row, w*, statistic, mask) per (device,
dtype); each parameter's ``.data`` becomes a view of its slice and its ``.grad`` a view of the flat
gradient buffer, so backward accumulates straight into the flat buffer and ``step()`` is one fused
kernel call per run of param groups with equal hyperparameters (one call in total for the usual
``SGLD(model.parameters(), ...)``). The noise of element i at step t is
keyed by (seed, chain, t, i) with i the element's index in the flat order (the order of
``model.named_parameters()`` for ``model.parameters()``), exactly as ``llc_fast.estimate_llc`` keys
chain ``chain`` of a run with that seed: a manual loop over the same batches reproduces its chain.

Differences from devinterp's classes: the noise comes from llc_fast's generator, not torch's global
RNG (``seed=None`` draws the key from torch's global RNG, or from ``noise_generator``, at the first
step, so ``torch.manual_seed`` still makes runs reproducible); parameters without ``requires_grad`` are
never moved; a parameter that received no gradient is moved with a zero gradient (prior and noise only);
``bounding_box_size=0`` means no box; ``save_metrics`` (2.x) and sketches are not supported.

Diagnostics (devinterp's ``metrics=[...]``: ``noise_norm``, ``grad_norm``, ``weight_norm``, ``distance``,
``noise``, ``dws``, ``localization_loss``; 1.x ``SGLD``'s flags ``save_noise``, ``save_mala_vars``,
``noise_norm``, ``grad_norm``, ``weight_norm``, ``distance``) are computed beside the fused update from the
flat buffers (the pre-step weights, the gradient, the statistic the step used and the step's own
counter-based noise, regenerated) and exposed as devinterp exposes them: ``group["metrics"]`` and
``optimizer.<name>`` (``SGMCMC`` / factories), ``group[<name>]``, ``optimizer.noise[group]``,
``optimizer.dws`` and ``optimizer.localization_loss`` (1.x ``SGLD``), with devinterp's meanings (see
``_record_metrics``). devinterp's own ``sample()`` with a ``MalaAcceptanceRate`` callback therefore runs
with these optimizers. Nothing is computed unless asked for.

devinterp's other conventions kept: a mask of shape ``(1,)`` (or any shape that broadcasts) switches the
whole parameter on or off; a param group with ``lr=0`` is frozen (its RMSProp statistic still takes the
gradient, as devinterp's); ``alpha=1`` (RMSProp) keeps V at 0, i.e. SGLD with step lr/eps.
"""
from __future__ import annotations

import torch

from ...config import check_positive
from ...kernels.dispatch import select_backend
from ...kernels.update_spec import SamplerSettings, StepCounters
from .buckets import build_buckets
from .metrics import DIAGNOSTIC_FLAGS, VALID_METRICS, MetricsMixin
from .sgnht import sampling_kind, sgnht_factory

__all__ = ["SGMCMC", "SGLD", "RMSpropSGLD"]

# Keys of a param group that configure the update (devinterp's names).
_HYPER = ("lr", "nbeta", "localization", "weight_decay", "noise_level", "bounding_box_size", "alpha", "eps")
class SGMCMC(MetricsMixin, torch.optim.Optimizer):
    """devinterp's SGMCMC sampler (SGLD, optionally RMSProp-preconditioned) stepping with the fused update.

    Per step, for every sampled element (``docs/update.md``; devinterp's update):
        V <- alpha*V + (1-alpha)*g^2 ; G = 1/(sqrt(V) + eps)        (preconditioner="rmsprop"; else G = 1)
        w <- w - lr/2 * G*(nbeta*g + localization*(w - w0) + weight_decay*w) + noise_level*sqrt(lr*G)*xi
        w <- clamp(w, w0 - bounding_box_size, w0 + bounding_box_size)  (if set)
    with w0 the weights at construction. ``mask`` (2.x) / ``optimize_over`` (1.x), a 0/1 or bool tensor
    shaped like the parameter, freezes the zero entries; as a param-group key it applies to that group.

    llc_fast extras: ``seed`` and ``chain`` key the noise (seed None: drawn from torch's global RNG at
    the first step); ``backend`` picks the fused update (``llc_fast.backends()``).
    """

    _metric_style = "sgmcmc"  # how metrics are exposed: devinterp's SGMCMC ("sgmcmc") or 1.x SGLD ("sgld")

    def __init__(self, params, *, lr: float = 0.01, noise_level: float = 1.0, nbeta: float = 1.0,
                 localization: float = 0.0, weight_decay: float = 0.0, bounding_box_size: float | None = None,
                 mask=None, optimize_over=None, preconditioner: str = "identity",
                 preconditioner_kwargs: dict | None = None, prior=None, temperature: float | None = None,
                 save_metrics: bool = False, metrics=None, sketch_dim: int | None = None, seed: int | None = None,
                 chain: int = 0, backend: str = "auto", **diagnostics):
        unknown = set(diagnostics) - set(DIAGNOSTIC_FLAGS)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {sorted(unknown)}")
        metrics = list(metrics or [])
        invalid = set(metrics) - set(VALID_METRICS)
        if invalid:
            raise ValueError(f"Invalid metrics: {invalid}. Valid metrics are: {set(VALID_METRICS)}")
        for flag, names in DIAGNOSTIC_FLAGS.items():
            if diagnostics.get(flag):
                metrics += [n for n in names if n not in metrics]
        self._mala_vars = bool({"dws", "localization_loss"} & set(metrics))
        if preconditioner in (None, "identity"):
            sampler = "sgld"
        elif preconditioner == "rmsprop":
            sampler = "rmsprop_sgld"
        else:
            raise NotImplementedError(
                f"preconditioner={preconditioner!r} is not supported by the fused update; use 'identity' or 'rmsprop'")
        pk = dict(preconditioner_kwargs or {})
        if pk.pop("add_grad_correction", False):
            raise NotImplementedError("add_grad_correction=True is not implemented (devinterp raises too)")
        alpha, eps = pk.pop("alpha", 0.99), pk.pop("eps", 0.1)
        if pk:
            raise TypeError(f"unexpected preconditioner_kwargs {sorted(pk)}; RMSProp takes alpha and eps")
        if prior is not None:
            raise NotImplementedError(
                "custom priors are not supported by the fused update: pass localization= (Gaussian prior at the "
                "initial weights) and weight_decay= (Gaussian prior at zero)")
        if save_metrics or sketch_dim is not None:
            raise NotImplementedError(
                "save_metrics/sketches are not recorded by the fused update (metrics=[...] is); for MALA acceptance "
                "of a whole run use llc_fast.estimate_llc(..., mala_every=k)")
        if temperature is not None:
            nbeta = temperature
        if optimize_over is not None and mask is not None:
            raise ValueError("pass either mask (devinterp 2.x) or optimize_over (1.x), not both")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ValueError(f"seed must be None or an integer in [0, 2**63), got {seed!r}")
        if isinstance(chain, bool) or not isinstance(chain, int) or not 0 <= chain < 2**31:
            raise ValueError(f"chain must be an integer in [0, 2**31), got {chain!r}")
        if isinstance(params, (torch.Tensor, dict)):
            params = [params]
        defaults = dict(lr=lr, noise_level=noise_level, nbeta=nbeta, localization=localization,
                        weight_decay=weight_decay, bounding_box_size=bounding_box_size,
                        mask=mask if mask is not None else optimize_over, alpha=alpha, eps=eps, metrics=metrics)
        super().__init__(params, defaults)
        for group in self.param_groups:  # 1.x names the group mask optimize_over
            if group.get("optimize_over") is not None:
                if group.get("mask") is not None and group["mask"] is not group["optimize_over"]:
                    raise ValueError("a param group has both mask and optimize_over; pass one")
                group["mask"] = group["optimize_over"]
        self._sampler = sampler
        self._prior_always = False  # devinterp's factories always build a prior (distance tracked even at gamma 0)
        self._sgld_views: dict = {}
        self._metric_dicts: list[dict] = [{} for _ in self.param_groups]  # per group; SGMCMC: group["metrics"]
        for group in self.param_groups:
            self._init_metrics(group)
        self._seed = seed
        self._chain = chain
        self._backend = backend
        self._step_count = 0
        self._settings: dict[tuple, SamplerSettings] = {}
        self._buckets = build_buckets(self.param_groups, self.state, preconditioned=self._sampler != "sgld")
        for group in self.param_groups:  # every setting checked now, not at the first step
            self._settings_for(self._group_key(group))
        self._chain_ids = {b.device: torch.tensor([chain], dtype=torch.int64, device=b.device) for b in self._buckets}
        self._update = {b.device: select_backend(backend, b.device).update for b in self._buckets}

    def _resync(self) -> None:
        """Re-attach parameters whose .data or .grad was replaced (model.zero_grad(), model.to(...))."""
        with torch.no_grad():
            for b in self._buckets:
                for p, (data, grad) in zip(b.params, b.views):
                    if p.grad is not grad:
                        if p.grad is None:
                            grad.zero_()
                        else:
                            grad.copy_(p.grad)
                        p.grad = grad
                    if p.data.data_ptr() != data.data_ptr() or p.data.shape != data.shape:
                        data.copy_(p.data)
                        p.data = data

    def _group_key(self, group: dict) -> tuple:
        """The update's hyperparameters of a param group, checked as ``estimate_llc`` checks them."""
        check_positive("lr", group["lr"], allow_zero=True,
                       hint="lr is the SGLD step size epsilon, e.g. 1e-4 (0 freezes the param group, as devinterp).")
        check_positive("nbeta", group["nbeta"], hint="nbeta is n*beta, e.g. n/log(n) for n training samples.")
        check_positive("localization", group["localization"], allow_zero=True,
                       hint="localization is the strength gamma of the pull toward the initial weights (0: off).")
        box = group["bounding_box_size"]
        return (float(group["lr"]), float(group["nbeta"]), float(group["localization"]),
                float(group["weight_decay"]), float(group["noise_level"]), float(box) if box else None,
                float(group["alpha"]), float(group["eps"]))

    def _stat_frozen(self, key: tuple) -> bool:
        """RMSProp with alpha = 1: V stays at its start, 0, so G = 1/eps: SGLD with step lr/eps."""
        return self._sampler != "sgld" and key[6] == 1.0

    def _settings_for(self, key: tuple) -> SamplerSettings:
        if key not in self._settings:
            _, _, _, wd, noise, box, alpha, eps = key
            sampler = "sgld" if self._stat_frozen(key) else self._sampler
            if self._stat_frozen(key):
                alpha = 0.99  # unused by SGLD; SamplerSettings checks alpha < 1
            self._settings[key] = SamplerSettings(sampler=sampler, rmsprop_alpha=alpha, rmsprop_eps=eps,
                                                  weight_decay=wd, box=box, noise_level=noise)
        return self._settings[key]

    def _resolve_seed(self, noise_generator: torch.Generator | None) -> int:
        if self._seed is None:
            device = noise_generator.device if noise_generator is not None else "cpu"
            self._seed = int(torch.randint(0, 2**62, (1,), generator=noise_generator, device=device).item())
        return self._seed

    @property
    def seed(self) -> int | None:
        """The noise key (None until the first step when constructed with seed=None)."""
        return self._seed

    @torch.no_grad()
    def step(self, closure=None, noise_generator: torch.Generator | None = None):
        """One sampler step for every parameter (one fused call per run of equal param groups)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        seed = self._resolve_seed(noise_generator)
        self._resync()
        counters = StepCounters(step=self._step_count, update_statistic=True, stat_step=self._step_count)
        keys = [self._group_key(g) for g in self.param_groups]
        if len(self._metric_dicts) != len(self.param_groups):  # add_param_group after construction
            self._metric_dicts += [{} for _ in range(len(self.param_groups) - len(self._metric_dicts))]
        wanted = set().union(*(d.keys() for d in self._metric_dicts))
        pre = ({b.device: b.state.w[0].clone() for b in self._buckets}
               if wanted & {"dws", "distance", "localization_loss"} else {})
        for b in self._buckets:
            runs: list[list] = []
            for gi, start, end in b.segments:
                if runs and runs[-1][0] == keys[gi] and runs[-1][2] == start:
                    runs[-1][2] = end
                else:
                    runs.append([keys[gi], start, end])
            update, chain_ids, st = self._update[b.device], self._chain_ids[b.device], b.state
            for key, start, end in runs:
                lr, nbeta, gamma = key[0], key[1], key[2]
                whole = start == 0 and end == st.w.shape[1]
                sl = slice(start, end)
                settings = self._settings_for(key)
                if lr == 0.0:  # a frozen group (devinterp: lr=0 moves nothing); V still takes the gradient
                    if settings.preconditioned:
                        g = st.grad[:, sl].to(st.stat.dtype)
                        st.stat[:, sl].mul_(settings.rmsprop_alpha).addcmul_(g, g, value=1 - settings.rmsprop_alpha)
                    continue
                if self._stat_frozen(key):
                    lr = lr / key[7]
                update(st.w if whole else st.w[:, sl], st.grad if whole else st.grad[:, sl],
                       st.w_star if whole else st.w_star[sl],
                       None if st.stat is None or not settings.preconditioned else (
                           st.stat if whole else st.stat[:, sl]),
                       lr=lr, nbeta=nbeta, gamma=gamma, settings=settings, counters=counters,
                       seed=seed, chain_ids=chain_ids,
                       mask=None if st.flat_mask is None else (st.flat_mask if whole else st.flat_mask[sl]),
                       index_offset=b.base + start)
        if wanted:
            self._record_metrics(keys, pre, seed, counters)
        self._step_count += 1
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffers in place (the gradients stay views of them, whatever set_to_none)."""
        for b in self._buckets:
            for p, (_, grad) in zip(b.params, b.views):
                if p.grad is not grad:
                    p.grad = grad
            b.state.grad.zero_()
        if self._metric_style == "sgmcmc":
            self.reset_metrics()

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["llc_fast"] = {"step": self._step_count, "seed": self._seed, "chain": self._chain}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load as torch does, then copy the per-parameter state back into the flat buffers (and re-point it)."""
        extra = state_dict.get("llc_fast", {})
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "llc_fast"})
        with torch.no_grad():
            for b in self._buckets:
                for p, off in zip(b.params, b.offsets):
                    size, st, fs = p.numel(), self.state[p], b.state
                    flat = {"initial_param": fs.w_star[off:off + size],
                            "square_avg": None if fs.stat is None else fs.stat[0, off:off + size]}
                    for key, buf in flat.items():
                        if buf is not None and key in st:
                            buf.copy_(st[key].reshape(-1))
                            st[key] = buf.view_as(p)
        self._step_count = extra.get("step", self._step_count)
        self._seed = extra.get("seed", self._seed)
        self._chain = extra.get("chain", self._chain)
        self._chain_ids = {b.device: torch.tensor([self._chain], dtype=torch.int64, device=b.device)
                           for b in self._buckets}

    def flat_buffers(self) -> list[dict]:
        """The flat buffers of each (device, dtype): w [1, N], grad [1, N], w_star [N], stat, mask."""
        return [dict(w=b.state.w, grad=b.state.grad, w_star=b.state.w_star, stat=b.state.stat,
                     mask=b.state.flat_mask, base=b.base, device=b.device, dtype=b.dtype) for b in self._buckets]

    # ---- devinterp's factory spellings ------------------------------------------------------------
    @classmethod
    def sgld(cls, params, lr=0.01, noise_level=1.0, weight_decay=0.0, localization=0.0, nbeta=1.0,
             bounding_box_size=None, mask=None, save_metrics: bool = False, sketch_dim=None, sketch_seed: int = 0,
             **kwargs):
        """devinterp's ``SGMCMC.sgld``: SGLD with localization (Lau et al. 2023)."""
        return cls._factory_made(SGLD(
            params, lr=lr, noise_level=noise_level, weight_decay=weight_decay, localization=localization, nbeta=nbeta,
            bounding_box_size=bounding_box_size, mask=mask, save_metrics=save_metrics, sketch_dim=sketch_dim, **kwargs))

    @classmethod
    def rmsprop_sgld(cls, params, lr=0.01, noise_level=1.0, weight_decay=0.0, localization=0.0, nbeta=1.0,
                     alpha=0.99, eps=0.1, add_grad_correction=False, bounding_box_size=None, mask=None,
                     save_metrics: bool = False, sketch_dim=None, sketch_seed: int = 0, **kwargs):
        """devinterp's ``SGMCMC.rmsprop_sgld``: RMSProp-preconditioned SGLD (V starts at 0, no bias correction)."""
        return cls._factory_made(RMSpropSGLD(
            params, lr=lr, noise_level=noise_level, weight_decay=weight_decay, localization=localization, nbeta=nbeta,
            alpha=alpha, eps=eps, add_grad_correction=add_grad_correction, bounding_box_size=bounding_box_size,
            mask=mask, save_metrics=save_metrics, sketch_dim=sketch_dim, **kwargs))

    @staticmethod
    def _factory_made(opt: "SGMCMC") -> "SGMCMC":
        """Metrics as devinterp's factories expose them (SGMCMC's, with a prior: distance tracked at gamma 0)."""
        opt._metric_style, opt._prior_always = "sgmcmc", True
        for group in opt.param_groups:
            for m in ("noise_norm", "grad_norm", "weight_norm", "distance"):
                group.pop(m, None)
            opt._init_metrics(group)
        return opt

    @classmethod
    def sgnht(cls, params, lr=0.01, diffusion_factor=0.01, nbeta=1.0, bounding_box_size=None, metrics=None,
              **kwargs):
        """devinterp 1.3.2's ``SGMCMC.sgnht`` as it computes: SGLD with noise_level sqrt(2*diffusion_factor), no
        localization, and the box (its NHT momentum and thermostat are never applied; ``sgnht.py``)."""
        return sgnht_factory(cls.sgld, params, lr=lr, diffusion_factor=diffusion_factor, nbeta=nbeta,
                             bounding_box_size=bounding_box_size, metrics=metrics, **kwargs)

    @classmethod
    def get_method(cls, method: str):
        methods = {"sgld": cls.sgld, "rmsprop_sgld": cls.rmsprop_sgld, "sgnht": cls.sgnht}
        if method not in methods:
            raise ValueError(f"`method` should be one of 'sgld', 'rmsprop_sgld', or 'sgnht'. Got {method}")
        return methods[method]


class SGLD(SGMCMC):
    """devinterp's ``SGLD``: w <- w - lr/2*(nbeta*g + localization*(w - w0) + weight_decay*w) + sqrt(lr)*xi,
    stepping with llc_fast's fused update (see ``SGMCMC``); its metrics are exposed as 1.x ``SGLD`` does."""

    _metric_style = "sgld"

    def __init__(self, params, lr: float = 0.01, noise_level: float = 1.0, weight_decay: float = 0.0,
                 localization: float = 0.0, nbeta: float = 1.0, bounding_box_size: float | None = None,
                 optimize_over=None, temperature: float | None = None, metrics=None, mask=None,
                 save_metrics: bool = False, sketch_dim: int | None = None, seed: int | None = None, chain: int = 0,
                 backend: str = "auto", **diagnostics):
        super().__init__(params, lr=lr, noise_level=noise_level, nbeta=nbeta, localization=localization,
                         weight_decay=weight_decay, bounding_box_size=bounding_box_size, mask=mask,
                         optimize_over=optimize_over, preconditioner="identity", temperature=temperature,
                         save_metrics=save_metrics, metrics=metrics, sketch_dim=sketch_dim, seed=seed, chain=chain,
                         backend=backend, **diagnostics)


class RMSpropSGLD(SGMCMC):
    """devinterp's RMSProp-SGLD (``SGMCMC.rmsprop_sgld``): G = 1/(sqrt(V) + eps), V <- alpha*V + (1-alpha)*g^2
    from V = 0 without bias correction, stepping with llc_fast's fused update (see ``SGMCMC``)."""

    def __init__(self, params, lr: float = 0.01, noise_level: float = 1.0, weight_decay: float = 0.0,
                 localization: float = 0.0, nbeta: float = 1.0, alpha: float = 0.99, eps: float = 0.1,
                 add_grad_correction: bool = False, bounding_box_size: float | None = None, optimize_over=None,
                 temperature: float | None = None, metrics=None, mask=None, save_metrics: bool = False,
                 sketch_dim: int | None = None, seed: int | None = None, chain: int = 0, backend: str = "auto",
                 **diagnostics):
        super().__init__(params, lr=lr, noise_level=noise_level, nbeta=nbeta, localization=localization,
                         weight_decay=weight_decay, bounding_box_size=bounding_box_size, mask=mask,
                         optimize_over=optimize_over, preconditioner="rmsprop",
                         preconditioner_kwargs=dict(alpha=alpha, eps=eps, add_grad_correction=add_grad_correction),
                         temperature=temperature, save_metrics=save_metrics, metrics=metrics, sketch_dim=sketch_dim,
                         seed=seed, chain=chain, backend=backend, **diagnostics)


def sampler_name(method) -> str:
    """llc_fast's sampler name for a devinterp sampling method: a string, one of this module's classes or
    factories, or devinterp's own (1.x / 2.x) classes and factories, recognised by name."""
    if isinstance(method, str):
        names = {"sgld": "sgld", "sgmcmc_sgld": "sgld", "rmsprop_sgld": "rmsprop_sgld"}
        if method not in names:
            raise ValueError(f"unknown sampling method {method!r}; use 'sgmcmc_sgld' (or 'sgld') or 'rmsprop_sgld'")
        return names[method]
    if isinstance(method, type) and issubclass(method, RMSpropSGLD):
        return "rmsprop_sgld"
    if isinstance(method, type) and issubclass(method, SGMCMC):
        return "sgld"
    name = getattr(method, "__name__", type(method).__name__)
    if name in ("SGLD", "sgld", "SGMCMC"):
        return "sgld"
    if name in ("RMSpropSGLD", "rmsprop_sgld"):
        return "rmsprop_sgld"
    if sampling_kind(method) is not None:  # SGNHT: sampler "sgnht"; SGMCMC.sgnht: SGLD (sgnht.sgnht_options)
        return "sgnht" if sampling_kind(method) == "sgnht" else "sgld"
    raise ValueError(
        f"unsupported sampling_method {method!r}: pass SGLD, RMSpropSGLD, SGMCMC.sgld or SGMCMC.rmsprop_sgld "
        "(llc_fast.compat.devinterp's or devinterp's own)")
