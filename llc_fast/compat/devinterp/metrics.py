"""devinterp's optimizer diagnostics (``metrics=[...]`` of ``SGMCMC``, the flags of 1.x ``SGLD``) for compat's
optimizers (``optim.SGMCMC`` mixes ``MetricsMixin`` in): computed beside the fused update from the flat buffers —
the pre-step weights, the gradient, the statistic the step used and the step's own counter-based noise,
regenerated — and exposed where devinterp exposes them; nothing is computed unless asked for."""
from __future__ import annotations

from collections import defaultdict

import torch

from ...kernels import philox
from ...kernels.update_spec import StepCounters

# devinterp's metrics (SGMCMC's valid set, as 1.3.2 and 2.0.1 check it), and 1.x SGLD's flags that switch them on.
VALID_METRICS = ("noise_norm", "grad_norm", "weight_norm", "distance", "noise", "dws", "localization_loss")
DIAGNOSTIC_FLAGS = {"save_noise": ("noise",), "save_mala_vars": ("dws", "localization_loss"),
                     "noise_norm": ("noise_norm",), "grad_norm": ("grad_norm",), "weight_norm": ("weight_norm",),
                     "distance": ("distance",)}


class MetricsMixin:
    """The diagnostics of ``optim.SGMCMC``: its ``_metric_dicts`` (one dict per param group), ``_metric_style``
    ("sgmcmc" or 1.x "sgld"), ``_buckets`` and ``_chain_ids`` are read here."""

    def _init_metrics(self, group: dict) -> None:
        """Fresh metric values of a param group: devinterp's SGMCMC keeps them in group["metrics"], 1.x SGLD
        its scalar ones as group keys (False when not tracked) and no "metrics" key."""
        gi = next(i for i, g in enumerate(self.param_groups) if g is group)
        names = group.get("metrics", self._metric_dicts[gi])
        names = list(names or [])
        invalid = set(names) - set(VALID_METRICS)
        if invalid:
            raise ValueError(f"Invalid metrics: {invalid}. Valid metrics are: {set(VALID_METRICS)}")
        device = next((p.device for p in group["params"]), torch.device("cpu"))
        met = self._metric_dicts[gi] = {m: [] if m in ("noise", "dws") else torch.zeros((), device=device)
                                        for m in names}
        if self._metric_style == "sgld":
            group.pop("metrics", None)
            for m in ("noise_norm", "grad_norm", "weight_norm", "distance"):
                group[m] = met[m] if m in met else False
        else:
            group["metrics"] = met

    def reset_metrics(self) -> None:
        """devinterp's reset (SGMCMC.zero_grad): fresh zero scalars and empty lists (fresh, so that a callback
        holding last step's lists keeps them)."""
        for group in self.param_groups:
            self._init_metrics(group)

    def _record_metrics(self, keys: list, pre: dict, seed: int, counters: StepCounters) -> None:
        """devinterp's metrics of this step, per param group, from the flat buffers.

        Meanings (devinterp 1.3.2 / 2.0.1; w the weights before the step, w0 the initial weights, m the mask,
        G the RMSProp preconditioner the step used, xi the step's standard normals):
          grad_norm   ||nbeta*lr/2*g||                  weight_norm  ||w after the step||
          noise       noise_level*xi per parameter (SGMCMC: times m; 1.x SGLD: unmasked, per group)
          noise_norm  ||m*noise_level*xi||
          dws         the drift per parameter: SGMCMC m*G*(nbeta*g + gamma*(w - w0) + wd*w); 1.x SGLD unmasked
                      nbeta*g + wd*w + gamma*(w - w0), all groups in one list (optimizer.dws)
          distance    SGMCMC ||w - w0|| (0 without a prior: gamma = 0 outside the factories); 1.x SGLD
                      ||m*(w - w0)|| with dws/localization_loss tracked, else ||gamma*(w - w0)||
          localization_loss  SGMCMC gamma/2*distance^2; 1.x SGLD sum over groups of gamma/2*||m*(w - w0)||^2
        """
        sgld = self._metric_style == "sgld"
        fresh = []
        for group in self.param_groups:
            self._init_metrics(group)
        for met in self._metric_dicts:
            fresh.append({m: [] if m in ("noise", "dws") else 0.0 for m in met})
        sgld_noise, sgld_dws, sgld_loc = defaultdict(list), [], 0.0
        for b in self._buckets:
            st = b.state
            cdt = torch.float64 if b.dtype == torch.float64 else torch.float32
            need_noise = any({"noise", "noise_norm"} & set(self._metric_dicts[gi]) for gi in b.groups)
            xi = (philox.gaussian_noise(seed, self._chain_ids[b.device], counters.step, b.base,
                                        st.w.shape[1])[0].to(cdt) if need_noise else None)
            for p, gi, slot in zip(b.params, b.groups, st.layout.slots):
                met, acc = self._metric_dicts[gi], fresh[gi]
                if not met:
                    continue
                lr, nbeta, gamma, wd, noise_level, _, _, eps = keys[gi]
                sl = slice(slot.offset, slot.offset + slot.numel)
                g = st.grad[0, sl].to(cdt)
                m = None if st.flat_mask is None else st.flat_mask[sl].to(cdt)
                if "grad_norm" in met:
                    acc["grad_norm"] += ((g * (nbeta * 0.5 * lr)) ** 2).sum()
                if "weight_norm" in met:
                    acc["weight_norm"] += (st.w[0, sl].to(cdt) ** 2).sum()
                if xi is not None and {"noise", "noise_norm"} & set(met):
                    noise = xi[sl] * noise_level
                    masked = noise if m is None else noise * m
                    if "noise_norm" in met:
                        acc["noise_norm"] += (masked ** 2).sum()
                    if "noise" in met:
                        (sgld_noise[gi] if sgld else acc["noise"]).append(
                            (noise if sgld else masked).view_as(p).to(p.dtype))
                if not {"dws", "distance", "localization_loss"} & set(met):
                    continue
                w = pre[b.device][sl].to(cdt)
                diff = w - st.w_star[sl].to(cdt)
                mdiff = diff if m is None else diff * m
                if "dws" in met:
                    drift = nbeta * g + gamma * diff + wd * w
                    if not sgld:
                        if st.stat is not None:
                            key = keys[gi]
                            drift = drift * ((1.0 / eps) if self._stat_frozen(key) else
                                             1.0 / (torch.sqrt(st.stat[0, sl].to(cdt)) + eps))
                        if m is not None:
                            drift = drift * m
                    (sgld_dws if sgld else acc["dws"]).append(drift.view_as(p).to(p.dtype))
                if sgld:
                    if self._mala_vars:
                        dist2 = (mdiff ** 2).sum()
                        sgld_loc = sgld_loc + dist2 * gamma / 2
                        acc["_mala_dist2"] = acc.get("_mala_dist2", 0.0) + dist2
                    else:
                        dist2 = ((diff * gamma) ** 2).sum()
                    if "distance" in met:
                        acc["distance"] += dist2
                elif gamma != 0 or self._prior_always:
                    acc["distance"] = acc.get("distance", 0.0) + (diff ** 2).sum()
        self._publish_metrics(keys, fresh, (sgld_noise, sgld_dws, sgld_loc))

    def _publish_metrics(self, keys: list, fresh: list[dict], sgld_lists: tuple) -> None:
        """The step's sums ``fresh`` (per group) made devinterp's values (norms, lists, localization loss) where
        devinterp keeps them; sgld_lists: 1.x SGLD's (noise by group, dws of all groups, localization loss)."""
        sgld = self._metric_style == "sgld"
        sgld_noise, sgld_dws, sgld_loc = sgld_lists
        for gi, group in enumerate(self.param_groups):
            met, acc = self._metric_dicts[gi], fresh[gi]
            device = next((p.device for p in group["params"]), None)
            for name in met:
                if name in ("noise", "dws"):
                    met[name] = acc[name]
                elif name != "localization_loss":  # a group with no sampled parameter keeps a float 0.0
                    met[name] = torch.as_tensor(acc[name], device=device).sqrt()
            if "localization_loss" in met:
                dist2 = acc.get("_mala_dist2", 0.0) if sgld else acc.get("distance", 0.0)
                met["localization_loss"] = torch.as_tensor(dist2 * keys[gi][2] / 2, device=device)
            if sgld:
                for m in ("noise_norm", "grad_norm", "weight_norm", "distance"):
                    group[m] = met[m] if m in met else False
        if sgld:
            self._sgld_views = {}
            if any("noise" in d for d in self._metric_dicts):
                self._sgld_views["noise"] = sgld_noise
            if self._mala_vars:
                self._sgld_views["dws"] = sgld_dws
                self._sgld_views["localization_loss"] = torch.as_tensor(sgld_loc)

    @property
    def metrics(self) -> dict:
        """The first param group's metrics (devinterp's ``SGMCMC.metrics``)."""
        return self._metric_dicts[0]

    @property
    def tracked_metrics(self) -> set:
        return set(self._metric_dicts[0])

    def __getattr__(self, name):
        """devinterp's metric attributes: ``optimizer.grad_norm``, ``optimizer.dws``, ... (first param group;
        1.x SGLD: ``noise`` by group, ``dws`` of all groups, ``localization_loss`` summed)."""
        groups = self.__dict__.get("param_groups")
        if name.startswith("_") or not groups:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        views = self.__dict__.get("_sgld_views") or {}
        if name in views:
            return views[name]
        dicts = self.__dict__.get("_metric_dicts") or [{}]
        met = dicts[0]
        if name in met:
            return met[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute or tracked metric '{name}'")
