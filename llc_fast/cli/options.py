"""The command line's options of an LLC run, derived from ``LLCConfig``'s fields (``llc_fast.config``): each
option's flag (``--num-draws`` for num_draws, ``--no-progress`` for progress), type, default, choices and help come
from its declaration, and its value is checked by the same check as ``estimate_llc``'s, when the arguments are
parsed. A command adds them with ``add_llc_options`` and passes ``llc_options(args)`` to the function it calls."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, Field

from ..config import LLCConfig
from ..config.options import check_value, cli_flag, option_fields, value_type


def argument_type(f: Field):
    """The argparse ``type`` of option ``f``: its value type, then its check (an ArgumentTypeError says why)."""
    base = value_type(f)

    def convert(text: str):
        value = base(text)
        try:
            check_value(f, value)
        except (ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    convert.__name__ = base.__name__  # argparse: "invalid float value: 'x'"
    return convert


def add_llc_options(p: argparse.ArgumentParser, names=None, *, exclude=(), defaults: dict | None = None,
                    scopes: tuple = ("estimate",)) -> None:
    """Add LLCConfig's command-line options of ``scopes`` to ``p`` (only ``names`` when given, none of ``exclude``),
    with LLCConfig's defaults but those in ``defaults`` (a command's own, e.g. the demo's longer runs)."""
    defaults = defaults or {}
    added = []
    for f in option_fields(LLCConfig, *scopes):
        if not f.metadata["cli"] or (names is not None and f.name not in names) or f.name in exclude:
            continue
        default = defaults.get(f.name, f.default)
        help = f.metadata["help"].replace("%", "%%")
        if value_type(f) is bool:
            p.add_argument(cli_flag(f), dest=f.name, action="store_false" if default else "store_true",
                           help=f"do not {help}" if default else help)
        else:
            p.add_argument(cli_flag(f), dest=f.name, type=argument_type(f), default=None if default is MISSING else
                           default, required=default is MISSING, choices=f.metadata["choices"],
                           help=help + ("" if default in (MISSING, None) else " (default: %(default)s)"))
        added.append(f.name)
    p.set_defaults(llc_option_names=tuple(p.get_default("llc_option_names") or ()) + tuple(added))


def llc_options(args: argparse.Namespace, **more) -> dict:
    """The LLC options parsed by ``add_llc_options`` as keyword arguments, updated with ``more``."""
    return {**{name: getattr(args, name) for name in args.llc_option_names}, **more}
