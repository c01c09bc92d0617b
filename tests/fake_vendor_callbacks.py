"""What the fake STT vendors (tests/fake_deepgram.py, fake_assemblyai.py, fake_revai.py) share.

Each takes a submission, answers it at once, then calls a URL of b24scribe's back with the result,
retrying while the answer does not end the delivery. The test steers that from outside: fail the next
submissions, take one but drop its answer, hold the callbacks and let them go, wait for the attempts;
for a vendor whose API shows a job's status (AssemblyAI, Rev.ai), keep the jobs processing or end them
failed (the Deepgram fake has no status to show and ignores those).
`FakeVendorWithCallbacks` holds those controls, the loopback server and the delivery loop; each vendor's
fake keeps its own routes, bodies, error shapes and its rule of which answer ends a delivery.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Generic, Protocol, Self, TypeVar

_NO_PROXY = urllib.request.ProxyHandler({})  # tests talk to 127.0.0.1 whatever http_proxy says


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx to a callback is an answer like any other, not a place to go


AUDIO_OPENER = urllib.request.build_opener(_NO_PROXY)  # for the fakes that fetch a submitted audio URL
_CALLBACK_OPENER = urllib.request.build_opener(_NO_PROXY, _NoRedirect)


@dataclass
class Reply:
    """An answer of a fake: its status, its body (sent as JSON unless it is bytes) and extra headers."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that sends `Reply`s and keeps http.server's access log out of the test output."""

    def send_reply(self, reply: Reply, content_type: str = "application/json") -> None:
        data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's naming)
        return


class Submission(Protocol):
    """What the shared part reads and writes of a vendor fake's own submission record."""

    accepted: bool  # it will call back (also true for a dropped answer)
    answered: int | None  # the status sent; None when the answer was dropped


SubmissionT = TypeVar("SubmissionT", bound=Submission)
AttemptT = TypeVar("AttemptT")


@dataclass
class FakeVendorWithCallbacks(Generic[SubmissionT, AttemptT]):
    """A fake vendor that calls back with each submission's result; records what it was sent and did."""

    callback_delay: float = 0.2  # seconds from taking a submission to the first callback attempt
    callback_retries: int = 3  # attempts after the first while the answer does not end the delivery
    callback_retry_interval: float = 0.2
    submissions: list[SubmissionT] = field(default_factory=list)
    callbacks: list[AttemptT] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: deque[tuple[int, int | None]] = deque()
        self._drops = 0
        self._released = threading.Event()
        self._released.set()
        self._processed = threading.Event()
        self._processed.set()
        self.job_failure: str | None = None  # fail_jobs(): the reason every later job ends failed with
        self._stopping = threading.Event()
        self._workers: list[threading.Thread] = []

    @property
    def url(self) -> str:
        assert self.server is not None, "start() the fake first"
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail_next(self, status: int, times: int = 1, retry_after: int | None = None) -> None:
        """Answer the next `times` authenticated submissions with `status` and the vendor's error body."""
        with self._lock:
            self._failures.extend([(status, retry_after)] * times)

    def drop_after_accept(self, times: int = 1) -> None:
        """Take the next `times` submissions (they will call back) but close the connection unanswered."""
        with self._lock:
            self._drops += times

    def hold_callbacks(self) -> None:
        """Keep every callback waiting until release_callbacks()."""
        self._released.clear()

    def release_callbacks(self) -> None:
        """Let the held callbacks, and every later one, go."""
        self._released.set()

    def keep_processing(self) -> None:
        """Keep every job processing (its status says so, no callback goes) until finish_processing()."""
        self._processed.clear()

    def finish_processing(self) -> None:
        """Let the jobs kept processing, and every later one, finish."""
        self._processed.set()

    def fail_jobs(self, reason: str) -> None:
        """End every job that finishes from now on as failed on the vendor's side, with this reason."""
        self.job_failure = reason

    def _processing_ends(self) -> bool:
        """Wait while the jobs are kept processing; False when stop() came first."""
        self._processed.wait()
        return not self._stopping.is_set()

    def wait_for_callbacks(self, count: int = 1, timeout: float = 5.0) -> list[AttemptT]:
        """The callback attempts, once there are at least `count` of them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.callbacks) >= count:
                    return list(self.callbacks)
            time.sleep(0.02)
        raise AssertionError(f"expected {count} callback attempt(s) within {timeout} s, got {len(self.callbacks)}")

    def stop(self) -> None:
        """Stop serving and end the pending callbacks, held ones included."""
        self._stopping.set()
        self._released.set()
        self._processed.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        for worker in self._workers:
            worker.join(timeout=2)

    def _serve(self, handler: type[BaseHTTPRequestHandler]) -> Self:
        """Serve `handler` on a free port of 127.0.0.1 in a background thread."""
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def _queued_failure(self, error_body: Callable[[int], Any]) -> Reply | None:
        """The answer fail_next() queued for this submission, with the vendor's error body; None if none is."""
        with self._lock:
            failure = self._failures.popleft() if self._failures else None
        if failure is None:
            return None
        status, retry_after = failure
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        return Reply(status, error_body(status), headers)

    def _accept(self, submission: SubmissionT) -> bool:
        """Take the submission and start its processing; True when its answer is to be dropped."""
        with self._lock:
            dropped = self._drops > 0
            self._drops -= 1 if dropped else 0
        submission.accepted = True
        submission.answered = None if dropped else 200
        worker = threading.Thread(target=self._process, args=(submission,), daemon=True)
        self._workers.append(worker)
        worker.start()
        return dropped

    def _process(self, submission: SubmissionT) -> None:
        """Make the submission's result and deliver it: the vendor's own part, run in a worker thread."""
        raise NotImplementedError

    def _ends_delivery(self, status: int) -> bool:
        """Whether this answer to a callback stops the retries; the vendor's rule, a 2xx unless it says otherwise."""
        return 200 <= status < 300

    def _deliver(
        self,
        url: str,
        data: bytes,
        headers: dict[str, str],
        attempt: Callable[[int | None, float], AttemptT],
        method: str = "POST",
    ) -> None:
        """Send `data` to `url` until an answer ends the delivery or the retries run out, recording each try.

        `attempt(status, time)` makes the record (status None: the connection failed). Waits while the
        callbacks are held; stop() ends the delivery.
        """
        for number in range(1 + self.callback_retries):
            if number and self._stopping.wait(self.callback_retry_interval):
                return
            self._released.wait()  # stop() sets it too
            if self._stopping.is_set():
                return
            request = urllib.request.Request(url, data=data, method=method, headers=headers)
            status: int | None
            try:
                with _CALLBACK_OPENER.open(request, timeout=5) as response:
                    status = response.status
            except urllib.error.HTTPError as error:
                status = error.code
            except (OSError, ValueError):  # refused, timed out, or a URL http.client cannot send to
                status = None
            with self._lock:
                self.callbacks.append(attempt(status, time.time()))
            if status is not None and self._ends_delivery(status):
                return
