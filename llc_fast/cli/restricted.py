"""``llc-fast restricted``: the restricted LLC of every component of a HuggingFace causal LM, in one batched run.

    llc-fast restricted --model DIR --data tokens.npy --components heads --include-full \\
        --lr 1e-4 --nbeta 30 --output heads.json

writes heads.json (the ``RestrictedLLCResult``; ``RestrictedLLCResult.load`` reads it), heads.csv (one row per
component) and heads.png (a bar per component; skipped, saying so, without matplotlib). ``--components`` is one
of the standard sets of ``llc_fast.integrations.components``; ``--components-file FILE.json`` holds
{name: [parameter-name patterns]} instead (exact names or globs such as ``"transformer.h.0.mlp.*"``). Every
input is checked before the model is loaded: the three outputs (an existing one needs ``--force``), the token data
(as ``llc-fast estimate``), ``--checkpoint``/``--resume`` and every sampler option; then every component (a pattern
that matches no parameter is named), before sampling. It runs in one process: under torchrun it is refused at once.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .study import run_study, study_outputs, write_plot

PROG = "llc-fast restricted"


def _restricted(args: argparse.Namespace) -> int:
    def checked():
        outputs = study_outputs(args, (".json", ".csv", ".png"))
        file_components = read_components_file(args.components_file) if args.components_file else None
        return (*_checked_inputs(args, file_components), outputs)

    return run_study(args, PROG, "run the same command without torchrun (the components share one batched run in one "
                                 "process); llc-fast estimate runs the whole model's LLC under torchrun", checked,
                     lambda model, rows, components, outputs: _run(args, model, rows, components, outputs))


def read_components_file(path: str) -> dict:
    """{name: [parameter-name patterns]} from a JSON file (a pattern may stand alone; null: the whole model)."""
    import json

    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"--components-file {path} does not exist") from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--components-file {path} is not valid JSON: {e}") from None
    example = '{"attn": ["transformer.h.*.attn.*"], "mlp0": ["transformer.h.0.mlp.*"]}'
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"--components-file {path} must hold a non-empty object {{name: [parameter-name patterns]}}, "
                         f"e.g. {example}")
    for name, patterns in spec.items():
        if patterns is None or isinstance(patterns, str):
            continue
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"--components-file {path}: component {name!r} must map to a list of parameter-name "
                             f"patterns, got {json.dumps(patterns)}; e.g. {example}")
    return spec


def _checked_inputs(args: argparse.Namespace, file_components: dict | None):
    """(model, token rows, {name: restriction}): the data checked as ``llc-fast estimate`` does, then the model
    loaded and every component resolved against its parameters (nothing sampled yet)."""
    from ..api import options_config
    from ..estimators.restricted import resolve_components
    from ..integrations import hf
    from .estimate import check_run_files, checked_rows
    from .options import llc_options

    rows = checked_rows(args)
    check_run_files(args)
    options_config(PROG, llc_options(args))  # every sampler option, before the model is loaded
    model = hf.load_causal_lm(args.model, hf.PARAM_DTYPES[args.dtype])
    spec = args.components or file_components
    return model, rows, resolve_components(model, spec, include_full=args.include_full)


def _run(args: argparse.Namespace, model, rows, components: dict, outputs: dict[str, Path]) -> None:
    from .. import estimate_restricted_llcs
    from ..distributed.mesh import init_from_env
    from ..integrations import hf
    from .estimate import provenance
    from .options import llc_options

    device = init_from_env(device=args.device).device
    print(f"model {args.model}: {type(model).__name__}; data {args.data}: {len(rows)} rows x {rows.seq_len} tokens; "
          f"{len(components)} components ({', '.join(components)}) x {args.num_chains} chains in one run on "
          f"{device.type}", flush=True)
    t0 = time.perf_counter()
    result = estimate_restricted_llcs(model.to(device), hf.token_loader(rows, args.batch_size), hf.causal_lm_loss,
                                      components, **llc_options(args, device=device))
    for r in result.results.values():
        r.config.update(provenance(args, rows, PROG), component_set=args.components or str(args.components_file))
    print(result.table(), flush=True)
    print(f"{len(result)} components in {time.perf_counter() - t0:.1f} s", flush=True)
    result.save(outputs[".json"])
    result.to_csv(outputs[".csv"])
    written = [outputs[".json"], outputs[".csv"]]
    write_plot(result, outputs[".png"], PROG, written)
    print(f"written: {', '.join(map(str, written))}", flush=True)


def add_parser(sub) -> None:
    from .estimate import COMPONENT_SETS, add_input_options
    from .options import add_llc_options

    p = sub.add_parser("restricted", help="restricted LLCs of every head, layer, ... of a HuggingFace causal LM, "
                                          "in one batched run",
                       description="The weight-restricted LLC of every component of a causal LM saved with "
                                   "save_pretrained (one batched run; chain j of every component shares batches "
                                   "and noise), on local token data. Writes OUT.json, OUT.csv and OUT.png.")
    add_input_options(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--components", choices=COMPONENT_SETS,
                       help="a standard set: every layer, attention head, attention/MLP part or embedding")
    which.add_argument("--components-file", metavar="FILE.json",
                       help="custom components: a JSON object {name: [parameter-name patterns (names or globs)]}")
    p.add_argument("--include-full", action="store_true", help="also the unrestricted LLC, as component 'full'")
    add_llc_options(p)
    p.add_argument("--output", required=True, metavar="OUT.json",
                   help="the result (JSON); OUT.csv (the table) and OUT.png (bar chart) are written beside it")
    p.add_argument("--force", action="store_true", help="overwrite existing OUT.json, OUT.csv, OUT.png")
    p.set_defaults(func=_restricted)
