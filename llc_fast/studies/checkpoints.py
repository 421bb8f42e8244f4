"""LLC over training checkpoints: the same estimate at every checkpoint, with common random numbers.

``estimate_over_checkpoints`` estimates every component at every checkpoint with the same seed, so every
checkpoint sees the same noise and batch order and differences between checkpoints are not sampling noise.
The components of one checkpoint are one batched run (``estimate_restricted_llcs``: each component's chains
are those ``estimate_llc(mask=component)`` samples). Each finished estimate is written to ``save_dir``; a
rerun of the same call skips the ones already there (their settings are checked), so a killed sweep
continues where it stopped and ends with the table of an uninterrupted one. Components are weight
restrictions (the restricted LLC of each part), giving a [checkpoint x component] table.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..api import (EVAL_OPTIONS, estimate_llc, estimate_restricted_llcs, observers_for, options_config,
                   refuse_eval_sets_under_torchrun, refuse_under_torchrun)
from ..chains.identity import check_same, normalised
from ..config import DEFAULTS, LLCConfig
from ..estimators.llc import run_identity
from ..estimators.restricted import FULL, resolve_components
from ..estimators.output import settings_as_json
from ..estimators.result import LLCResult
from ..files import check_name_for_file, write_atomically
from .calibrate import calibrate as run_calibration
from .calibrate import calibration_run
from .checkpoint_result import CheckpointRow, CheckpointSweepResult
from .probe import ProbeResult, check_probe_options, perturbation_probe


_STEP = re.compile(r"(\d+)(?!.*\d)")


def _step_of(name: str) -> int:
    m = _STEP.search(name)
    if m is None:
        raise ValueError(f"cannot read a training step from {name!r}: name checkpoints with their step, e.g. "
                         "checkpoint-1000 or step_1000.pt")
    return int(m.group(1))


def checkpoint_list(checkpoints, model: torch.nn.Module | None = None,
                    dtype: torch.dtype | None = None) -> list[tuple[int, Callable[[], torch.nn.Module]]]:
    """(step, loader of the model at that step) for each checkpoint, ascending by step.

    checkpoints: a directory (HF ``save_pretrained`` sub-directories, or ``torch.save`` files of state dicts or
    modules, each named with its step), or a sequence of (step, model | state_dict | path). State dicts need
    ``model``, a module of the same architecture (it is copied, never changed). dtype: of HF checkpoints
    (default: the model's, else float32).
    """
    if isinstance(checkpoints, (str, os.PathLike)):
        root = Path(checkpoints)
        if not root.is_dir():
            raise FileNotFoundError(f"checkpoint directory {root} does not exist")
        entries = [p for p in root.iterdir() if (p.is_dir() and (p / "config.json").is_file())
                   or p.suffix in (".pt", ".pth", ".bin")]
        if not entries:
            raise ValueError(f"{root} holds no checkpoints (sub-directories with a config.json, or .pt/.pth files)")
        checkpoints = [(_step_of(p.name), p) for p in entries]
    out = []
    for item in checkpoints:
        try:
            step, what = item
        except (TypeError, ValueError):
            raise TypeError("each checkpoint must be (step, model | state_dict | path)") from None
        out.append((int(step), _loader(what, model, dtype)))
    steps = [s for s, _ in out]
    if len(set(steps)) != len(steps):
        raise ValueError(f"two checkpoints have the same step: {sorted(steps)}")
    return sorted(out, key=lambda x: x[0])


def _loader(what, template, dtype=None):
    if isinstance(what, torch.nn.Module):
        return lambda: what
    if isinstance(what, Mapping):
        return lambda: _from_state_dict(what, template)
    path = Path(what)
    if path.is_dir():
        from ..integrations.hf import load_causal_lm

        if dtype is None:
            dtype = next(template.parameters()).dtype if template is not None else torch.float32
        return lambda: load_causal_lm(path, dtype)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")

    def load():
        obj = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(obj, torch.nn.Module):
            return obj
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        return _from_state_dict(obj, template)

    return load


def _from_state_dict(state: Mapping, template) -> torch.nn.Module:
    if template is None:
        raise ValueError("a checkpoint is a state dict: pass model= (a module of the same architecture) to load it")
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model


def component_masks(model: torch.nn.Module, components) -> dict[str, dict | None]:
    """{name: estimate_llc mask} of ``components`` (``estimators.restricted.resolve_components``); None: the
    full LLC only."""
    if components is None:
        return {FULL: None}
    return resolve_components(model, components, include_full=isinstance(components, str))


def estimate_over_checkpoints(checkpoints, data, loss_fn: Callable, *, model: torch.nn.Module | None = None,
                              components=None, save_dir: str | os.PathLike | None = None,
                              calibrate: dict | None = None, calibrate_at="first", dtype: torch.dtype | None = None,
                              probe: dict | None = None, **options) -> CheckpointSweepResult:
    """``estimate_llc`` at every checkpoint (and component), the same seed throughout (see module docstring).

    checkpoints: see ``checkpoint_list``. data: a loader used for every checkpoint, or a callable
    ``data(step) -> loader``. components: {name: parameter-name globs | mask dict}, or "layers", "heads",
    "attn-mlp", "embeddings" (``llc_fast.integrations.components``); None: the full LLC.
    save_dir: where each estimate is written as it completes (``step<step>_<component>.json``) and read back on
    a rerun. dtype: of HF checkpoint directories. probe: ``perturbation_probe``'s keyword arguments (radii=...,
    kind=...) to run the probe at every checkpoint too (same seed). calibrate: a grid for ``llc_fast.calibrate`` (e.g. dict(lrs=[...], gammas=[...], nbetas=[...],
    num_draws=200)) run at ``calibrate_at`` ("first", "last", a step, or "each"); its recommended lr, gamma
    and nbeta are then used. options: estimate_llc's keyword arguments (lr, nbeta, num_chains, seed, ...).
    Every option of every stage (options, calibrate, probe) and every component name that becomes a file name
    under save_dir (letters, digits, spaces and _ - . + = ,) is checked before the first checkpoint is loaded.
    """
    items = checkpoint_list(checkpoints, model, dtype)
    data_at = data if callable(data) and not hasattr(data, "__iter__") else (lambda step: data)
    save = Path(save_dir) if save_dir is not None else None
    _check_up_front(data if data_at is not data else None, components, save, calibrate, probe, options)
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
    options = dict(options)
    calibration: dict = {}
    if calibrate is not None:
        chosen = _calibration_steps(items, calibrate_at)
        for step, load in items:
            if step in chosen:
                calibration[step] = _calibrated(step, load(), data_at(step), loss_fn, calibrate, options, save)
    rows, probes = [], {}
    for step, load in items:
        settings = dict(options)
        if calibration:
            at = step if calibrate_at == "each" else next(iter(calibration))
            settings.update({k: calibration[at][k] for k in ("lr", "gamma", "nbeta")})
        model_at = load()
        masks = component_masks(model if model is not None else model_at, components)
        question = Question(model_at, data_at(step), loss_fn, settings)
        files = {comp: save / f"step{step}_{comp}.json" if save is not None else None for comp in masks}
        results = {comp: _saved(files[comp], question.of_estimate(mask), _with_fingerprint(LLCResult))
                   for comp, mask in masks.items()}
        todo = {comp: masks[comp] for comp, result in results.items() if result is None}
        if todo:  # every missing component of this checkpoint in one batched run
            if len(todo) == 1:
                (comp, mask), = todo.items()
                fresh = {comp: estimate_llc(model_at, data_at(step), loss_fn, mask=mask, **settings)}
            else:
                fresh = estimate_restricted_llcs(model_at, data_at(step), loss_fn, todo, **settings).results
            for comp, result in fresh.items():
                if files[comp] is not None:
                    result.save(files[comp])
                results[comp] = result
        rows += [_row(step, comp, results[comp], files[comp]) for comp in masks]
        if probe is not None:
            probes[step] = _probed(save / f"probe_step{step}.json" if save is not None else None, question,
                                   dict(dict(seed=options.get("seed", 0)), **probe))
    return CheckpointSweepResult(rows, settings_as_json(options), {str(k): v for k, v in calibration.items()}, probes)


def _check_up_front(data, components, save: Path | None, calibrate, probe, options: dict) -> None:
    """Every option of every stage of ``estimate_over_checkpoints`` checked before any checkpoint is loaded or
    sampled: estimate_llc's options (one LLCConfig, and the data when it is one loader for every step), the
    calibration grid, the probe's options, the component names that become file names under ``save``, and what
    a torchrun run cannot do."""
    call = "estimate_over_checkpoints"
    if "mask" in options:
        raise ValueError(f"{call} takes components=, not mask=: e.g. components={{'attn': ['*.attn.*']}}")
    for name, value in (("calibrate", calibrate), ("probe", probe)):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"{call}: {name}= takes a dict of keyword arguments, got {type(value).__name__}")
    if isinstance(components, str) or (isinstance(components, Mapping) and len(components) > 1):
        refuse_under_torchrun(f"{call}(components=...) with several components (one batched run per checkpoint)",
                              "launch it without torchrun, or call it once per component, e.g. components="
                              "{'attn': [...]}")
    refuse_eval_sets_under_torchrun(call, options.get("eval_data"), options.get("refine"))
    if save is not None and isinstance(components, Mapping):
        for name in components:
            check_name_for_file(name, "component", f"{save / 'step<step>_<name>.json'}")
    fixed = {k: v for k, v in options.items() if k not in EVAL_OPTIONS}
    if calibrate is not None:  # the calibration chooses lr, gamma and nbeta; its first setting stands in for them
        settings, _ = calibration_run(_calibration_kwargs(options, calibrate), caller=f"{call}(calibrate=...)")
        fixed.update(zip(("lr", "gamma", "nbeta"), settings[0]))
    elif "lr" not in options:
        raise TypeError(f"{call} needs lr= (the SGLD step size), or calibrate={{'lrs': [...]}} to choose it")
    config = options_config(call, fixed)
    if data is not None:
        config.for_data(data)
    if probe is not None:
        check_probe_options(dict(dict(seed=options.get("seed", 0)), **probe), caller=f"{call}(probe=...)")


def _calibration_kwargs(options: dict, grid: Mapping) -> dict:
    """calibrate's keyword arguments at a checkpoint: the sweep's options but those the calibration sets, then the
    grid."""
    return dict({k: v for k, v in options.items() if k not in ("lr", "gamma", "nbeta", "num_chains")}, **grid)


def _calibration_steps(items, at) -> set:
    steps = [s for s, _ in items]
    if at == "each":
        return set(steps)
    if at == "first":
        return {steps[0]}
    if at == "last":
        return {steps[-1]}
    if at not in steps:
        raise ValueError(f"calibrate_at={at!r} is not a checkpoint step ({steps}); or pass 'first', 'last', 'each'")
    return {at}


def _calibrated(step, model, data, loss_fn, grid, options, save) -> dict:
    """The recommended lr, gamma, nbeta of ``calibrate`` at this checkpoint: read back from the save_dir when the
    saved calibration answers the same question (``Question``), else run and saved."""
    file = save / f"calibration_step{step}.json" if save is not None else None
    kw = _calibration_kwargs(options, grid)
    fingerprint = Question(model, data, loss_fn, options).of(run_calibration, kw)
    saved = _saved(file, fingerprint, _json_with_fingerprint)
    if saved is not None:
        return saved
    cal = run_calibration(model, data, loss_fn, **kw)
    if cal.recommended is None:
        raise ValueError(f"calibration at step {step} recommends no setting: {cal.reason}")
    best = dict(lr=cal.recommended.lr, gamma=cal.recommended.gamma, nbeta=cal.recommended.nbeta, reason=cal.reason)
    if file is not None:
        write_atomically(file, json.dumps(dict(best, fingerprint=fingerprint), indent=1))
    return best


class Question:
    """What an estimate, probe or calibration at one checkpoint answers, as fingerprints to compare with a saved
    one before reusing it: every resolved option, the mask's content, the data at w*, the weights
    (``LLCConfig.fingerprint``, ``chains.identity``)."""

    def __init__(self, model, data, loss_fn, options: dict):
        self.model, self.data, self.loss_fn, self.options = model, data, loss_fn, options
        eval_options = {k: v for k, v in options.items() if k in EVAL_OPTIONS}
        self.identity = run_identity(model, data, loss_fn, seed=options.get("seed", DEFAULTS["seed"]),
                                     num_batches=options.get("num_init_loss_batches",
                                                             DEFAULTS["num_init_loss_batches"]),
                                     observers=observers_for(**eval_options))

    def of_estimate(self, mask) -> dict:
        """The fingerprint ``estimate_llc(model, data, loss_fn, mask=mask, **options)`` records."""
        config = LLCConfig(mask=mask, **{k: v for k, v in self.options.items() if k not in EVAL_OPTIONS})
        return config.for_data(self.data).replace(identity=self.identity).fingerprint()

    def of(self, fn: Callable, options: dict) -> dict:
        """The fingerprint of ``fn(model, data, loss_fn, **options)`` (a probe, a calibration): its options with
        their defaults, the data and the weights."""
        bound = inspect.signature(fn).bind(None, None, None, **options)
        bound.apply_defaults()
        resolved = {k: v for k, v in bound.arguments.items() if k not in ("model", "data", "loss_fn", "progress")}
        return normalised(dict(function=fn.__name__, options=resolved, identity=self.identity))


def _saved(file, fingerprint: dict, load: Callable):
    """What ``file`` holds when it answers the question of ``fingerprint`` (None when there is no file);
    load(file) -> (what it holds, the fingerprint saved with it). A file that answers another question is
    refused, naming each difference: recomputing it would overwrite it."""
    if file is None or not file.is_file():
        return None
    held, saved = load(file)
    if saved is None:
        raise ValueError(f"{file} holds no fingerprint (written by an older llc_fast), so it cannot be shown to answer "
                         "this question: delete it to recompute it, or use another save_dir")
    check_same(saved, fingerprint, str(file), f"delete {file} to recompute it, or use another save_dir")
    return held


def _with_fingerprint(cls):
    """A ``_saved`` loader of a result class whose ``config`` records its fingerprint."""
    return lambda file: (lambda r: (r, r.config.get("fingerprint")))(cls.load(file))


def _json_with_fingerprint(file) -> tuple[dict, dict | None]:
    held = json.loads(Path(file).read_text())
    return held, held.get("fingerprint")


def _probed(file, question: Question, options: dict) -> ProbeResult:
    """The perturbation probe of ``options`` at this checkpoint: read back from ``file`` when it answers the same
    question, else run (and saved to ``file``)."""
    fingerprint = question.of(perturbation_probe, options)
    saved = _saved(file, fingerprint, _with_fingerprint(ProbeResult))
    if saved is not None:
        return saved
    result = perturbation_probe(question.model, question.data, question.loss_fn, **options)
    result.config["fingerprint"] = fingerprint
    if file is not None:
        result.save(file)
    return result


def _row(step: int, comp: str, result: LLCResult, file) -> CheckpointRow:
    d = result.diagnostics()
    return CheckpointRow(step=step, component=comp, llc_mean=result.llc_mean, llc_std=result.llc_std,
                         llc_stderr=result.llc_stderr, mcse=d["mcse"], rhat=d["rhat"], trusted=bool(d["ok"]),
                         verdict=d["verdict"], diverged=len(result.diverged_chains),
                         result_file=str(file) if file is not None else "")


__all__ = ["estimate_over_checkpoints", "CheckpointSweepResult", "CheckpointRow", "checkpoint_list", "component_masks"]
