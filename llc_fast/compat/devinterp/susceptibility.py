"""devinterp 2.0.1's ``susceptibilities`` and ``compute_susceptibilities`` on llc_fast's engine.

devinterp runs one ``sample()`` per weight restriction; here every restriction, "full" included, is a
component of ONE batched llc_fast run (``runs.sample_trees``): chain j of every restriction reads the same
batches and the same noise, so each restriction's chains are the ones ``sample(param_masks=...)`` would give
with the same seed. The per-restriction sampling DataTrees have devinterp's layout, and
``compute_susceptibilities`` is devinterp's estimator (arXiv:2504.18274, appendix C.4) with its output
layout: with A the mean over chains and draws, L(c, d) a restriction's mean sampling-task loss at a draw,
phi = L - mean(full.init_loss) and l(b, t) an observable's per-token loss,

    sus[b, t] = A(phi L) - A(phi l[b, t]) - A(phi) (mean(full L) - A(full l[b, t])),

no nbeta factor; the l - L difference is centred with the unrestricted run's mean (llc_fast's own
``estimate_susceptibilities`` centres with the restriction's own means).
"""
from __future__ import annotations

import inspect
from collections import defaultdict
from pathlib import Path

import numpy as np

from .runs import cached_output, make_plan, param_restriction, sample_trees, to_obs_id
from .v2 import sample


def susceptibilities(model, dataset, observables, weight_restrictions, *, sampling_task: str, lr: float,
                     n_beta: float, loss_fn=None, include_sampling_task: bool = False, **kwargs):
    """devinterp 2.0.1's ``susceptibilities``: sample every weight restriction and compute per-token
    susceptibilities. Returns an ``xarray.DataTree`` with /susceptibilities (``sus`` (sus_flat, wr)) and
    /context (``input_ids`` (ctx_flat,)).

    observables: {name: Dataset or (Dataset, batches_per_draw)}; sampling_task must be one of them.
    weight_restrictions: {name: param masks (``create_param_masks``) or None}, with a "full" key (the
        unrestricted model), which gets no susceptibility. All of them run as one batched llc_fast run.
    kwargs: ``sample``'s (num_chains, num_draws, batch_size, ...; llc_fast's backend, progress). With
        output_path, each restriction's samples are saved to (and, when there already, read back from) a
        separate zarr with its name appended, e.g. "samples_full.zarr", "samples_l0h1.zarr".
    """
    if "full" not in weight_restrictions:
        raise ValueError("weight_restrictions must include a 'full' key (use None for the full model).")
    if sampling_task not in observables:
        raise ValueError(f"sampling_task '{sampling_task}' not found in observables. Available: {list(observables)}")
    if not include_sampling_task and not [name for name in observables if name != sampling_task]:
        raise ValueError("Need at least one observable besides sampling_task (or set include_sampling_task=True).")
    if "param_masks" in kwargs:
        raise TypeError("susceptibilities() got multiple values for keyword argument 'param_masks' (give the "
                        "restrictions in weight_restrictions)")
    base = kwargs.pop("output_path", None)
    args = inspect.signature(sample).bind(model, dataset, observables, lr=lr, n_beta=n_beta, loss_fn=loss_fn,
                                          **kwargs)
    args.apply_defaults()
    plan = make_plan(dict(args.arguments))
    trees, todo, paths = {}, {}, {}
    for name, masks in weight_restrictions.items():
        if base is not None:
            b = Path(str(base))
            paths[name] = b.parent / f"{b.stem}_{name}{b.suffix}"
            cached = cached_output(paths[name], plan.config)
            if cached is not None:
                trees[name] = cached
                continue
        todo[name] = param_restriction(model, masks, f"weight_restrictions[{name!r}]")
    if todo:
        for name, tree in sample_trees(model, plan, todo).items():
            if name in paths:
                tree.to_zarr(str(paths[name]), consolidated=False)
            trees[name] = tree
    return compute_susceptibilities({name: trees[name] for name in weight_restrictions}, sampling_task,
                                    include_sampling_task=include_sampling_task)


def compute_susceptibilities(wr_map: dict, sampling_task: str, observable_names: list[str] | None = None,
                             include_sampling_task: bool = False):
    """devinterp 2.0.1's ``compute_susceptibilities``: per-token susceptibilities (module docstring) from
    sampling DataTrees (this layer's or devinterp's), {weight restriction name: tree} with a "full" key.

    observable_names: which observables (default all, but sampling_task unless include_sampling_task).
    Returns an ``xarray.DataTree`` with /susceptibilities and /context, as ``susceptibilities``.
    """
    import xarray as xr

    def dataset_of(tree):
        return tree if isinstance(tree, xr.Dataset) else tree.dataset

    full = dataset_of(wr_map["full"])
    sampling_id = to_obs_id(sampling_task)
    all_obs_ids = [str(v)[len("loss_"):] for v in full.data_vars
                   if str(v).startswith("loss_") and str(v) != "sampling_loss"]
    if observable_names is None:
        obs_ids = all_obs_ids if include_sampling_task else [oid for oid in all_obs_ids if oid != sampling_id]
    else:
        obs_ids = [to_obs_id(n) for n in observable_names]
    if not obs_ids:
        raise ValueError(
            f"No probe observables to compute susceptibilities for. Available loss_* observables: {all_obs_ids!r}; "
            f"sampling_task={sampling_id!r}; include_sampling_task={include_sampling_task}. Add a probe observable "
            f"distinct from the sampling task, or pass include_sampling_task=True.")

    full_sampling_mean = float(full[f"loss_{sampling_id}"].values.mean())
    init_loss_mean = float(full["init_loss"].values.mean())
    # mean over chain and draw, keeping (batch, target_position)
    full_delta = {oid: full_sampling_mean - full[f"loss_{oid}"].values.mean(axis=(0, 1)) for oid in obs_ids}

    results = []
    for wr_name, wr in wr_map.items():
        if wr_name == "full":
            continue
        ds = dataset_of(wr)
        for oid in [sampling_id, *obs_ids]:
            expected = ("chain", "draw", f"batch_{oid}", "token_pos")
            assert ds[f"loss_{oid}"].dims == expected, f"loss_{oid} has dims {ds[f'loss_{oid}'].dims}, expected {expected}"
        pt_mean = ds[f"loss_{sampling_id}"].values.mean(axis=(-2, -1))  # (chain, draw)
        phi = pt_mean - init_loss_mean
        e_phi, e_phi_wr = float(phi.mean()), float((phi * pt_mean).mean())
        for oid in obs_ids:
            probe = ds[f"loss_{oid}"].values  # (chain, draw, batch, token_pos)
            e_phi_probe = (phi[:, :, None, None] * probe).mean(axis=(0, 1))
            sus = e_phi_wr - e_phi_probe - e_phi * full_delta[oid]
            sus_da = xr.DataArray(sus, dims=["batch", "target_position"],
                                  coords={"target_position": np.arange(1, sus.shape[1] + 1)})
            ids = ds[f"input_ids_{oid}"].values
            while ids.ndim > 2:
                ids = ids[0]
            ids_da = xr.DataArray(ids, dims=["batch", "position"], coords={"position": np.arange(ids.shape[1])})
            results.append((wr_name, oid, sus_da, ids_da))
    return _build_output(results)


def _build_output(results: list):
    """devinterp's SusceptibilitiesV2 DataTree from (wr, obs, sus, ids): ``sus`` flattened to (sus_flat, wr),
    observable by observable (sorted ids) then row-major (batch, target_position); ``input_ids`` to (ctx_flat,)."""
    import xarray as xr

    sus_by_wr, all_ids, wr_order = defaultdict(dict), defaultdict(dict), []
    for wr_name, obs, sus, ids in results:
        sus_by_wr[wr_name][obs] = sus
        all_ids[wr_name][obs] = ids
        if wr_name not in wr_order:
            wr_order.append(wr_name)
    obs_order = sorted(sus_by_wr[wr_order[0]].keys())
    first_wr = wr_order[0]
    for obs in obs_order:
        for wr in wr_order[1:]:
            if not np.array_equal(all_ids[first_wr][obs].values, all_ids[wr][obs].values):
                raise AssertionError(f"input_ids for {obs} differ between {first_wr} and {wr}")
    ids_items = {i: (obs, all_ids[first_wr][obs]) for i, obs in enumerate(obs_order)}
    ids_data = np.concatenate([v.values.ravel() for _, v in ids_items.values()])
    sus_items = {i: (obs, sus_by_wr[first_wr][obs]) for i, obs in enumerate(obs_order)}
    sus_data = np.concatenate([np.stack([sus_by_wr[wr][obs].values.ravel() for wr in wr_order], axis=-1)
                               for obs in obs_order], axis=0)
    return xr.DataTree.from_dict({
        "/susceptibilities": xr.Dataset(
            {"sus": xr.DataArray(sus_data, dims=["sus_flat", "wr"])},
            coords=_flat_coords(sus_items, "sus_flat").merge(xr.Coordinates({"wr": wr_order})),
            attrs={"dataset_id_to_name": obs_order}),
        "/context": xr.Dataset(
            {"input_ids": xr.DataArray(ids_data, dims=["ctx_flat"])},
            coords=_flat_coords(ids_items, "ctx_flat"),
            attrs={"dataset_id_to_name": obs_order}),
    })


def _flat_coords(items: dict, dim_name: str):
    """Flattened coordinates (dataset_id and each dim's grid) of per-observable DataArrays."""
    import xarray as xr

    coords: dict[str, list] = {"dataset_id": []}
    for i, (_, var) in items.items():
        coords["dataset_id"].append(np.full(var.size, i))
        grids = np.meshgrid(*[var.coords[d].values for d in var.dims], indexing="ij")
        for dim, grid in zip(var.dims, grids):
            coords.setdefault(str(dim), []).append(grid.ravel())
    return xr.Coordinates({k: (dim_name, np.concatenate(v)) for k, v in coords.items()}, indexes={})
