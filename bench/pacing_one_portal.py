"""Pacing efficiency on one portal: a burst-exhausting load delivered as fast as the token bucket
allows, without a single 503 from Bitrix24 (the issue's figure; bench/pacing.py does several portals).

The in-process fake Bitrix24 has Bitrix24's real limit (leaky bucket: burst 50, drains 2/s); the
service runs at its defaults (2/s after a burst of 45) with the real web and worker processes.
`count` finished calls are created directly in the fake, then a transcript for each is posted at
once. The clock runs from the fake's first attachTranscription to its last. The fastest our
bucket allows is (count − 45) / 2 s (45 at once, then one every 0.5 s); the fake's would allow
(count − 50) / 2 s. Efficiency = that minimum / measured time. Target: ≥ 0.9 against our bucket,
zero 503s, each call attached once.

    python bench/pacing_one_portal.py [--count 130]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):  # run as a script: import from the repository, not from bench/
    _root = str(Path(__file__).resolve().parent.parent)
    sys.path[:] = [_root] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from bench.common import (
    Row,
    attach_receipts,
    create_finished_calls,
    fresh_database,
    generic_transcript,
    install_signal_handlers,
    main_for,
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

TARGET_EFFICIENCY = 0.9
FAKE_BURST, FAKE_RATE = 50, 2.0  # Bitrix24's limits
OUR_BURST, OUR_RATE = 45, 2.0  # the service's defaults (Settings)
POSTERS = 8


@dataclass(frozen=True)
class Delivery:
    """What the fake saw: first-to-last attach time, 503s, attaches per call."""

    count: int
    seconds: float
    count_503: int
    attached_calls: int
    attaches: int


def deliver(count: int = 130) -> Delivery:
    """Post `count` transcripts for `count` finished calls at once; time their attaches."""
    fake = start_fake()
    try:
        call_ids = create_finished_calls(fake, count, prefix="pacing")
        fake.set_rate_limit(FAKE_BURST, FAKE_RATE)  # Bitrix24's limit, an empty bucket from now on
        with workspace() as space:
            url = fresh_database(space, "pacing")
            env = service_env(space.path, url, {"B24SCRIBE_BITRIX24_WEBHOOK_URL": fake.webhook_url})
            web = start_web(space, env, name="web-pacing")
            worker = start_worker(space, env, name="worker-pacing")
            try:
                body = generic_transcript(30)
                with ThreadPoolExecutor(POSTERS) as pool:
                    answers = list(
                        pool.map(lambda c: post(f"{web.url}/hooks/stt/generic?b24_call_id={c}", body), call_ids)
                    )
                refused = [status for status, _ in answers if status != 202]
                if refused:
                    raise RuntimeError(f"{len(refused)} transcripts refused: {refused[:5]}")
                _wait(fake, call_ids, worker, timeout=(count - OUR_BURST) / OUR_RATE * 2 + 30)
                received = attach_receipts(fake)
                times = sorted(received[c] for c in call_ids)
                return Delivery(
                    count=count,
                    seconds=times[-1] - times[0],
                    count_503=fake.count_503,
                    attached_calls=sum(1 for c in call_ids if c in received),
                    attaches=len(fake.calls_to("telephony.call.attachTranscription")),
                )
            finally:
                stop_process(worker)
                stop_process(web.process)
    finally:
        fake.stop()


def _wait(fake: FakeBitrix24, call_ids: list[str], worker: subprocess.Popen[bytes], timeout: float) -> None:
    portal = fake.portal_state()
    deadline = time.monotonic() + timeout
    while not all(call_id in portal.attachments for call_id in call_ids):
        if time.monotonic() > deadline:
            missing = sum(1 for c in call_ids if c not in portal.attachments)
            raise RuntimeError(f"{missing} transcripts not attached within {timeout:.0f} s")
        if worker.poll() is not None:
            raise RuntimeError("the worker process exited")
        time.sleep(0.05)


def run(count: int = 130) -> list[Row]:
    """Efficiency against our bucket (target) and the fake's, 503s, attaches per call."""
    delivery = deliver(count)
    ours = max(0.0, (count - OUR_BURST) / OUR_RATE)
    theirs = max(0.0, (count - FAKE_BURST) / FAKE_RATE)
    seconds = delivery.seconds
    efficiency = ours / seconds if seconds > 0 else 0.0
    label = f"pacing 1 portal × {count}"
    return [
        row(f"{label}: first to last attach", seconds, "s", f"min {ours:g} s (our bucket)"),
        row(
            f"{label}: efficiency vs our bucket ({OUR_BURST}, {OUR_RATE:g}/s)",
            efficiency,
            "",
            f"≥ {TARGET_EFFICIENCY}",
            efficiency >= TARGET_EFFICIENCY,
        ),
        row(
            f"{label}: efficiency vs Bitrix24's bucket ({FAKE_BURST}, {FAKE_RATE:g}/s)",
            theirs / seconds if seconds > 0 else 0.0,
        ),
        row(f"{label}: 503 from the fake", delivery.count_503, "", "0", delivery.count_503 == 0),
        row(
            f"{label}: calls attached / attach requests",
            f"{delivery.attached_calls} / {delivery.attaches}",
            "",
            f"{count} / {count}",
            delivery.attached_calls == count == delivery.attaches,
        ),
    ]


def main() -> int:
    """Command line: print the rows; exit 1 when a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=130)
    args = parser.parse_args()
    install_signal_handlers()
    return main_for(run(args.count))


if __name__ == "__main__":
    sys.exit(main())
