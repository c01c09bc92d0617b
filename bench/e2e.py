"""End-to-end latency: from the transcript hook's 202 to the fake Bitrix24's receipt of
attachTranscription, with an idle fake (no limits) and the real web (gunicorn) and worker
(`flask --app app worker`) processes on a fresh SQLite database.

The finished calls are created directly in the in-process fake, so only the transcripts go
through the service (`?b24_call_id=`). Transcripts are sent one at a time, each after the previous
one was attached. The service's own pacing is opened up (rate and burst 1000) so that it does not
throttle: this measures the path, the pacing has its own bench. Target: p50 ≤ 100 ms.

    python bench/e2e.py [--count 200]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):  # run as a script: import from the repository, not from bench/
    _root = str(Path(__file__).resolve().parent.parent)
    sys.path[:] = [_root] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from bench.common import (
    Row,
    create_finished_calls,
    fresh_database,
    generic_transcript,
    install_signal_handlers,
    main_for,
    percentile,
    post,
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

TARGET_P50_MS = 100.0
WARMUP = 5
TIMEOUT_SECONDS = 15.0


def latencies(count: int = 200, warmup: int = WARMUP) -> list[float]:
    """Seconds from each 202 to the fake's receipt of the call's attachTranscription."""
    fake = start_fake()
    try:
        call_ids = create_finished_calls(fake, warmup + count, prefix="e2e")
        with workspace() as space:
            url = fresh_database(space, "e2e")
            env = service_env(
                space.path,
                url,
                {
                    "B24SCRIBE_BITRIX24_WEBHOOK_URL": fake.webhook_url,
                    "B24SCRIBE_RATE_PER_SECOND": "1000",
                    "B24SCRIBE_RATE_BURST": "1000",
                },
            )
            web = start_web(space, env, name="web-e2e")
            worker = start_worker(space, env, name="worker-e2e")
            try:
                body = generic_transcript(30)
                measured: list[float] = []
                for number, call_id in enumerate(call_ids):
                    status, answer = post(f"{web.url}/hooks/stt/generic?b24_call_id={call_id}", body)
                    acknowledged = time.time()
                    if status != 202:
                        raise RuntimeError(f"transcript hook answered {status}: {answer[:300]!r}")
                    received = _wait_for_attach(fake, call_id, worker)
                    if number >= warmup:
                        measured.append(received - acknowledged)
                return measured
            finally:
                stop_process(worker)
                stop_process(web.process)
    finally:
        fake.stop()


def _wait_for_attach(fake: FakeBitrix24, call_id: str, worker: subprocess.Popen[bytes]) -> float:
    """The fake's timestamp of the call's attach (its clock is time.time())."""
    portal = fake.portal_state()
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while call_id not in portal.attachments:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no attachTranscription for {call_id} within {TIMEOUT_SECONDS} s")
        if worker.poll() is not None:
            raise RuntimeError("the worker process exited")
        time.sleep(0.0005)
    for request in reversed(fake.requests):
        if request.method == "telephony.call.attachtranscription" and request.params.get("CALL_ID") == call_id:
            return request.timestamp
    raise RuntimeError(f"attach of {call_id} is not in the fake's request log")


def run(count: int = 200) -> list[Row]:
    """p50 (target) and p99, mean, max of the 202 → attach latency."""
    measured = [seconds * 1000 for seconds in latencies(count)]
    p50 = percentile(measured, 0.50)
    return [
        row(f"e2e 202 → attach received, p50 of {len(measured)}", p50, "ms", f"≤ {TARGET_P50_MS:g}", p50 <= 100),
        row("e2e 202 → attach received, p99", percentile(measured, 0.99), "ms"),
        row("e2e 202 → attach received, max", max(measured), "ms"),
    ]


def main() -> int:
    """Command line: print the rows; exit 1 when the target is missed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    install_signal_handlers()
    return main_for(run(args.count))


if __name__ == "__main__":
    sys.exit(main())
