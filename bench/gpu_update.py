"""Stage d of gpu_suite.sh: ``bench_update.py`` as it is (every option passes through), then its result
in one line for the suite's summary table.

    python bench/gpu_update.py --output FILE.json [bench_update.py options, e.g. --device cuda --min-size 2^20]

The line gives, per backend, the median over the sizes from 2^24 up (all sizes if none is that large) of
the fraction of the copy bandwidth measured within the same point, for plain SGLD on float32 weights,
and the median speedup over the devinterp-style eager loop; rows marked busy are left out.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import bench_update


def summary(rows: list[dict]) -> str:
    ok = [r for r in rows if r.get("gbps") and "busy" not in (r.get("note") or "")]
    pick = [r for r in ok if r["sampler"] == "sgld" and r["dtype"] == "float32"] or ok
    big = [r for r in pick if r["size"] >= 1 << 24] or pick
    parts = []
    for backend in dict.fromkeys(r["backend"] for r in big):
        mine = [r for r in big if r["backend"] == backend]
        frac = statistics.median(r["frac_copy"] for r in mine)
        sp = [r["speedup_vs_eager"] for r in mine if r.get("speedup_vs_eager")]
        parts.append(f"{backend} {frac:.0%} of copy" + (f", {statistics.median(sp):.1f}x eager" if sp and
                                                         backend != "eager" else ""))
    if not parts:
        return "no row was timed"
    sizes = sorted({r["size"] for r in big})
    copy = statistics.median(r["copy_gbps"] for r in big if r.get("copy_gbps"))
    what = "sgld float32" if pick and pick[0]["sampler"] == "sgld" and pick[0]["dtype"] == "float32" else "all rows"
    return (f"{what}, sizes {bench_update.fmt_size(sizes[0])}..{bench_update.fmt_size(sizes[-1])} (copy {copy:.0f} "
            f"GB/s): " + "; ".join(parts))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--output" not in argv or not argv[argv.index("--output") + 1].endswith(".json"):
        print("gpu_update.py needs --output FILE.json (the summary is read from it)", file=sys.stderr)
        return 2
    rc = bench_update.main(None if argv == sys.argv[1:] else argv)  # None: its header names this command
    out = Path(argv[argv.index("--output") + 1])
    if rc == 0 and out.is_file():
        print("SUMMARY: " + summary(json.loads(out.read_text())["rows"]))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
