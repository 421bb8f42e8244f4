"""``llc-fast checkpoints``: the LLC of every HuggingFace checkpoint in a directory, on token data.

    llc-fast checkpoints --models run/ --data tokens.npy --lr 1e-4 --nbeta 30 --gamma 300 \\
        --save-dir llc_over_training --plot llc.png --output llc.csv

``--models`` holds one ``save_pretrained`` directory per checkpoint, each named with its step
(``checkpoint-1000``, ``step_2000``...). Every checkpoint is sampled with the same seed (common random
numbers). Each finished estimate is written to ``--save-dir`` as it completes, and a rerun of the same
command skips the ones already there: a killed sweep continues where it stopped. ``--component
NAME=GLOB[,GLOB...]`` (repeatable) adds restricted LLCs of parameter groups (e.g. ``attn=*.attn.*``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: One file per run: a sweep writes each checkpoint's estimate to --save-dir instead (a rerun skips those)
RUN_FILE_OPTIONS = ("checkpoint", "checkpoint_every", "resume")


def _checkpoints(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"llc-fast checkpoints: {e}", file=sys.stderr, flush=True)
        return 2


def _run(args: argparse.Namespace) -> int:
    from ..api import refuse_under_torchrun
    from ..integrations import hf
    from ..studies.checkpoints import checkpoint_list, estimate_over_checkpoints
    from .estimate import check_output
    from .options import llc_options

    refuse_under_torchrun("llc-fast checkpoints", "run the same command without torchrun; llc-fast estimate "
                                                  "--model CHECKPOINT runs one checkpoint's LLC under torchrun")
    check_output(args.output, force=True)
    check_output(args.plot, force=True, flag="--plot")
    dtype = hf.PARAM_DTYPES[args.dtype]
    items = checkpoint_list(args.models, dtype=dtype)
    dirs = sorted((p for p in Path(args.models).iterdir() if (p / "config.json").is_file()), key=lambda p: p.name)
    if not dirs:
        raise ValueError(f"{args.models} holds no save_pretrained checkpoints (sub-directories with a config.json)")
    vocab, positions = hf.model_limits(dirs[0])
    rows = hf.load_tokens(args.data, seq_len=args.seq_len, token_dtype=args.token_dtype, column=args.column)
    hf.check_tokens(rows, vocab, positions)
    loader = hf.token_loader(rows, args.batch_size)
    components = args.components
    if args.component:
        if components is not None:
            raise ValueError("pass --components or --component, not both")
        components = {"full": None}
        for spec in args.component:
            name, sep, globs = spec.partition("=")
            if not sep or not name or not globs:
                raise ValueError(f"--component {spec!r}: write NAME=GLOB[,GLOB...], e.g. attn=*.attn.*")
            components[name] = globs.split(",")
    print(f"{len(items)} checkpoints in {args.models} (steps {[s for s, _ in items]}); data {args.data}: "
          f"{len(rows)} rows x {rows.seq_len} tokens", flush=True)
    result = estimate_over_checkpoints(
        args.models, loader, hf.causal_lm_loss, dtype=dtype,
        components=components, save_dir=args.save_dir, **llc_options(args))
    print(result.table(), flush=True)
    if args.output:
        (result.to_csv if args.output.endswith(".csv") else result.save)(args.output)
        print(f"table written to {args.output}", flush=True)
    if args.plot:
        result.plot(args.plot, log_x=args.log_x)
        print(f"plot written to {args.plot}", flush=True)
    return 0


def add_parser(sub) -> None:
    from .estimate import COMPONENT_SETS, add_input_options
    from .options import add_llc_options

    p = sub.add_parser("checkpoints", help="the LLC of every HuggingFace checkpoint in a directory (resumable)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--models", required=True, help="directory of save_pretrained checkpoints named with their step")
    add_input_options(p, model=False)
    add_llc_options(p, exclude=RUN_FILE_OPTIONS)
    p.add_argument("--component", action="append", help="NAME=GLOB[,GLOB...]: a restricted LLC (repeatable)")
    p.add_argument("--components", choices=COMPONENT_SETS, default=None,
                   help="restricted LLCs of every layer, attention head, attention/MLP part or embedding (and full)")
    p.add_argument("--save-dir", required=True, help="each finished estimate is written here; a rerun skips them")
    p.add_argument("--output", help="the table (.csv) or the whole result (.json)")
    p.add_argument("--plot", help="PNG of the LLC against the step")
    p.add_argument("--log-x", action="store_true", help="log-scale steps in the plot")
    p.set_defaults(func=_checkpoints)
