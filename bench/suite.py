"""Every benchmark in one run: `python bench/suite.py` (or `bench/run`, which bootstraps first).

Prints the machine (CPU model, cores, Python, SQLite, load average before and after: these
machines are shared and noisy, so the figures that matter are ratios measured side by side), then
one table (`bench | figure | target | ok`), then notes (per-run figures, profiles of missed
targets). Writes bench/results/latest.json. Exits 1 when any target is missed or a bench fails.

The benches that measure what users get run the Procfile's processes together: `ingest` (web +
worker vs bare Flask, SQLite and PostgreSQL), `sustained` (the highest rate of calls the whole
service keeps up with), `fault` (300 calls at the default settings while Bitrix24 fails and workers
are killed). PostgreSQL runs need B24SCRIBE_BENCH_POSTGRES_URL or B24SCRIBE_TEST_POSTGRES_URL
(each run gets its own schema); without one only SQLite is measured. Benches added beside this file
(fold_rate.py, delivery_cpu.py, health_queries.py) are run when present.

    python bench/suite.py [--only ingest,sustained] [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import from the repository, not from bench/
    _root = str(Path(__file__).resolve().parent.parent)
    sys.path[:] = [_root] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from bench import e2e, fault_run, ingest, memory, pacing_one_portal, recording, sustained, transcribe
from bench.common import BIN, ROOT, Row, install_signal_handlers, machine, postgres_server, print_rows, row

BENCHES = (
    "translation",
    "ingest",
    "sustained",
    "fault",
    "e2e",
    "memory",
    "recording",
    "transcribe",
    "pacing",
    "pacing-portals",
    "fold-rate",
    "delivery-cpu",
    "health-queries",
)
# Benches other work adds beside this file: run when their module is there. Their size arguments
# (quick, full), passed where the module's run() or command line takes them.
OPTIONAL: dict[str, tuple[str, dict[str, tuple[int, int]]]] = {
    "fold-rate": ("fold_rate", {"events": (1_500, 6_000)}),
    "delivery-cpu": ("delivery_cpu", {}),
    "health-queries": ("health_queries", {"events": (20_000, 1_000_000), "runs": (5, 20)}),
}
OPTIONAL_TIMEOUT = 1800.0  # seconds, for one that runs as a command


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


def optional_rows(name: str, quick: bool, notes: list[str]) -> list[Row]:
    """Rows of a bench other work adds (bench/<module>.py), if it is there.

    Its `run()` is called with what it takes of `quick`, its size arguments and `postgres_url`, and
    its rows are used as they are; a module with only a command line is run as
    `python bench/<module>.py` (its size options where it has them): its output goes to the notes
    and its exit status is a row."""
    module_name, sizes = OPTIONAL[name]
    path = ROOT / "bench" / f"{module_name}.py"
    if not path.exists():
        return [row(f"{name}: not run", f"bench/{module_name}.py is not there", "", "", None)]
    chosen = {key: quick_size if quick else full_size for key, (quick_size, full_size) in sizes.items()}
    module = importlib.import_module(f"bench.{module_name}")
    run = getattr(module, "run", None)
    if callable(run):
        accepted = inspect.signature(run).parameters
        offered: dict[str, Any] = {**chosen, "quick": quick, "postgres_url": postgres_server()}
        produced = run(**{key: value for key, value in offered.items() if key in accepted})
        return [as_row(name, item) for item in produced]
    source = path.read_text()
    argv = [str(BIN / "python"), str(path)]
    for key, value in chosen.items():
        option = "--" + key.replace("_", "-")
        if option in source:
            argv += [option, str(value)]
    server = postgres_server()
    env = dict(os.environ)
    if server:  # the same PostgreSQL as the suite's own benches, however the bench is told about it
        env.setdefault("B24SCRIBE_TEST_POSTGRES_URL", server)
        env.setdefault("B24SCRIBE_BENCH_POSTGRES_URL", server)
    started = time.monotonic()
    done = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=OPTIONAL_TIMEOUT, check=False
    )
    shown = " ".join(Path(arg).name if arg == str(path) else arg for arg in argv[1:])
    notes.append(f"{name} (`bench/{shown}`):\n" + (done.stdout + done.stderr[-2000:]).rstrip())
    seconds = time.monotonic() - started
    rows = [row(f"{name}: {label}", figure) for label, figure in printed_figures(done.stdout)]
    status = f"exit {done.returncode}, {seconds:.0f} s"
    rows.append(row(f"{name}: the command's own verdict", status, "", "exit 0", done.returncode == 0))
    return rows


def printed_figures(output: str, width: int = 100) -> list[tuple[str, str]]:
    """`label: figures` lines a bench printed, as (label, figures) pairs (figures cut at `width`)."""
    pairs: list[tuple[str, str]] = []
    for line in output.splitlines():
        label, colon, figures = line.partition(":")
        figures = " ".join(figures.split())
        if colon and label.strip() and any(character.isdigit() for character in figures):
            pairs.append((label.strip(), figures if len(figures) <= width else figures[: width - 1] + "…"))
    return pairs


def as_row(bench: str, item: Mapping[str, Any]) -> Row:
    """Another bench's row in the suite's shape (a missing field is a clear error)."""
    missing = [key for key in ("name", "figure") if key not in item]
    if missing:
        raise ValueError(f"{bench}: a row without {', '.join(missing)}: {dict(item)!r}")
    return row(
        str(item["name"]), item["figure"], str(item.get("unit", "")), str(item.get("target", "")), item.get("ok")
    )


def plan(quick: bool, profile: bool | None, notes: list[str]) -> dict[str, Callable[[], list[Row]]]:
    """The benches and their arguments (quick: fewer and shorter runs, for a smoke check)."""
    benches: dict[str, Callable[[], list[Row]]] = {
        "translation": translation_rows,
        "ingest": lambda: ingest.run(rounds=1 if quick else 3, seconds=3.0 if quick else 10.0, profile=profile),
        "sustained": lambda: sustained.run(plan=sustained.Plan.quick() if quick else sustained.Plan()),
        "fault": lambda: fault_run.run(quick=quick),
        "e2e": lambda: e2e.run(count=30 if quick else 200),
        "memory": lambda: memory.run(calls=2 if quick else 4),
        "recording": lambda: recording.run(size_mb=50.0 if quick else 300.0, calls=30 if quick else 100),
        "transcribe": lambda: transcribe.run(calls=10 if quick else 40),
        "pacing": lambda: pacing_one_portal.run(count=60 if quick else 130),
        "pacing-portals": lambda: portals_rows(quick),
    }
    for name in OPTIONAL:
        benches[name] = lambda name=name: optional_rows(name, quick, notes)  # type: ignore[misc]
    return benches


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
    if {"ingest", "sustained"} & set(chosen):
        ingest.ensure_wrk()  # fail (or install) before anything runs
    host = machine()
    host["load average before"] = load_average()
    started = time.monotonic()
    rows: list[Row] = []
    notes: list[str] = []
    benches = plan(args.quick, args.profile, notes)
    for name in chosen:
        print(f"running {name} …", file=sys.stderr, flush=True)
        began = time.monotonic()
        try:
            rows += benches[name]()
        except Exception as error:  # one broken bench must not hide the others' figures
            rows.append(row(f"{name}: failed", f"{type(error).__name__}: {error}"[:150], "", "runs", False))
            notes.append(f"{name} failed:\n" + traceback.format_exc())
        notes += {"ingest": ingest.NOTES, "sustained": sustained.NOTES, "fault": fault_run.NOTES}.get(name, [])
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
