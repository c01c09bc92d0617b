"""From hang-up to transcript on the card, when b24scribe asks the vendor itself (contract §10).

The Procfile's web (gunicorn) and worker (`flask --app app worker`) on a fresh database, the fake
Bitrix24, a recording server and a fake Deepgram (tests/fake_deepgram.py) on 127.0.0.1 that takes each
submission and calls back after `--vendor-seconds`. `--calls` answered calls with a stereo recording are
posted at `--rate` per second (each one `call.finished` with its recording's URL, nothing else); each
ends with register, finish, attachRecord and attachTranscription on the fake's card.

Printed per call, from the `call.finished` post to the transcript's attach received by the fake:
the whole time, the vendor's own time (its submission received → its callback sent: what Deepgram
would spend transcribing) and what is left, b24scribe's part (p50, p99). Target: b24scribe's part p50
≤ 2 s, p99 ≤ 5 s (the worker polls, downloads, uploads the recording to the vendor, then folds the
callback and sends; seconds, not the minutes a glue script's cron would add).

    python bench/transcribe.py [--calls 40] [--rate 4] [--vendor-seconds 1.0] [--backend sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):  # run as a script: import from the repository, not from bench/
    _root = str(Path(__file__).resolve().parent.parent)
    sys.path[:] = [_root] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from bench.common import (
    LOOPBACK,
    Row,
    attach_receipts,
    b24_call_ids,
    database,
    free_port,
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
from bench.recording import RecordingServer
from tests.fake_deepgram import FakeDeepgram

if TYPE_CHECKING:
    from fake_bitrix24 import FakeBitrix24

TARGET_P50 = 2.0
TARGET_P99 = 5.0
TIMEOUT_SECONDS = 120.0


def run(calls: int = 40, rate: float = 4.0, vendor_seconds: float = 1.0, backend: str = "sqlite") -> list[Row]:
    """Post the calls, wait for every transcript on the card, and split each call's time."""
    fake = start_fake()
    deepgram = FakeDeepgram(callback_delay=vendor_seconds).start()
    try:
        with RecordingServer() as files, workspace() as space, database(space, backend, "transcribe") as url:
            port = free_port()  # the web's own URL is the public URL the vendor calls back
            env = service_env(
                space.path,
                url,
                {
                    "B24SCRIBE_BITRIX24_WEBHOOK_URL": fake.webhook_url,
                    "B24SCRIBE_RATE_PER_SECOND": "1000",
                    "B24SCRIBE_RATE_BURST": "1000",
                    "B24SCRIBE_RECORDING_HOSTS": LOOPBACK,
                    "B24SCRIBE_PUBLIC_URL": f"http://{LOOPBACK}:{port}",
                    "B24SCRIBE_TRANSCRIBE_WITH": "deepgram",
                    "B24SCRIBE_DEEPGRAM_API_KEY": deepgram.api_key,
                    "B24SCRIBE_DEEPGRAM_API_URL": deepgram.url,
                },
            )
            web = start_web(space, env, name="web-transcribe", port=port)
            worker = start_worker(space, env, name="worker-transcribe")
            try:
                posted = _post_calls(web.url, files, calls, rate)
                arrived = _wait(fake, posted)
            finally:
                stop_process(worker)
                stop_process(web.process)
    finally:
        deepgram.stop()
        fake.stop()
    return _rows(posted, arrived, deepgram, backend)


def _post_calls(base: str, files: RecordingServer, calls: int, rate: float) -> dict[str, float]:
    posted: dict[str, float] = {}
    began = time.monotonic()
    for number in range(calls):
        if (wait := began + number / rate - time.monotonic()) > 0:
            time.sleep(wait)
        pbx_call_id = f"tr-{number}"
        event = {
            "event": "call.finished",
            "call_id": pbx_call_id,
            "direction": "inbound",
            "from": "+15551234567",
            "extension": "101",
            "duration": 73,
            "status": "answered",
            "started_at": "2026-12-07T10:00:00+00:00",
            "recording_url": files.add(pbx_call_id, 300_000),
            "recording_channels": 2,
        }
        posted[pbx_call_id] = time.time()
        status, answer = post(f"{base}/hooks/pbx/generic", json.dumps(event).encode())
        if status not in (200, 202):
            raise RuntimeError(f"the PBX hook answered {status}: {answer[:300]!r}")
    return posted


def _wait(fake: FakeBitrix24, posted: dict[str, float]) -> dict[str, float]:
    """Per PBX call id, when its transcript's attach reached the fake (at most TIMEOUT_SECONDS)."""
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while True:
        ids = b24_call_ids(fake)
        receipts = attach_receipts(fake)
        arrived = {call: receipts[ids[call]] for call in posted if ids.get(call) in receipts}
        if len(arrived) == len(posted) or time.monotonic() > deadline:
            return arrived
        time.sleep(0.05)


def _rows(posted: dict[str, float], arrived: dict[str, float], deepgram: FakeDeepgram, backend: str) -> list[Row]:
    """Each call's time, the vendor's own part (its submission taken → its callback answered 2xx)
    and what is left: b24scribe's part."""
    taken = {sub.request_id: sub for sub in deepgram.submissions if sub.accepted}
    vendor_time: dict[str, float] = {}
    for attempt in deepgram.callbacks:
        sub = taken.get(attempt.request_id)
        if sub is not None and attempt.status is not None and 200 <= attempt.status < 300:
            vendor_time[sub.extra.get("b24scribe_call", "")] = attempt.time - sub.time
    total = [arrived[call] - posted[call] for call in arrived]
    ours = [arrived[call] - posted[call] - vendor_time.get(call, 0.0) for call in arrived]
    label = f"transcribe ({backend}, {len(posted)} calls)"
    done = f"{len(arrived)} of {len(posted)}"
    rows = [row(f"{label}: transcripts on the card", done, "", "all", len(arrived) == len(posted))]
    if total:
        rows.append(row(f"{label}: finished → transcript on the card, p50", percentile(total, 0.5), "s"))
        vendor = list(vendor_time.values()) or [0.0]
        rows.append(row(f"{label}: the vendor's own time (taken → called back), p50", percentile(vendor, 0.5), "s"))
        for fraction, target in ((0.5, TARGET_P50), (0.99, TARGET_P99)):
            figure = percentile(ours, fraction)
            name = f"{label}: b24scribe's part (vendor subtracted), p{fraction * 100:.0f}"
            rows.append(row(name, figure, "s", f"≤ {target:g} s", figure <= target))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--vendor-seconds", type=float, default=1.0, help="the fake vendor's time per call")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()
    install_signal_handlers()
    return main_for(run(args.calls, args.rate, args.vendor_seconds, args.backend))


if __name__ == "__main__":
    sys.exit(main())
