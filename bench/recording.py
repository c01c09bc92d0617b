"""A 300 MB call recording goes through the service without being held in memory and without
holding up the other calls (contract §9: download to a temporary file, upload streamed from disk).

The real web (gunicorn, gunicorn.conf.py) and worker (`flask --app app worker`) processes of the
Procfile on a fresh database, the in-process fake Bitrix24, and a recording server on 127.0.0.1
(a thread of this process) that serves a WAV file made on the fly from a repeating 1 MiB block:
the file is never a bytes object nor on disk here, and its SHA-256 is taken as it is sent.

One run posts a finished call whose recording is big (`--size-mb`, 300 MB), and as soon as its
download has started, `--calls` other calls at `--rate` calls per second (each a finished event
with a small recording, then its generic transcript). It ends when the big recording is on the
fake's call card and every other transcript is attached. The same run with a 1 MB recording is
the baseline. Printed:

- peak RSS (VmHWM) of the worker (target ≤ 150 MB) and of the web processes (≤ 150 MB each);
- the worker's peak in the big run over the baseline's (≤ 1.25: a streamed file costs the
  worker a constant of bounded buffers — a socket read of up to 8 MiB, the upload's chunks —
  about 10–15 MB over a baseline of ~60 MB; a file held in memory even once would cost 300 MB,
  a ratio of 5 or more, so 1.25 separates the two with room for allocator noise);
- the big recording's time from post to attached, and its size and SHA-256 on the card against
  what was served;
- the other calls' p50/p99 from the finished event's post to the transcript's attach, in the big
  run over the baseline (p50 ≤ 2, p99 ≤ 3: on two cores the transfer takes CPU from the other
  calls, so they may be slower, but a call held up behind the transfer would wait for all of it,
  seconds, i.e. ratios of 10 or more); and how many of them were attached while the big one was
  still in flight (≥ 1: otherwise nothing overlapped and the comparison says nothing).

Pacing of the service is opened up (rate and burst 1000, as bench/e2e.py does): the pacing has its
own benches. Default run: about 1–2 minutes on two cores.

    python bench/recording.py [--size-mb 300] [--calls 100] [--rate 20] [--small-kb 100]
                              [--mbps MEGABITS] [--backend sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as a script: import from the repository, not from bench/
    _root = str(Path(__file__).resolve().parent.parent)
    sys.path[:] = [_root] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from bench.common import (
    LOOPBACK,
    DatabaseProbe,
    Row,
    Web,
    attach_receipts,
    b24_call_ids,
    database,
    generic_transcript,
    install_signal_handlers,
    main_for,
    percentile,
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
    from fake_bitrix24 import FakeBitrix24, RecordAttachment

TARGET_PROCESS_MB = 150.0
TARGET_PEAK_RATIO = 1.25
TARGET_P50_RATIO = 2.0
TARGET_P99_RATIO = 3.0
BASELINE_BYTES = 1_000_000
BLOCK_BYTES = 1024 * 1024  # the repeating block the WAV's samples come from
THROTTLED_CHUNK_BYTES = 64 * 1024  # smaller writes when --mbps paces the transfer
WAV_HEADER_BYTES = 44
DEFAULT_MAX_RECORDING_BYTES = 200 * 1024 * 1024
START_TIMEOUT_SECONDS = 60.0  # from the big call's post to its download starting
TIMEOUT_SECONDS = 60.0  # from the last post to everything attached (a normal drain takes seconds)
POLL_SECONDS = 0.02  # how often the fake is looked at: the big file's "attached" is this late at most


# --- The recording server ------------------------------------------------------------------


def wav_header(data_bytes: int, rate: int = 8000, channels: int = 1, bits: int = 16) -> bytes:
    """The 44-byte RIFF/WAVE header of a PCM file with `data_bytes` of samples."""
    block_align = channels * bits // 8
    fmt = struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block_align, block_align, bits)
    return (
        b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE" + b"fmt " + fmt + b"data" + struct.pack("<I", data_bytes)
    )


def sample_block(seed: int = 24) -> bytes:
    """The block of samples every served file repeats (noise: nothing along the way can shrink it)."""
    return random.Random(seed).randbytes(BLOCK_BYTES)


def wav_chunks(size: int, block: bytes, piece: int = BLOCK_BYTES) -> Iterator[memoryview]:
    """A WAV file of `size` bytes in pieces: the header, then `block` over and over, cut at `size`."""
    yield memoryview(wav_header(size - WAV_HEADER_BYTES))
    left = size - WAV_HEADER_BYTES
    view = memoryview(block)
    while left > 0:
        for offset in range(0, len(view), piece):
            if left <= 0:
                break
            chunk = view[offset : offset + min(piece, left)]
            left -= len(chunk)
            yield chunk


def wav_sha256(size: int) -> str:
    """The SHA-256 of the file the recording server sends at `size` (computed apart from any GET)."""
    digest = hashlib.sha256()
    for chunk in wav_chunks(size, sample_block()):
        digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Served:
    """One file as it was sent: when its GET began and ended, how many bytes, their SHA-256."""

    size: int
    started: float | None = None
    finished: float | None = None
    sent: int = 0
    sha256: str | None = None
    requests: int = 0


class RecordingServer:
    """A PBX's recording server on 127.0.0.1: `/rec/<name>.wav` of a registered size, generated
    while it is sent, optionally paced to `mbps` megabits per second."""

    def __init__(self, mbps: float | None = None) -> None:
        self.mbps = mbps
        self.block = sample_block()
        self.files: dict[str, Served] = {}
        self.lock = threading.Lock()
        self.started = threading.Event()  # set when any GET of `watch` begins
        self.watch: str | None = None
        self._httpd = ThreadingHTTPServer((LOOPBACK, 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="recording-server", daemon=True)

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self._httpd.server_address[1])

    def add(self, name: str, size: int) -> str:
        """Publish a WAV file of `size` bytes (header included); its URL."""
        if size < WAV_HEADER_BYTES:
            raise ValueError(f"a WAV file has at least {WAV_HEADER_BYTES} bytes, not {size}")
        path = f"/rec/{name}.wav"
        self.files[path] = Served(size)
        return f"http://{LOOPBACK}:{self.port}{path}"

    def served(self, url: str) -> Served:
        """What was sent for a URL `add` gave."""
        return self.files["/" + url.split("/", 3)[3]]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                served = server.files.get(self.path)
                if served is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with server.lock:
                    served.requests += 1
                    served.started = time.time()
                if self.path == server.watch:
                    server.started.set()
                self.send_response(200)
                self.send_header("Content-Type", "audio/wav")
                self.send_header("Content-Length", str(served.size))
                self.end_headers()
                digest, sent, began = hashlib.sha256(), 0, time.monotonic()
                pace = server.mbps * 1e6 / 8 if server.mbps else None
                try:
                    piece = THROTTLED_CHUNK_BYTES if pace is not None else BLOCK_BYTES
                    for chunk in wav_chunks(served.size, server.block, piece):
                        self.wfile.write(chunk)
                        digest.update(chunk)
                        sent += len(chunk)
                        if pace is not None and (ahead := began + sent / pace - time.monotonic()) > 0:
                            time.sleep(ahead)
                except OSError:
                    pass  # the client hung up: what was sent is recorded as it is
                with server.lock:
                    served.finished, served.sent, served.sha256 = time.time(), sent, digest.hexdigest()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                pass

        return Handler

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


# --- One run -------------------------------------------------------------------------------


@dataclass
class Measured:
    """One run: peaks (MB), the big recording's fate (None: not on the card by the deadline), the
    other calls' latencies (seconds, in the order they were posted; None: not attached by the
    deadline), how many were posted, and attached, while the big one was in flight, and what the
    worker's backlog held when something was missing."""

    size: int
    worker_mb: float
    web_mb: dict[str, float]
    big_served: Served
    big_posted: float
    big_seen_at: float | None  # when the bench first saw it on the card
    big_attached: RecordAttachment | None
    latencies: list[float | None]
    posted_in_flight: int
    attached_in_flight: int
    backlog_left: str = ""

    @property
    def big_seconds(self) -> float | None:
        """From the big call's post to its recording on the card (None: not by the deadline)."""
        return None if self.big_seen_at is None else self.big_seen_at - self.big_posted

    @property
    def missing(self) -> int:
        """Other calls whose transcript was not attached by the deadline."""
        return sum(seconds is None for seconds in self.latencies)

    @property
    def sha256_matches(self) -> bool:
        """The card's file is exactly the file served, whole."""
        served, attached = self.big_served, self.big_attached
        if attached is None or attached.size != self.size or served.sent != self.size:
            return False
        return served.sha256 == attached.sha256 == wav_sha256(self.size)


def measure(
    size: int,
    calls: int = 100,
    rate: float = 5.0,
    small_bytes: int = 100_000,
    backend: str = "sqlite",
    mbps: float | None = None,
    max_recording_bytes: int | None = None,
    name: str = "recording",
) -> Measured:
    """Post a call with a `size`-byte recording, then `calls` others while it transfers; measure."""
    limit = max_recording_bytes or max(DEFAULT_MAX_RECORDING_BYTES, size + size // 4)
    fake = start_fake()
    try:
        with RecordingServer(mbps) as files, workspace() as space, database(space, backend, name) as url:
            env = service_env(
                space.path,
                url,
                {
                    "B24SCRIBE_BITRIX24_WEBHOOK_URL": fake.webhook_url,
                    "B24SCRIBE_RATE_PER_SECOND": "1000",
                    "B24SCRIBE_RATE_BURST": "1000",
                    "B24SCRIBE_RECORDING_HOSTS": LOOPBACK,
                    "B24SCRIBE_MAX_RECORDING_BYTES": str(limit),
                },
            )
            web = start_web(space, env, name=f"web-{name}")
            worker = start_worker(space, env, name=f"worker-{name}")
            try:
                plan = _Plan(size, calls, rate, small_bytes, mbps)
                return _drive(fake, files, web, worker, url, plan)
            finally:
                stop_process(worker)
                stop_process(web.process)
    finally:
        fake.stop()


@dataclass(frozen=True)
class _Plan:
    size: int
    calls: int
    rate: float
    small_bytes: int
    mbps: float | None

    @property
    def timeout(self) -> float:
        """Seconds from the last post to everything attached: the drain, plus the paced transfer."""
        paced = self.size * 8 / (self.mbps * 1e6) if self.mbps else 0.0
        return TIMEOUT_SECONDS + paced


def _drive(
    fake: FakeBitrix24, files: RecordingServer, web: Web, worker: subprocess.Popen[bytes], url: str, plan: _Plan
) -> Measured:
    """Post the big call, then the others once its download began; wait; read the figures."""
    big_url = files.add("big", plan.size)
    files.watch = "/rec/big.wav"
    big_posted = time.time()
    _post_call(web.url, "rec-big", big_url, transcript=False)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not files.started.wait(0.05):
        if time.monotonic() > deadline or worker.poll() is not None:
            raise RuntimeError(f"the big recording's download did not start within {START_TIMEOUT_SECONDS:g} s")
    posted: dict[str, float] = {}
    began = time.monotonic()
    for number in range(plan.calls):
        if (wait := began + number / plan.rate - time.monotonic()) > 0:
            time.sleep(wait)
        pbx_call_id = f"rec-{number}"
        small_url = files.add(pbx_call_id, plan.small_bytes) if plan.small_bytes else None
        posted[pbx_call_id] = time.time()
        _post_call(web.url, pbx_call_id, small_url, transcript=True)
    big_attached, big_seen_at, receipts = _wait_until_attached(fake, worker, posted, plan.timeout)
    b24_ids = b24_call_ids(fake)
    arrived = [receipts.get(b24_ids.get(call, "")) for call in posted]
    latencies = [None if at is None else at - posted_at for at, posted_at in zip(arrived, posted.values(), strict=True)]
    download_started = files.served(big_url).started or big_posted
    landed = big_seen_at if big_seen_at is not None else time.time()
    backlog = ""
    if big_attached is None or None in latencies:
        with DatabaseProbe(url) as probe:
            backlog = probe.backlog_summary()
    web_mb = {f"gunicorn master (pid {web.process.pid})": _mb(web.process.pid)}
    web_mb.update({f"gunicorn worker (pid {pid})": _mb(pid) for pid in web.worker_pids()})
    return Measured(
        size=plan.size,
        worker_mb=_mb(worker.pid),
        web_mb=web_mb,
        big_served=files.served(big_url),
        big_posted=big_posted,
        big_seen_at=big_seen_at,
        big_attached=big_attached,
        latencies=latencies,
        posted_in_flight=sum(download_started <= at <= landed for at in posted.values()),
        attached_in_flight=sum(at is not None and download_started <= at <= landed for at in arrived),
        backlog_left=backlog,
    )


def _post_call(base: str, pbx_call_id: str, recording_url: str | None, transcript: bool) -> None:
    """The PBX's finished event (with its recording's URL), then the STT vendor's transcript."""
    event: dict[str, Any] = {
        "event": "call.finished",
        "call_id": pbx_call_id,
        "direction": "inbound",
        "from": "+15551234567",
        "extension": "101",
        "duration": 73,
        "status": "answered",
        "started_at": "2026-12-07T10:00:00+00:00",
    }
    if recording_url:
        event["recording_url"] = recording_url
    status, answer = post(f"{base}/hooks/pbx/generic", json.dumps(event).encode())
    if status not in (200, 202):
        raise RuntimeError(f"the PBX hook answered {status}: {answer[:300]!r}")
    if transcript:
        status, answer = post(f"{base}/hooks/stt/generic?pbx=generic&call={pbx_call_id}", generic_transcript(30))
        if status not in (200, 202):
            raise RuntimeError(f"the transcript hook answered {status}: {answer[:300]!r}")


def _wait_until_attached(
    fake: FakeBitrix24, worker: subprocess.Popen[bytes], posted: dict[str, float], timeout: float
) -> tuple[RecordAttachment | None, float | None, dict[str, float]]:
    """Wait (at most `timeout`) for the big recording on the card and every other call's
    transcript: (the big recording's attachment and when it was first seen on the card, or None;
    CALL_ID → when its transcript arrived). The attachment's own `at` is when its upload began:
    the file is on the card once the upload is stored, so the bench looks every POLL_SECONDS."""
    deadline = time.monotonic() + timeout
    seen_at: float | None = None
    while True:
        b24_ids = b24_call_ids(fake)
        receipts = attach_receipts(fake)
        big = fake.records_by_call(None).get(b24_ids.get("rec-big", ""), [])
        if big and seen_at is None:
            seen_at = time.time()
        everyone = all(b24_ids.get(call) in receipts for call in posted)
        if (big and everyone) or time.monotonic() > deadline:
            return (big[-1] if big else None), seen_at, receipts
        if worker.poll() is not None:
            raise RuntimeError("the worker process exited")
        time.sleep(POLL_SECONDS)


def _mb(pid: int) -> float:
    return proc_status_kib(pid, "VmHWM") * 1024 / 1e6


# --- Rows ----------------------------------------------------------------------------------


def run(
    size_mb: float = 300.0,
    calls: int = 100,
    rate: float = 5.0,
    small_kb: float = 100.0,
    backend: str = "sqlite",
    mbps: float | None = None,
) -> list[Row]:
    """The big run and its 1 MB baseline, side by side."""
    size = int(size_mb * 1e6)
    limit = max(DEFAULT_MAX_RECORDING_BYTES, size + size // 4)
    small = int(small_kb * 1000)
    # the same settings in both runs (the limit too): only the big file's size and pace differ
    baseline = measure(BASELINE_BYTES, calls, rate, small, backend, None, limit, name="recording-1mb")
    big = measure(size, calls, rate, small, backend, mbps, limit, name="recording-big")
    return rows_for(big, baseline, backend, mbps)


def rows_for(big: Measured, baseline: Measured, backend: str = "sqlite", mbps: float | None = None) -> list[Row]:
    """The table: peaks, the big file's transfer and digest, the other calls' latencies."""
    label = f"{big.size / 1e6:g} MB"
    pace = f", served at {mbps:g} Mbit/s" if mbps else ""
    rows: list[Row] = []
    for measured, run_label in ((big, label), (baseline, "1 MB")):
        mb = measured.worker_mb
        name = f"recording {run_label}, {backend}: worker peak RSS (VmHWM)"
        rows.append(row(name, mb, "MB", f"≤ {TARGET_PROCESS_MB:g} MB", 0 < mb <= TARGET_PROCESS_MB))
    for process, mb in big.web_mb.items():
        name = f"recording {label}: {process} peak RSS"
        rows.append(row(name, mb, "MB", f"≤ {TARGET_PROCESS_MB:g} MB", 0 < mb <= TARGET_PROCESS_MB))
    ratio = big.worker_mb / baseline.worker_mb if baseline.worker_mb else float("inf")
    name = f"recording: worker peak RSS, {label} run / 1 MB run"
    rows.append(row(name, ratio, "×", f"≤ {TARGET_PEAK_RATIO:g}", ratio <= TARGET_PEAK_RATIO))
    rows += _big_file_rows(big, label + pace)
    for measured, run_label in ((big, label), (baseline, "1 MB")):
        calls = len(measured.latencies)
        attached = f"{calls - measured.missing} of {calls}"
        name = f"recording {run_label} run: other calls' transcripts attached"
        rows.append(row(name, attached, "", "all", measured.missing == 0))
        if measured.backlog_left:
            rows.append(row(f"recording {run_label} run: backlog left at the deadline", measured.backlog_left))
    return rows + _other_calls_rows(big, baseline, label)


def _big_file_rows(big: Measured, label: str) -> list[Row]:
    attached = big.big_attached
    if attached is None or big.big_seconds is None:
        return [row(f"recording {label}: on the card", "not by the deadline", "", "attached", False)]
    rate = big.size / 1e6 / big.big_seconds if big.big_seconds > 0 else 0.0
    digest = f"{(attached.sha256 or '?')[:12]}… via {attached.via}, {attached.size or 0:,} B"
    served = big.big_served
    started, finished = served.started or big.big_posted, served.finished or big.big_posted
    stored = (big.big_seen_at or attached.at) - attached.at  # `at`: when the upload began
    steps = (
        f"post → GET {started - big.big_posted:.1f} s, served in {finished - started:.1f} s, "
        f"upload began +{attached.at - finished:.1f} s, stored in {stored:.1f} s"
    )
    return [
        row(f"recording {label}: post → attached on the card", big.big_seconds, "s"),
        row(f"recording {label}: where the time went", steps),
        row(f"recording {label}: end to end (download, upload)", rate, "MB/s"),
        row(f"recording {label}: card's file = file served (sha256, size)", digest, "", "equal", big.sha256_matches),
    ]


def _other_calls_rows(big: Measured, baseline: Measured, label: str) -> list[Row]:
    """The calls posted while the big file was in flight (the first ones: posting starts with its
    download) against the same calls of the baseline, posted on the same schedule."""
    overlapped = big.posted_in_flight
    pairs = [
        (during, alone)
        for during, alone in zip(big.latencies[:overlapped], baseline.latencies[:overlapped], strict=True)
        if during is not None and alone is not None
    ]
    if not pairs:
        return [
            row(f"recording: other calls posted and attached while the {label} one was in flight", 0, "", "≥ 1", False)
        ]
    rows: list[Row] = []
    for fraction, target in ((0.50, TARGET_P50_RATIO), (0.99, TARGET_P99_RATIO)):
        tag = f"p{fraction * 100:.0f}"
        during = percentile([d for d, _ in pairs], fraction) * 1000
        alone = percentile([a for _, a in pairs], fraction) * 1000
        rows.append(row(f"recording: {len(pairs)} other calls' post → transcript, {tag} during {label}", during, "ms"))
        rows.append(row(f"recording: the same {len(pairs)} calls, {tag} with 1 MB", alone, "ms"))
        ratio = during / alone if alone > 0 else float("inf")
        name = f"recording: other calls' {tag}, during {label} / with 1 MB"
        rows.append(row(name, ratio, "×", f"≤ {target:g}", ratio <= target))
    everyone = [seconds for seconds in big.latencies if seconds is not None]
    name = f"recording: all {len(everyone)} other calls' post → transcript, p99 ({label} run)"
    rows.append(row(name, percentile(everyone, 0.99) * 1000, "ms"))
    name = f"recording: other calls attached while the {label} one was in flight"
    count = big.attached_in_flight
    rows.append(row(name, count, f"of {overlapped} posted", "≥ 1", count >= 1))
    return rows


def main() -> int:
    """Command line: print the rows; exit 1 when a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=300.0, help="the big recording, MB (10^6 bytes)")
    parser.add_argument("--calls", type=int, default=100, help="other calls posted during the transfer")
    parser.add_argument("--rate", type=float, default=5.0, help="other calls posted per second")
    parser.add_argument("--small-kb", type=float, default=100.0, help="the other calls' recordings, kB (0: none)")
    parser.add_argument("--mbps", type=float, default=None, help="serve the big file at this many Mbit/s")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()
    if args.calls < 1 or args.rate <= 0 or args.size_mb * 1e6 < WAV_HEADER_BYTES:
        parser.error("--calls must be ≥ 1, --rate > 0 and --size-mb at least a WAV header")
    install_signal_handlers()
    return main_for(run(args.size_mb, args.calls, args.rate, args.small_kb, args.backend, args.mbps))


if __name__ == "__main__":
    sys.exit(main())
