"""py-spy on running processes, and a plain-text summary of where their time goes.

`record()` samples processes for a few seconds (`py-spy record --format raw`: collapsed stacks,
one "frame;frame;… count" line each); `summarize()` turns the stacks into the lines the suite
prints: samples by kind of work (by the innermost frame's module), the repository's own functions
by inclusive share, and the hottest innermost frames.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench.common import BIN, ROOT

# innermost frame's file → kind of work; first match wins
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("sqlite3/", "sqlite3 driver (statements, commit/fsync)"),
    ("sqlalchemy/", "SQLAlchemy"),
    ("marshmallow/", "marshmallow"),
    ("structlog/", "structlog"),
    ("logging/", "logging"),
    ("gunicorn/", "gunicorn"),
    ("werkzeug/", "werkzeug"),
    ("flask/", "Flask"),
    ("json/", "json"),
    ("standardwebhooks/", "standardwebhooks"),
    ("prometheus_client/", "prometheus_client"),
    ("concurrent/futures", "futures (waiting for the group commit)"),
    ("threading.py", "threading (locks, conditions)"),
    ("queue.py", "queue"),
    ("socket.py", "sockets"),
    ("selectors.py", "selectors (idle)"),
    (f"{ROOT}/b24scribe/", "b24scribe (own code)"),
    (f"{ROOT}/handlers/", "handlers (own code)"),
    (f"{ROOT}/schemas/", "schemas (own code)"),
)
OWN_CODE = tuple(f"{ROOT}/{name}" for name in ("b24scribe/", "handlers/", "schemas/", "app.py"))
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def ensure_py_spy() -> str:
    """The py-spy binary, installed from PyPI into the venv when missing."""
    found = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if found:
        return found
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy"], check=True, timeout=600)
    found = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if not found:
        raise RuntimeError("py-spy could not be installed")
    return found


def record(pids: Sequence[int], seconds: float, out_dir: Path, rate: int = 250, gil: bool = False) -> list[Path]:
    """Sample each process for `seconds` (in parallel); returns the raw stack files."""
    py_spy = ensure_py_spy()
    outputs: list[Path] = []
    spies: list[subprocess.Popen[bytes]] = []
    for pid in pids:
        output = out_dir / f"py-spy-{pid}{'-gil' if gil else ''}.txt"
        argv = [py_spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(rate), "-f", "raw", "-o"]
        argv += [str(output), "--nonblocking", "--threads", "--full-filenames"] + (["--gil"] if gil else [])
        spies.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        outputs.append(output)
    for spy in spies:
        try:
            spy.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
    return [output for output in outputs if output.exists()]


def _frames(stack: str) -> list[tuple[str, str]]:
    """(function, file:line) per frame, outermost first."""
    frames: list[tuple[str, str]] = []
    for text in stack.split(";"):
        match = _FRAME.match(text.strip())
        if match:
            location = match["file"] + (f":{match['line']}" if match["line"] else "")
            frames.append((match["function"], location))
        else:
            frames.append((text.strip(), ""))
    return frames


def _short(location: str) -> str:
    if location.startswith(f"{ROOT}/"):
        return location[len(f"{ROOT}/") :]
    for marker in ("site-packages/", "lib/python3.11/", "lib/python3.12/", "lib/python3.13/"):
        index = location.find(marker)
        if index >= 0:
            return location[index + len(marker) :]
    return location


Stack = tuple[str, str, list[tuple[str, str]], int]  # thread kind, thread id, frames (outermost first), samples


def load(path: Path) -> list[Stack]:
    """Every sampled stack of one process with its thread's name (`--threads`) and count."""
    stacks: list[Stack] = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        thread, tid = "?", "?"
        if stack.startswith("thread ("):
            head, _, stack = stack.partition(";")
            tid, _, thread = head.removeprefix("thread (").partition("): ")
        stacks.append((_thread_kind(thread), tid, _frames(stack), int(count)))
    return stacks


def _thread_kind(name: str) -> str:
    if name.startswith("ThreadPoolExecutor"):
        return "request threads"
    return name


def _category(frames: list[tuple[str, str]]) -> str:
    leaf_function, leaf_file = frames[-1] if frames else ("", "")
    if leaf_function.endswith("do_commit"):
        return "COMMIT (sqlite3 C: WAL write + fsync)"
    if leaf_function.endswith(("do_execute", "do_executemany", "do_execute_no_params")):
        return "SQL statements (sqlite3 C, incl. waiting for the write lock)"
    return next((name for marker, name in CATEGORIES if marker in leaf_file), "other")


def summarize(paths: Sequence[Path], rate: int, seconds: float, top: int = 10) -> list[str]:
    """Per process: how busy each thread is; overall: kinds of work, own functions, hot frames."""
    lines: list[str] = []
    by_category: Counter[str] = Counter()
    by_commit_category: Counter[str] = Counter()
    own_inclusive: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    possible = rate * seconds
    for path in paths:
        stacks = load(path)
        per_thread: Counter[str] = Counter()
        tids: dict[str, set[str]] = {}
        for thread, tid, frames, count in stacks:
            per_thread[thread] += count
            tids.setdefault(thread, set()).add(tid)
            category = _category(frames)
            by_category[category] += count
            if thread == "group-commit":
                by_commit_category[category] += count
            leaves[f"{frames[-1][0]} ({_short(frames[-1][1])})" if frames else "?"] += count
            seen: set[str] = set()
            for function, location in frames:
                if any(marker in location for marker in OWN_CODE):
                    key = f"{function} ({_short(location).rsplit(':', 1)[0]})"
                    if key not in seen:
                        seen.add(key)
                        own_inclusive[key] += count
            total += count
        pid = path.stem.split("-")[2]
        busy = ", ".join(
            f"{name}{f' (sum of {len(tids[name])})' if len(tids[name]) > 1 else ''} {100 * n / possible:.0f} %"
            for name, n in per_thread.most_common(4)
        )
        lines.append(f"pid {pid}, share of wall time sampled busy: {busy or 'idle'}")
    if not total:
        return lines + ["no samples (py-spy could not read the processes?)"]
    lines.append("by kind of work (innermost frame), all threads:")
    lines += [f"  {100 * n / total:5.1f} %  {name}" for name, n in by_category.most_common(top)]
    commit_total = sum(by_commit_category.values())
    if commit_total:
        lines.append("the group-commit thread's time:")
        lines += [f"  {100 * n / commit_total:5.1f} %  {name}" for name, n in by_commit_category.most_common(top)]
    lines.append("own functions, inclusive:")
    lines += [f"  {100 * n / total:5.1f} %  {name}" for name, n in own_inclusive.most_common(top)]
    lines.append("hottest innermost frames:")
    lines += [f"  {100 * n / total:5.1f} %  {name}" for name, n in leaves.most_common(top)]
    return lines
