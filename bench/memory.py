"""Peak memory (VmHWM of /proc/<pid>/status) of every process while a one-hour call goes through.

The real web (gunicorn master and its workers) and worker (`flask --app app worker`) processes,
a fresh SQLite database, an idle in-process fake Bitrix24. A one-hour call's transcript (~10,000
words; a Deepgram multichannel callback of ~1.5 MB, or the generic format with one segment per
word when the Deepgram hook is not there) is posted for a few finished calls, and the peaks are
read after the worker attached them all. Target: ≤ 150 MB per process.

    python bench/memory.py [--calls 4]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):  # run as a script: import from the repository, not from bench/
    _root = str(Path(__file__).resolve().parent.parent)
    sys.path[:] = [_root] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from bench.common import (
    Row,
    create_finished_calls,
    fresh_database,
    install_signal_handlers,
    main_for,
    one_hour_deepgram,
    one_hour_generic,
    post,
    proc_status_kib,
    row,
    service_env,
    start_fake,
    start_web,
    start_worker,
    stop_process,
    workspace,
)

if TYPE_CHECKING:
    from fake_bitrix24 import FakeBitrix24

TARGET_MB = 150.0
WORDS = 10_000
TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class Peaks:
    """VmHWM per process (MB), the payload's format and size."""

    processes: dict[str, float]
    payload: str
    payload_bytes: int
    messages: int


def peaks(calls: int = 4, words: int = WORDS) -> Peaks:
    """Post a one-hour transcript for `calls` finished calls; VmHWM of each process afterwards."""
    fake = start_fake()
    try:
        call_ids = create_finished_calls(fake, calls, prefix="memory")
        with workspace() as space:
            url = fresh_database(space, "memory")
            env = service_env(
                space.path,
                url,
                {
                    "B24SCRIBE_BITRIX24_WEBHOOK_URL": fake.webhook_url,
                    "B24SCRIBE_RATE_PER_SECOND": "1000",
                    "B24SCRIBE_RATE_BURST": "1000",
                },
            )
            web = start_web(space, env, name="web-memory")
            worker = start_worker(space, env, name="worker-memory")
            try:
                generic = one_hour_generic(words)
                payload, size = "deepgram", 0
                for number, call_id in enumerate(call_ids):
                    body = one_hour_deepgram(f"memory-{number}", words) if payload == "deepgram" else generic
                    status, answer = post(f"{web.url}/hooks/stt/{payload}?b24_call_id={call_id}", body)
                    if status != 202 and payload == "deepgram" and number == 0:
                        payload, body = "generic", generic  # no Deepgram hook (yet)
                        status, answer = post(f"{web.url}/hooks/stt/generic?b24_call_id={call_id}", body)
                    if status != 202:
                        raise RuntimeError(f"transcript hook answered {status}: {answer[:300]!r}")
                    size = len(body)
                _wait_for_attaches(fake, call_ids, worker)
                messages = max(len(item["messages"]) for item in fake.transcripts.values())
                processes = {f"gunicorn master (pid {web.process.pid})": _mb(web.process.pid)}
                for pid in web.worker_pids():
                    processes[f"gunicorn worker (pid {pid})"] = _mb(pid)
                processes[f"worker (pid {worker.pid})"] = _mb(worker.pid)
                return Peaks(processes, payload, size, messages)
            finally:
                stop_process(worker)
                stop_process(web.process)
    finally:
        fake.stop()


def _mb(pid: int) -> float:
    return proc_status_kib(pid, "VmHWM") * 1024 / 1e6


def _wait_for_attaches(fake: FakeBitrix24, call_ids: list[str], worker: subprocess.Popen[bytes]) -> None:
    portal = fake.portal_state()
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while not all(call_id in portal.attachments for call_id in call_ids):
        if time.monotonic() > deadline:
            missing = [c for c in call_ids if c not in portal.attachments]
            raise RuntimeError(f"{len(missing)} transcripts not attached within {TIMEOUT_SECONDS} s")
        if worker.poll() is not None:
            raise RuntimeError("the worker process exited")
        time.sleep(0.05)


def run(calls: int = 4) -> list[Row]:
    """One row per process: its peak RSS against the target."""
    measured = peaks(calls)
    label = f"{measured.payload} {measured.payload_bytes / 1e6:.1f} MB, {measured.messages} messages"
    rows = [row(f"memory: one-hour transcript ({label}) × {calls}", WORDS, "words")]
    for name, mb in measured.processes.items():
        rows.append(row(f"memory peak (VmHWM): {name}", mb, "MB", f"≤ {TARGET_MB:g} MB", 0 < mb <= TARGET_MB))
    return rows


def main() -> int:
    """Command line: print the rows; exit 1 when a process is over the target."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=4)
    args = parser.parse_args()
    install_signal_handlers()
    return main_for(run(args.calls))


if __name__ == "__main__":
    sys.exit(main())
