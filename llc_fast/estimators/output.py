"""What every result type uses to write itself: JSON values (NaN as null and back, settings and facts as JSON
values) and matplotlib's pyplot with its tick labels. Results (``estimators``) and studies (``studies``) import
these from here; files are written by ``llc_fast.files``."""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch


def nan_to_none(x):
    """``x`` (a number or nested lists of them) with every non-finite float as None (JSON's null)."""
    if isinstance(x, list):
        return [nan_to_none(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def none_to_nan(x):
    """``nan_to_none`` undone: every None (nested lists included) as NaN."""
    if isinstance(x, list):
        return [none_to_nan(v) for v in x]
    return math.nan if x is None else x


def settings_as_json(d: dict) -> dict:
    """Options as JSON values: tensors and arrays as lists, a mapping (a mask) as its sorted keys, a device as its
    name; other values as they are."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (torch.Tensor, np.ndarray)):
            v = v.tolist()
        elif isinstance(v, Mapping):
            v = sorted(v)
        elif isinstance(v, torch.device):
            v = str(v)
        out[k] = v
    return out


def json_values_only(d: dict) -> dict:
    """The entries of ``d`` whose values are JSON values already (str, int, float, bool, list, dict, None)."""
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}


def pyplot(headless: bool):
    """matplotlib.pyplot (with the Agg backend when writing files only); a clear error if missing."""
    try:
        import matplotlib
        if headless:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from e
    return plt


def thinned_ticks(ax, axis: str, labels: list[str], most: int = 16, fontsize: int = 7) -> None:
    """Label at most ``most`` of the positions 0..n-1 of ``axis`` ("x" or "y") with ``labels`` (every k-th, the first
    included), x labels rotated when there are more than 8, so that tick labels never overlap."""
    every = max(1, math.ceil(len(labels) / most))
    shown = list(range(0, len(labels), every))
    if axis == "x":
        tilt = dict(rotation=45, ha="right") if len(shown) > 8 else {}
        ax.set_xticks(shown, [labels[i] for i in shown], fontsize=fontsize, **tilt)
    else:
        ax.set_yticks(shown, [labels[i] for i in shown], fontsize=fontsize)
