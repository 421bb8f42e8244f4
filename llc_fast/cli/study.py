"""What the study commands (``llc-fast restricted``, ``llc-fast bif``) share: their three outputs beside one
``--output FILE.json``, and one run with every input checked first and Ctrl-C reported."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .estimate import BAD_INPUT_EXIT_CODE, INTERRUPTED_EXIT_CODE, check_output, report_interrupt


def study_outputs(args: argparse.Namespace, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """{suffix: path}: ``--output`` (a .json file) and the files of the same stem beside it, each writable and new
    (or ``--force``). suffixes: ".json" first."""
    out = Path(args.output).expanduser()
    if out.suffix != ".json":
        others = " and ".join(suffixes[1:])
        raise ValueError(f"--output {args.output}: name a .json file (the {others} of the same stem are written "
                         "beside it)")
    outputs = {suffix: out.with_suffix(suffix) for suffix in suffixes}
    for path in outputs.values():
        check_output(str(path), force=args.force, model_dir=args.model)
    return outputs


def run_study(args: argparse.Namespace, prog: str, torchrun_hint: str, checked: Callable[[], tuple],
              run: Callable[..., None]) -> int:
    """Exit code of one study command: refused under torchrun (``torchrun_hint``: what to run instead), then
    ``checked()`` (every input; a ValueError or FileNotFoundError is printed, exit BAD_INPUT_EXIT_CODE), then
    ``run(*checked())``; Ctrl-C reports the partial result and how to resume (exit INTERRUPTED_EXIT_CODE)."""
    from ..api import refuse_under_torchrun
    from ..chains.interrupt import SamplingInterrupted

    try:
        refuse_under_torchrun(prog, torchrun_hint)
        inputs = checked()
    except (ValueError, FileNotFoundError) as e:
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        return BAD_INPUT_EXIT_CODE
    try:
        run(*inputs)
    except SamplingInterrupted as e:
        report_interrupt(args, e, prog=prog)
        return INTERRUPTED_EXIT_CODE
    return 0


def write_plot(result, path: Path, prog: str, written: list[Path]) -> None:
    """``result.plot(path)``, closed and appended to ``written``; without matplotlib, say the plot was skipped."""
    try:
        fig = result.plot(path)
    except ImportError as e:
        print(f"{prog}: {e}; {path} not written", file=sys.stderr, flush=True)
        return
    import matplotlib.pyplot as plt

    plt.close(fig)
    written.append(path)
