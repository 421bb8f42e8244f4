"""Every option of an LLC run is declared once, in LLCConfig's fields (``llc_fast.config``): estimate_llc's
explicit signature, the command line's options and defaults, and README's options table all agree with them."""
import argparse
import inspect
from dataclasses import MISSING
from pathlib import Path

import pytest

from llc_fast import LLCConfig, estimate_llc
from llc_fast.api import EVAL_OPTIONS
from llc_fast.cli import build_parser
from llc_fast.cli.calibrate import CALIBRATE_OPTIONS
from llc_fast.cli.checkpoints import RUN_FILE_OPTIONS
from llc_fast.cli.demo import DEMO_DEFAULTS, DEMO_OPTIONS
from llc_fast.config import options_table
from llc_fast.config.options import OPTIONS_TABLE_BEGIN, OPTIONS_TABLE_END, option_fields
from llc_fast.distributed.sharded import estimate_llc_sharded
from llc_fast.studies.calibrate import calibrate

README = Path(__file__).parent.parent / "README.md"


def _default(f):
    return inspect.Parameter.empty if f.default is MISSING else f.default


def test_estimate_llc_signature_is_llcconfig_fields():
    params = [p for p in inspect.signature(estimate_llc).parameters.values() if p.kind is p.KEYWORD_ONLY
              and p.name not in EVAL_OPTIONS]
    declared = option_fields(LLCConfig, "estimate")
    assert [p.name for p in params] == [f.name for f in declared]
    assert {p.name: p.default for p in params} == {f.name: _default(f) for f in declared}


def test_estimate_llc_sharded_takes_the_torchrun_options_with_their_defaults():
    params = inspect.signature(estimate_llc_sharded).parameters
    for f in option_fields(LLCConfig, "torchrun"):
        assert params[f.name].default == f.default, f.name


def test_every_option_has_a_help_line():
    for f in option_fields(LLCConfig, "estimate", "torchrun", "internal"):
        assert f.metadata["help"] and "\n" not in f.metadata["help"], f.name


def test_readme_options_table_is_the_rendered_one():
    text = README.read_text()
    assert OPTIONS_TABLE_BEGIN in text and OPTIONS_TABLE_END in text
    committed = text.split(OPTIONS_TABLE_BEGIN, 1)[1].split(OPTIONS_TABLE_END, 1)[0].strip("\n") + "\n"
    assert committed == options_table(), "README's options table is stale: run llc_fast.config.write_options_table()"


def _parsed(command: str, *required: str) -> argparse.Namespace:
    """The defaults of ``command``'s options (with its required arguments given)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return sub.parse_args(list(required))


ESTIMATE_REQUIRED = ("--model", "m", "--data", "d", "--lr", "1e-4")


@pytest.mark.parametrize("command,required,scopes,left_out", [
    ("estimate", ESTIMATE_REQUIRED, ("estimate", "torchrun"), ()),
    ("restricted", ESTIMATE_REQUIRED + ("--components", "heads", "--output", "o.json"), ("estimate",), ()),
    ("checkpoints", ("--models", "m", "--data", "d", "--lr", "1e-4", "--save-dir", "s"), ("estimate",),
     RUN_FILE_OPTIONS),
])
def test_cli_defaults_are_the_api_defaults(command, required, scopes, left_out):
    args = _parsed(command, *required)
    expected = [f for f in option_fields(LLCConfig, *scopes) if f.metadata["cli"] and f.name not in left_out]
    assert set(args.llc_option_names) == {f.name for f in expected}
    for f in expected:
        if f.default is not MISSING:
            assert getattr(args, f.name) == f.default, f.name
    assert args.num_draws == LLCConfig.__dataclass_fields__["num_draws"].default == 200


def test_demo_and_calibrate_defaults_are_the_api_ones_but_their_own():
    demo = _parsed("demo")
    fields = LLCConfig.__dataclass_fields__
    for name in DEMO_OPTIONS:
        assert getattr(demo, name) == DEMO_DEFAULTS.get(name, fields[name].default), name
    cal = _parsed("calibrate", "--script", "s.py", "--lrs", "1e-4")
    params = inspect.signature(calibrate).parameters
    for name in CALIBRATE_OPTIONS:
        assert getattr(cal, name) == params[name].default, name


def test_cli_checks_options_as_the_api_does(capsys):
    for flag, value, message in [("--num-chains", "0", "num_chains must be an integer >= 1, got 0"),
                                 ("--gamma", "-1", "gamma must be a finite number >= 0"),
                                 ("--chain-batching", "fast", "chain_batching must be one of ('auto', 'vmap', 'sequential'), got 'fast'")]:
        with pytest.raises(SystemExit):
            _parsed("estimate", *ESTIMATE_REQUIRED, flag, value)
        assert message in capsys.readouterr().err
    assert _parsed("estimate", *ESTIMATE_REQUIRED, "--no-progress").progress is False
