"""``llc-fast bif``: Bayesian influence functions of a HuggingFace causal LM between a query and a train token set.

    llc-fast bif --model DIR --query query.npy --train train.npy --lr 1e-4 --nbeta 30 --output bif.json

samples the chains on --data (default: the train set) and measures the per-token (``--per sequence``: per-row)
losses of every row of --query and --train at every draw (``llc_fast.estimate_bif``); writes bif.json (the
``BIFResult``; ``BIFResult.load`` reads it), bif.nc (NetCDF: bif, bif_stderr [component, query, train]) and bif.png
(a heat map; skipped, saying so, without matplotlib). With ``--components`` (a standard set) or
``--components-file`` one matrix per component, from one batched run. Every input is checked before the model is
loaded, as ``llc-fast restricted`` does: the outputs (an existing one needs ``--force``), the three token files,
``--checkpoint``/``--resume`` and every sampler option. Ctrl-C writes OUT.partial.json and says how to resume.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .study import run_study, study_outputs, write_plot

PROG = "llc-fast bif"
SUFFIXES = (".json", ".nc", ".png")


def _bif(args: argparse.Namespace) -> int:
    def checked():
        outputs = study_outputs(args, SUFFIXES)
        return (*_checked_inputs(args), outputs)

    return run_study(args, PROG, "run the same command without torchrun (one batched run in one process)", checked,
                     lambda model, sets, components, outputs: _run(args, model, sets, components, outputs))


def _rows(args: argparse.Namespace, flag: str, path: str, limits: tuple):
    """The token rows of ``path`` (read as --data is), checked against the model's vocabulary and positions."""
    from ..integrations import hf

    try:
        rows = hf.load_tokens(path, seq_len=args.seq_len, token_dtype=args.token_dtype, column=args.column)
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {path} does not exist") from None
    try:
        hf.check_tokens(rows, *limits)
    except ValueError as e:
        raise ValueError(f"{flag} {path}: {e}") from None
    return rows


def _checked_inputs(args: argparse.Namespace):
    """(model, {"data", "query", "train": token rows}, components or None): every file and option checked, then
    the model loaded and the components resolved against it (nothing sampled yet)."""
    from ..api import options_config
    from ..estimators.restricted import resolve_components
    from ..integrations import hf
    from .estimate import check_run_files
    from .options import llc_options
    from .restricted import read_components_file

    limits = hf.model_limits(args.model)
    sets = {name: _rows(args, f"--{name}", path, limits) for name, path in (
        ("query", args.query), ("train", args.train), ("data", args.data or args.train))}
    hf.token_loader(sets["data"], args.batch_size)  # checks the batch size against the sampling rows
    check_run_files(args)
    options_config(PROG, llc_options(args))  # every sampler option, before the model is loaded
    spec = args.components or (read_components_file(args.components_file) if args.components_file else None)
    if args.include_full and spec is None:
        raise ValueError("--include-full adds the whole model to --components or --components-file: pass one, or "
                         "leave --include-full out (the whole model alone)")
    model = hf.load_causal_lm(args.model, hf.PARAM_DTYPES[args.dtype])
    components = resolve_components(model, spec, include_full=args.include_full) if spec is not None else None
    return model, sets, components


def _batches(rows, batch_size: int) -> list:
    """Every row of a fixed set, in order, as batches of ``batch_size`` rows (the last one may be shorter)."""
    return [rows[list(range(i, min(i + batch_size, len(rows))))] for i in range(0, len(rows), batch_size)]


def per_sequence_losses(model, batch):
    """Each row's mean next-token cross-entropy, [rows]: the per-sample losses of ``--per sequence``."""
    from ..integrations.hf import causal_lm_token_losses

    ids = batch["input_ids"] if isinstance(batch, dict) else batch[0] if isinstance(batch, (list, tuple)) else batch
    return causal_lm_token_losses(model, batch).reshape(ids.shape[0], -1).mean(dim=1)


def _run(args: argparse.Namespace, model, sets: dict, components, outputs: dict[str, Path]) -> None:
    from .. import estimate_bif
    from ..distributed.mesh import init_from_env
    from ..integrations import hf
    from .estimate import provenance
    from .options import llc_options

    device = init_from_env(device=args.device).device
    query, train = (_batches(sets[name], args.batch_size) for name in ("query", "train"))
    print(f"model {args.model}: {type(model).__name__}; query {args.query}: {len(sets['query'])} rows, train "
          f"{args.train}: {len(sets['train'])} rows, sampling on {args.data or args.train} "
          f"({len(sets['data'])} rows); {'whole model' if components is None else f'{len(components)} components'} "
          f"x {args.num_chains} chains on {device.type}", flush=True)
    t0 = time.perf_counter()
    per_sample = hf.causal_lm_token_losses if args.per == "token" else per_sequence_losses
    result = estimate_bif(model.to(device), hf.token_loader(sets["data"], args.batch_size), hf.causal_lm_loss,
                          query=query, train=train, per_sample_fn=per_sample, components=components, kind=args.kind,
                          token_losses_path=args.token_losses_dir, **llc_options(args, device=device))
    for name in result.components:
        result.llcs[name].config.update(provenance(args, sets["data"], PROG), query=str(args.query),
                                        train=str(args.train), per=args.per)
    print(result.summary(), flush=True)
    print(f"in {time.perf_counter() - t0:.1f} s", flush=True)
    result.save(outputs[".json"])
    written = [outputs[".json"]]
    try:
        result.to_netcdf(outputs[".nc"])
        written.append(outputs[".nc"])
    except ImportError as e:
        print(f"{PROG}: {e}; {outputs['.nc']} not written (pip install xarray scipy)", file=sys.stderr, flush=True)
    write_plot(result, outputs[".png"], PROG, written)
    print(f"written: {', '.join(map(str, written))}", flush=True)


def add_parser(sub) -> None:
    from .estimate import COMPONENT_SETS, add_input_options
    from .options import add_llc_options

    p = sub.add_parser("bif", help="Bayesian influence functions between query and train token sets of a "
                                   "HuggingFace causal LM",
                       description="Correlations (or covariances) of the per-token (or per-row) losses of every query "
                                   "and train row across the draws of SGLD chains at the model's weights (the "
                                   "Bayesian influence function, arXiv:2509.26544). Writes OUT.json, OUT.nc, OUT.png.")
    add_input_options(p, data_help="the data that drives the chains (default: --train)")
    p.add_argument("--query", required=True, help="token ids of the query rows (read as --data)")
    p.add_argument("--train", required=True, help="token ids of the train rows (read as --data)")
    p.add_argument("--per", choices=("token", "sequence"), default="token",
                   help="one sample per predicted token, or per row (its mean loss) (default: %(default)s)")
    p.add_argument("--kind", choices=("correlation", "covariance"), default="correlation",
                   help="the matrix's entries (default: %(default)s)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--components", choices=COMPONENT_SETS, help="one matrix per layer, head, ... (one run)")
    which.add_argument("--components-file", metavar="FILE.json",
                       help="custom components: a JSON object {name: [parameter-name patterns (names or globs)]}")
    p.add_argument("--include-full", action="store_true", help="with components: the whole model too, as 'full'")
    p.add_argument("--token-losses-dir", metavar="DIR",
                   help="stream the losses at every draw to .npy files here instead of memory (large sets)")
    add_llc_options(p)
    p.add_argument("--output", required=True, metavar="OUT.json",
                   help="the result (JSON); OUT.nc (NetCDF) and OUT.png (heat map) are written beside it")
    p.add_argument("--force", action="store_true", help="overwrite existing OUT.json, OUT.nc, OUT.png")
    p.set_defaults(func=_bif)
