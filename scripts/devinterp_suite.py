#!/usr/bin/env python
"""Run devinterp 1.3.2's own tests against devinterp and through ``llc_fast.compat.devinterp``.

Given an exported devinterp 1.3.2 tree (``--devinterp-src DIR``: ``src/devinterp`` and ``tests/``, e.g.
``git -C <devinterp repo> archive v1.3.2 -- src tests pyproject.toml | tar -x -C DIR``; this script never
fetches anything), every CPU test file is run twice, one pytest subprocess per file under a timeout:

* ``devinterp``: a temporary copy of the tests, with the exported ``src`` on ``PYTHONPATH`` ahead of the
  installed devinterp (whatever version that is);
* ``compat``: a temporary copy of the tests in which every import that ``llc_fast.compat.devinterp`` provides
  is switched as the README says (``from devinterp.optim import SGLD`` -> ``from
  llc_fast.compat.devinterp.optim import SGLD``); the other imports (devinterp's ``sample()`` and callbacks,
  ``test_utils``, ...) still come from the exported devinterp 1.3.2, so its ``sample()`` drives compat's
  optimizers.

Files whose name says gpu, tpu or multiprocessing are skipped (they need accelerators or several
processes). devinterp's tests need ``cloudpickle`` and ``syrupy`` (snapshot tests): put a directory holding
them on ``--deps`` if the environment lacks them (``pip install --target DIR cloudpickle syrupy``).

Prints a table (per file: passed/failed/skipped/errors for devinterp vs compat), then the tests that pass
on devinterp but not through compat, with the first line of their failure; ``--output`` writes the same.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SKIP_WORDS = ("gpu", "tpu", "multiprocessing")

# Every (devinterp module, name) that llc_fast.compat.devinterp provides -> the compat module to import it from.
# Names not listed here (devinterp 1.x's ``sample``, callbacks, ``LLCEstimator``, ``test_utils``, ...) keep
# their devinterp import: compat's ``sample`` is devinterp 2.x's, a different function.
_OPTIM = "llc_fast.compat.devinterp.optim"
_V1 = "llc_fast.compat.devinterp.v1"
_SGNHT = "llc_fast.compat.devinterp.sgnht"
PROVIDED: dict[str, dict[str, str]] = {
    "devinterp": {"SGLD": _OPTIM},
    "devinterp.optim": {"SGLD": _OPTIM, "SGMCMC": _OPTIM, "SGNHT": _SGNHT},
    "devinterp.optim.sgnht": {"SGNHT": _SGNHT},
    "devinterp.optim.sgld": {"SGLD": _OPTIM},
    "devinterp.optim.sgmcmc": {"SGMCMC": _OPTIM},
    "devinterp.slt": {"estimate_learning_coeff": _V1, "estimate_learning_coeff_with_summary": _V1},
    "devinterp.slt.sampler": {"estimate_learning_coeff": _V1, "estimate_learning_coeff_with_summary": _V1},
    "devinterp.backends.default.slt.sampler": {"estimate_learning_coeff": _V1,
                                              "estimate_learning_coeff_with_summary": _V1},
}

_FROM_IMPORT = re.compile(r"^(?P<indent>[ \t]*)from[ \t]+(?P<mod>devinterp[\w.]*)[ \t]+import[ \t]+(?P<names>.+)$")


def switch_imports(source: str, provided_map: dict | None = None) -> tuple[str, list[str]]:
    """Apply the README's one-line switch to every import compat provides; return (new source, changes)."""
    provided_map = PROVIDED if provided_map is None else provided_map
    lines = source.split("\n")
    out, changes = [], []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _FROM_IMPORT.match(line)
        if not m or m.group("mod") not in provided_map:
            out.append(line)
            i += 1
            continue
        names_src = m.group("names")
        consumed = 1
        if names_src.strip().startswith("("):  # parenthesised, possibly multi-line
            while ")" not in names_src and i + consumed < len(lines):
                names_src += " " + lines[i + consumed]
                consumed += 1
            names_src = names_src.strip()[1:names_src.strip().index(")")]
        names = [n.strip() for n in names_src.split("#")[0].split(",") if n.strip()]
        provided = provided_map[m.group("mod")]
        keep, moved = [], {}
        for n in names:
            base = n.split(" as ")[0].strip()
            if base in provided:
                moved.setdefault(provided[base], []).append(n)
            else:
                keep.append(n)
        if not moved:
            out.extend(lines[i:i + consumed])
            i += consumed
            continue
        indent = m.group("indent")
        if keep:
            out.append(f"{indent}from {m.group('mod')} import {', '.join(keep)}")
        for mod, ns in moved.items():
            new = f"{indent}from {mod} import {', '.join(ns)}"
            out.append(new)
            changes.append(f"from {m.group('mod')} import {', '.join(ns)}  ->  {new.strip()}")
        i += consumed
    return "\n".join(out), changes


def test_files(tests: Path) -> tuple[list[Path], list[Path]]:
    files = sorted(p for p in tests.rglob("*.py") if p.name.startswith("test_") or p.name.endswith("_test.py"))
    run = [p for p in files if not any(w in p.name.lower() for w in SKIP_WORDS)]
    skipped = [p for p in files if p not in run]
    return run, skipped


def provided_by(root: Path) -> dict[str, dict[str, str]]:
    """PROVIDED, less the names whose compat module the llc_fast under ``root`` lacks (an older checkout, e.g.
    one without ``compat/devinterp/sgnht.py``)."""
    provided = {}
    for mod, names in PROVIDED.items():
        kept = {n: m for n, m in names.items()
                if (root / (m.replace(".", "/") + ".py")).exists() or (root / m.replace(".", "/")).is_dir()}
        if kept:
            provided[mod] = kept
    return provided


def prepare(src: Path, work: Path, mode: str, provided: dict | None = None) -> dict[str, list[str]]:
    """Copy the tests (and devinterp's src) into work/; in compat mode switch the imports. Returns changes."""
    shutil.copytree(src / "src", work / "src")
    shutil.copytree(src / "tests", work / "tests")
    (work / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: devinterp's slow tests\n")
    changes: dict[str, list[str]] = {}
    if mode == "compat":
        for f in sorted((work / "tests").rglob("*.py")):
            new, ch = switch_imports(f.read_text(), provided)
            if ch:
                f.write_text(new)
                changes[str(f.relative_to(work))] = ch
    return changes


def parse_junit(path: Path) -> tuple[dict[str, int], dict[str, tuple[str, str]]]:
    counts = dict(passed=0, failed=0, skipped=0, errors=0)
    per_test: dict[str, tuple[str, str]] = {}
    if not path.exists():
        return counts, per_test
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, msg = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}[child.tag]
                msg = (child.get("message") or child.text or "").strip().split("\n")[0][:300]
                break
        counts[outcome] += 1
        per_test[name] = (outcome, msg)
    return counts, per_test


def run_file(work: Path, rel: str, env: dict, timeout: float, kexpr: str | None, markexpr: str | None, python: str,
             log: Path):
    junit = work / "junit" / (rel.replace("/", "__") + ".xml")
    junit.parent.mkdir(exist_ok=True)
    cmd = [python, "-m", "pytest", rel, "-q", "-p", "no:cacheprovider", "--rootdir", str(work),
           f"--junitxml={junit}", "-o", "junit_family=xunit1"]
    if kexpr:
        cmd += ["-k", kexpr]
    if markexpr:
        cmd += ["-m", markexpr]
    t0 = time.time()
    try:
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, cwd=work, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
        status = f"rc={proc.returncode}"
    except subprocess.TimeoutExpired:
        status = f"TIMEOUT>{timeout:.0f}s"
    counts, per_test = parse_junit(junit)
    if status.startswith("TIMEOUT"):
        counts = dict(passed=-1, failed=-1, skipped=-1, errors=-1)
    elif proc.returncode not in (0, 1, 5) and not per_test:  # collection/usage error without a report
        counts["errors"] = max(counts["errors"], 1)
    return counts, per_test, status, time.time() - t0


def fmt_counts(c: dict[str, int], status: str) -> str:
    if status.startswith("TIMEOUT"):
        return status
    return f"{c['passed']}/{c['failed']}/{c['skipped']}/{c['errors']}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devinterp-src", required=True, type=Path,
                    help="an exported devinterp 1.3.2 tree (with src/devinterp and tests/)")
    ap.add_argument("--output", type=Path, help="also write the table (and the command) to this file")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per test file and mode (default 600)")
    ap.add_argument("-k", dest="kexpr", default=None, help="pytest -k expression passed to every file")
    ap.add_argument("-m", dest="markexpr", default=None,
                    help="pytest -m expression passed to every file (e.g. 'not slow' leaves out the statistical tests)")
    ap.add_argument("--files", nargs="*", default=None,
                    help="only test files whose path contains one of these substrings")
    ap.add_argument("--exclude", nargs="*", default=None,
                    help="leave out test files whose path contains one of these substrings")
    ap.add_argument("--modes", default="devinterp,compat", help="comma-separated: devinterp, compat")
    ap.add_argument("--deps", action="append", default=[],
                    help="extra directory put on PYTHONPATH (e.g. one holding cloudpickle and syrupy)")
    ap.add_argument("--llc-fast-root", type=Path, default=REPO,
                    help="directory holding the llc_fast package used in compat mode (default: this checkout)")
    ap.add_argument("--python", default=sys.executable, help="python that runs pytest (default: this one)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copies and pytest logs")
    args = ap.parse_args(argv)
    # SIGTERM as an exception, so that subprocess.run kills the running pytest instead of orphaning it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    src = args.devinterp_src.resolve()
    if not (src / "src" / "devinterp").is_dir() or not (src / "tests").is_dir():
        ap.error(f"{src} has no src/devinterp and tests/: export devinterp 1.3.2 there first")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(modes) - {"devinterp", "compat"}:
        ap.error("--modes takes devinterp and/or compat")

    files, skipped_files = test_files(src / "tests")
    rels = [str(p.relative_to(src)) for p in files]
    if args.files:
        rels = [r for r in rels if any(s in r for s in args.files)]
    if args.exclude:
        rels = [r for r in rels if not any(s in r for s in args.exclude)]

    root = Path(tempfile.mkdtemp(prefix="devinterp_suite_"))
    results: dict[str, dict[str, tuple]] = {m: {} for m in modes}
    changes: dict[str, list[str]] = {}
    try:
        for mode in modes:
            work = root / mode
            work.mkdir()
            ch = prepare(src, work, mode, provided_by(args.llc_fast_root.resolve()))
            if mode == "compat":
                changes = ch
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                [str(work / "src"), str(work)] + ([str(args.llc_fast_root.resolve())] if mode == "compat" else [])
                + [str(Path(d).resolve()) for d in args.deps] + [p for p in [env.get("PYTHONPATH")] if p])
            env.setdefault("OMP_NUM_THREADS", "1")
            env["PYTHONDONTWRITEBYTECODE"] = "1"
            env["HF_HUB_OFFLINE"] = env["HF_DATASETS_OFFLINE"] = "1"  # nothing is fetched
            env["WANDB_MODE"] = "disabled"
            (work / "logs").mkdir()
            for rel in rels:
                log = work / "logs" / (rel.replace("/", "__") + ".log")
                res = run_file(work, rel, env, args.timeout, args.kexpr, args.markexpr, args.python, log)
                results[mode][rel] = res
                print(f"[{mode}] {rel}: {fmt_counts(res[0], res[2])} ({res[2]}, {res[3]:.0f}s)", file=sys.stderr,
                      flush=True)

        lines = ["$ python scripts/devinterp_suite.py "
                 + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else list(argv))), ""]
        lines.append(f"devinterp tests from {src}; cells are passed/failed/skipped/errors"
                     + (f"; -k {args.kexpr!r}" if args.kexpr else "") + (f"; -m {args.markexpr!r}" if args.markexpr else ""))
        lines.append("skipped files (gpu/tpu/multiprocessing): "
                     + ", ".join(str(p.relative_to(src)) for p in skipped_files))
        lines.append("")
        w = max([len(r) for r in rels] + [9])
        header = f"{'test file':<{w}}  " + "  ".join(f"{m:>22}" for m in modes)
        lines += [header, "-" * len(header)]
        totals = {m: dict(passed=0, failed=0, skipped=0, errors=0) for m in modes}
        for rel in rels:
            cells = []
            for m in modes:
                c, _, status, secs = results[m][rel]
                cells.append(f"{fmt_counts(c, status) + f' ({secs:.0f}s)':>22}")
                if not status.startswith("TIMEOUT"):
                    for k in totals[m]:
                        totals[m][k] += c[k]
            lines.append(f"{rel:<{w}}  " + "  ".join(cells))
        lines.append("-" * len(header))
        lines.append(f"{'total':<{w}}  " + "  ".join(f"{fmt_counts(totals[m], ''):>22}" for m in modes))
        if "devinterp" in modes and "compat" in modes:
            lines += ["", "passes on devinterp, not through compat:"]
            n = 0
            for rel in rels:
                dev, comp = results["devinterp"][rel][1], results["compat"][rel][1]
                for name, (outcome, _) in dev.items():
                    if outcome != "passed":
                        continue
                    c_out, c_msg = comp.get(name, ("missing", "(not run through compat: timeout or collection)"))
                    if c_out != "passed":
                        n += 1
                        lines.append(f"  {name}: {c_out}: {c_msg}")
            if n == 0:
                lines.append("  (none)")
            lines += ["", "passes through compat, not on devinterp:"]
            n = 0
            for rel in rels:
                dev, comp = results["devinterp"][rel][1], results["compat"][rel][1]
                for name, (outcome, _) in comp.items():
                    d_out, d_msg = dev.get(name, ("missing", ""))
                    if outcome == "passed" and d_out != "passed":
                        n += 1
                        lines.append(f"  {name}: devinterp {d_out}: {d_msg}")
            if n == 0:
                lines.append("  (none)")
        if changes:
            lines += ["", "imports switched for compat:"]
            for f, ch in changes.items():
                lines += [f"  {f}: {c}" for c in ch]
        text = "\n".join(lines) + "\n"
        print(text)
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text)
        if args.keep:
            print(f"temporary copies and logs kept in {root}", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
