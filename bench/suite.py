"""Every benchmark in one run: `python bench/suite.py` (or `bench/run`, which bootstraps first).

Prints the machine (CPU model, cores, Python, SQLite, load average before and after: these
machines are shared and noisy, so the figures that matter are ratios measured side by side), then
one table (`bench | figure | target | ok`), then notes (per-run figures, profiles of missed
targets). Writes bench/results/latest.json. Exits 1 when any target is missed or a bench fails.

    python bench/suite.py [--only ingest,e2e] [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import from the repository, not from bench/
    _root = str(Path(__file__).resolve().parent.parent)
    sys.path[:] = [_root] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from bench import e2e, ingest, memory, pacing_one_portal
from bench.common import ROOT, Row, install_signal_handlers, machine, print_rows, row

BENCHES = ("translation", "ingest", "e2e", "memory", "pacing", "pacing-portals")


def translation_rows() -> list[Row]:
    """bench/translation.py's rows (vendor, ratio, target, ok) in the suite's shape."""
    from bench import translation

    rows: list[Row] = []
    for item in translation.run():
        name = f"translation {item['vendor']}: 1 h call ({item['bytes'] / 1e6:.1f} MB) vs json.loads"
        rows.append(row(name, float(item["ratio"]), "×", f"≤ {item['target']:g}", bool(item["ok"])))
    return rows


def portals_rows(quick: bool) -> list[Row]:
    """bench/pacing.py (several portals; the reliability work's bench) in the suite's shape."""
    from bench import pacing

    rows: list[Row] = []
    for item in pacing.run(count=60) if quick else pacing.run():
        rows.append(row(str(item["name"]), item["figure"], str(item["unit"]), str(item["target"]), item["ok"]))
    return rows


def plan(quick: bool, profile: bool | None) -> dict[str, Callable[[], list[Row]]]:
    """The benches and their arguments (quick: fewer and shorter runs, for a smoke check)."""
    return {
        "translation": translation_rows,
        "ingest": lambda: ingest.run(rounds=1 if quick else 3, seconds=3.0 if quick else 10.0, profile=profile),
        "e2e": lambda: e2e.run(count=30 if quick else 200),
        "memory": lambda: memory.run(calls=2 if quick else 4),
        "pacing": lambda: pacing_one_portal.run(count=60 if quick else 130),
        "pacing-portals": lambda: portals_rows(quick),
    }


def load_average() -> str:
    """The 1-minute load average (other work on the machine skews the absolute figures)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def main() -> int:
    """Run the chosen benches, print everything, exit 1 on a missed target or a failed bench."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {', '.join(BENCHES)}")
    parser.add_argument("--quick", action="store_true", help="short runs (smoke check; figures are rough)")
    parser.add_argument(
        "--profile", action="store_true", default=None, help="profile ingest even if it meets its target"
    )
    args = parser.parse_args()
    install_signal_handlers()
    chosen = [name for name in args.only.split(",") if name]
    unknown = sorted(set(chosen) - set(BENCHES))
    if unknown:
        parser.error(f"unknown bench(es): {', '.join(unknown)}")
    if "ingest" in chosen:
        ingest.ensure_wrk()  # fail (or install) before anything runs
    host = machine()
    host["load average before"] = load_average()
    started = time.monotonic()
    rows: list[Row] = []
    notes: list[str] = []
    benches = plan(args.quick, args.profile)
    for name in chosen:
        print(f"running {name} …", file=sys.stderr, flush=True)
        began = time.monotonic()
        try:
            rows += benches[name]()
        except Exception as error:  # one broken bench must not hide the others' figures
            rows.append(row(f"{name}: failed", f"{type(error).__name__}: {error}"[:150], "", "runs", False))
            notes.append(f"{name} failed:\n" + traceback.format_exc())
        if name == "ingest":
            notes += ingest.NOTES
        print(f"  {name} took {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)
    host["load average after"] = load_average()
    host["suite took"] = f"{time.monotonic() - started:.0f} s"
    print()
    print("machine: " + "; ".join(f"{key} {value}" for key, value in host.items()))
    print()
    print_rows(rows)
    if notes:
        print()
        print("notes:")
        for note in notes:
            print(note)
    _save(host, rows, notes)
    return 1 if any(r["ok"] is False for r in rows) else 0


def _save(host: dict[str, str], rows: list[Row], notes: list[str]) -> None:
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    document: dict[str, Any] = {"machine": host, "rows": rows, "notes": notes, "at": time.strftime("%FT%T%z")}
    (results / "latest.json").write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    sys.exit(main())
