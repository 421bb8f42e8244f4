"""Weight-restricted LLCs of many components from one batched run: the components and the result.

``resolve_components(model, components)`` turns {name: parameter-name patterns | {param: 0/1 tensor}}
(or the name of a standard set) into the restrictions the run samples; ``RestrictedLLCResult`` holds
one ``LLCResult`` per component, indexable by name, with a table, CSV, JSON and a bar chart.
"""
from __future__ import annotations

import csv
import difflib
import fnmatch
import io
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..files import SavedAsJson, write_atomically
from .output import json_values_only, pyplot
from .result import LLCResult

FULL = "full"


def resolve_components(model: torch.nn.Module, components, include_full: bool = False) -> dict[str, dict | None]:
    """{name: restriction} from ``components``: {name: list of parameter-name patterns (exact names or globs
    such as ``"layers.3.*"``) | {param name: 0/1 tensor or None} | None (the whole model)}, or the name of a
    standard set ("layers", "heads", "attn-mlp", "embeddings": ``integrations.components``). include_full:
    add the unrestricted "full" component first. Components may overlap (each is its own restriction). A tied
    alias (GPT-2's ``lm_head.weight``, tied to ``transformer.wte.weight``) names the tensor it is tied to:
    sampling it samples that one tensor, under every name, and the restriction names it by its first name.
    Raises ValueError naming the component whose patterns match nothing."""
    if isinstance(components, str):
        from ..integrations.components import standard

        out = standard(model, components, full=False)
    elif isinstance(components, Mapping):
        if not components:
            raise ValueError("components is empty: give {name: parameter patterns}, e.g. {'layer0': ['layers.0.*']}")
        from ..state.flat import FlatLayout

        aliases = FlatLayout(model).aliases
        names = [n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
        out = {}
        for comp, spec in components.items():
            if not isinstance(comp, str) or not comp:
                raise ValueError(f"component names must be non-empty strings, got {comp!r}")
            out[comp] = _restriction(comp, spec, names, aliases)
    else:
        raise TypeError(f"components must be a dict {{name: parameter patterns}} or one of 'layers', 'heads', "
                        f"'attn-mlp', 'embeddings', got {type(components).__name__}")
    if include_full and FULL not in out:
        out = {FULL: None, **out}
    return out


def _restriction(comp: str, spec, names: list[str], aliases: dict[str, str]) -> dict | None:
    """One component's restriction; a pattern matching a tied alias names the tensor it is tied to."""
    if spec is None or spec == FULL:
        return None
    if isinstance(spec, Mapping):
        if not spec:
            raise ValueError(f"component {comp!r} is an empty restriction: it would sample nothing")
        return dict(spec)
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns:
        raise ValueError(f"component {comp!r} has no patterns: give parameter names or globs such as 'layers.0.*'")
    hit = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"component {comp!r}: patterns must be non-empty strings, got {pattern!r}")
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            close = difflib.get_close_matches(pattern, names, n=3)
            raise ValueError(f"component {comp!r}: the pattern {pattern!r} matches no trainable parameter"
                             f"{f' (similar: {close})' if close else ''}; parameters: {names[:12]}"
                             f"{' ...' if len(names) > 12 else ''}")
        hit += [n for n in matched if n not in hit]
    return {aliases.get(n, n): None for n in hit}


@dataclass
class RestrictedLLCResult(SavedAsJson):
    """Restricted LLCs of several components from one run: ``result[name]`` is that component's ``LLCResult``
    (its chain j shares batches and noise with chain j of every other component). ``names``: the components
    in order; ``timing``, ``facts``: of the whole run (one clock for all components)."""

    results: dict[str, LLCResult]
    timing: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.results)

    def __getitem__(self, name: str) -> LLCResult:
        try:
            return self.results[name]
        except KeyError:
            raise KeyError(f"no component {name!r}; components: {self.names}") from None

    def __iter__(self):
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def items(self):
        return self.results.items()

    def rows(self) -> list[dict]:
        """One dict per component: name, num_params, llc_mean, llc_std, llc_stderr, mcse, rhat, trusted and verdict
        (``LLCResult.diagnostics``; NaN, None and "" without ArviZ), diverged (count), and ``refined[<set>]_mean``
        for each data-refined estimate: a set's name never takes the place of another column."""
        out = []
        for name, r in self.results.items():
            d = _diagnostics(r)
            row = dict(name=name, num_params=r.config.get("num_params"), llc_mean=r.llc_mean, llc_std=r.llc_std,
                       llc_stderr=r.llc_stderr, mcse=d["mcse"], rhat=d["rhat"], trusted=d["ok"], verdict=d["verdict"],
                       diverged=len(r.diverged_chains))
            for subset, refined in r.refined.items():
                row[refined_column(subset)] = refined.llc_mean
            out.append(row)
        return out

    def table(self) -> str:
        """The rows as aligned text (the verdict last)."""
        rows = self.rows()
        extra = [k for k in (rows[0] if rows else {}) if k.startswith(REFINED_PREFIX)]
        width = max([9] + [len(r["name"]) for r in rows])
        head = f"{'component':<{width}} {'#params':>10} {'LLC':>10} {'± std':>9} {'stderr':>9} {'MCSE':>9} " \
               f"{'R-hat':>7} {'diverged':>8}" + "".join(f" {k:>{max(12, len(k))}}" for k in extra) + "  verdict"
        lines = [head]
        for r in rows:
            trust = "" if r["trusted"] is None else "trust: " if r["trusted"] else "do not trust: "
            lines.append(f"{r['name']:<{width}} {r['num_params'] or 0:>10} {r['llc_mean']:>10.4g} {r['llc_std']:>9.3g} "
                         f"{r['llc_stderr']:>9.3g} {r['mcse']:>9.3g} {r['rhat']:>7.3f} {r['diverged']:>8}"
                         + "".join(f" {r[k]:>{max(12, len(k))}.4g}" for k in extra) + f"  {trust}{r['verdict']}")
        return "\n".join(lines)

    def to_csv(self, path: str | os.PathLike | None = None) -> str | Path:
        """The rows as CSV (NaN as an empty field): written atomically to ``path``, or returned as text."""
        rows = self.rows()
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["name"], lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()})
        return out.getvalue() if path is None else write_atomically(path, out.getvalue())

    def to_dict(self) -> dict:
        return dict(results={n: r.to_dict() for n, r in self.results.items()}, timing=self.timing,
                    facts=json_values_only(self.facts))

    @classmethod
    def from_dict(cls, d: dict) -> "RestrictedLLCResult":
        return cls({n: LLCResult.from_dict(r) for n, r in d["results"].items()}, d.get("timing", {}),
                   d.get("facts", {}))

    def plot(self, path: str | os.PathLike | None = None):
        """A bar per component: lambda_hat with ± 2 standard errors (the larger of the MCSE and the stderr over
        chains); hatched bars: the diagnostics say do not trust yet. Returns the figure (needs matplotlib)."""
        plt = pyplot(headless=path is not None)
        rows = self.rows()
        fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(rows) + 2.0), 4.2))
        x = np.arange(len(rows))
        y = np.array([r["llc_mean"] for r in rows], dtype=float)
        se = np.fmax(np.array([r["mcse"] for r in rows], dtype=float), np.array([r["llc_stderr"] for r in rows]))
        trusted = [r["trusted"] is not False for r in rows]
        bars = ax.bar(x, np.nan_to_num(y), yerr=2 * np.nan_to_num(se), capsize=3, color="tab:blue", alpha=0.8)
        for bar, ok in zip(bars, trusted):
            if not ok:
                bar.set_hatch("//")
                bar.set_alpha(0.45)
        ax.set_xticks(x, [r["name"] for r in rows], rotation=60 if len(rows) > 6 else 0, ha="right" if len(rows) > 6
                      else "center", fontsize=7)
        ax.set(ylabel="restricted LLC λ̂ ± 2 SE", title="LLC per component, one batched run "
               "(hatched: diagnostics say do not trust yet)")
        ax.title.set_fontsize(8)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


REFINED_PREFIX = "refined["


def refined_column(subset: str) -> str:
    """The table's and CSV's column of a data-refined estimate: ``refined[<subset>]_mean``, outside the
    namespace of the other columns whatever the subset is called."""
    return f"{REFINED_PREFIX}{subset}]_mean"


def _diagnostics(result: LLCResult) -> dict:
    """mcse, rhat, ok and verdict of ``result.diagnostics()``; NaN, None and "" when ArviZ is missing."""
    try:
        d = result.diagnostics()
    except ImportError:
        return dict(mcse=math.nan, rhat=math.nan, ok=None, verdict="")
    return dict(mcse=float(d["mcse"]), rhat=float(d["rhat"]), ok=bool(d["ok"]), verdict=d["verdict"])
