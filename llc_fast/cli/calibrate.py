"""``llc-fast calibrate``: try a grid of (lr, gamma, nbeta) settings in one batched run and recommend one.

The model comes from a user Python file that defines ``model``, ``data`` and ``loss_fn`` (and optionally
``nbeta``) at module level, as for ``llc_fast.calibrate(model, data, loss_fn, ...)``.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from .options import add_llc_options, llc_options

REQUIRED_NAMES = ("model", "data", "loss_fn")
#: estimate_llc's options that calibrate takes as its own (with its defaults: ``calibrate_defaults``)
CALIBRATE_OPTIONS = ("sampler", "num_draws", "num_burnin_steps", "mala_every", "seed", "progress")


def calibrate_defaults() -> dict:
    """calibrate's defaults of CALIBRATE_OPTIONS (e.g. mala_every=10), from its signature."""
    import inspect

    from ..studies.calibrate import calibrate

    params = inspect.signature(calibrate).parameters
    return {name: params[name].default for name in CALIBRATE_OPTIONS}


def load_script(path: str | Path) -> ModuleType:
    """Run the Python file at ``path`` as a module and check it defines model, data and loss_fn."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"script {str(path)!r} not found: pass the path of a Python file that defines "
                                f"{', '.join(REQUIRED_NAMES)}")
    spec = importlib.util.spec_from_file_location(f"llc_fast_user_script_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load {str(path)!r} as a Python module: pass a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))  # so the script can import its neighbours
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.resolve().parent))
    missing = [name for name in REQUIRED_NAMES if not hasattr(module, name)]
    if missing:
        raise ValueError(
            f"{path} does not define {', '.join(missing)} at module level; it must define model (a torch.nn.Module), "
            "data (a DataLoader or re-iterable of batches) and loss_fn(model, batch) -> scalar mean loss "
            "(and optionally nbeta)"
        )
    return module


def _calibrate(args: argparse.Namespace) -> int:
    from ..api import refuse_under_torchrun
    from ..studies.calibrate import calibrate

    try:
        refuse_under_torchrun("llc-fast calibrate", "run the same command without torchrun")
        script = load_script(args.script)
        nbetas = args.nbetas if args.nbetas is not None else (
            [script.nbeta] if getattr(script, "nbeta", None) is not None else None)
        calibration = calibrate(
            script.model, script.data, script.loss_fn, lrs=args.lrs, gammas=args.gammas, nbetas=nbetas,
            chains_per_setting=args.chains_per_setting, **llc_options(args))
    except (FileNotFoundError, ValueError) as e:
        print(f"llc-fast calibrate: error: {e}", file=sys.stderr)
        return 2
    print(calibration.table())
    print(calibration.recommendation())
    outputs = ((args.plot, calibration.plot), (args.table, calibration.to_csv), (args.output, calibration.save))
    for path, write in outputs:
        if path:
            write(path)
            print(f"written: {path}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="try a grid of lr/gamma/nbeta settings in one batched run and recommend one",
                       description="Run every (lr, gamma, nbeta) combination as chains of one LLC estimate and "
                                   "recommend a setting (see llc_fast.calibrate for the rule).")
    p.add_argument("--script", required=True,
                   help="Python file defining model, data and loss_fn(model, batch) (and optionally nbeta)")
    p.add_argument("--lrs", type=float, nargs="+", required=True, help="step sizes to try, e.g. 1e-4 3e-4 1e-3")
    p.add_argument("--gammas", type=float, nargs="+", default=[1.0], help="localization strengths (default: 1)")
    p.add_argument("--nbetas", type=float, nargs="+",
                   help="nbeta values (default: the script's nbeta, else n/log n of the data)")
    p.add_argument("--chains-per-setting", type=int, default=2)
    add_llc_options(p, CALIBRATE_OPTIONS, defaults=calibrate_defaults())
    p.add_argument("--plot", help="write the per-setting running-LLC panels to this PNG")
    p.add_argument("--table", help="write the table as CSV to this file")
    p.add_argument("--output", help="write the full CalibrationResult as JSON to this file")
    p.set_defaults(func=_calibrate)
