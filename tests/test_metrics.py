"""/metrics: what was received and refused, what Bitrix24 answered, and the queue as the database has it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from flask.testing import FlaskClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from b24scribe import metrics
from b24scribe.bitrix24 import AmbiguousError, PermanentError, ThrottledError, TransientError
from b24scribe.worker import Worker
from tests.conftest import INBOUND_TOKEN, auth
from tests.fake_bitrix24 import FakeBitrix24
from tests.operations import FINISHED, make_dead_attach, post_call, running_stack, wait_until

REGISTER = "telephony.externalCall.register"


def sample(name: str, **labels: str) -> float:
    """A counter's current value in this process (0 if never touched)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Delta:
    """How much a counter grew while a block ran."""

    def __init__(self, name: str, **labels: str) -> None:
        self.name, self.labels, self.before = name, labels, sample(name, **labels)

    @property
    def value(self) -> float:
        return sample(self.name, **self.labels) - self.before


def scrape(client: FlaskClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=")
    return parse(response.get_data(as_text=True))


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_events_received_are_counted_by_source_provider_and_outcome(client: FlaskClient) -> None:
    accepted = Delta("b24scribe_events_received_total", source="pbx", provider="generic", outcome="accepted")
    duplicate = Delta("b24scribe_events_received_total", source="pbx", provider="generic", outcome="duplicate")
    rejected = Delta("b24scribe_events_received_total", source="pbx", provider="generic", outcome="rejected")

    post_call(client)
    post_call(client)
    client.post("/hooks/pbx/generic", json={**FINISHED, "status": "voicemail"}, headers=auth())

    assert (accepted.value, duplicate.value, rejected.value) == (1, 1, 1)


def test_refused_requests_are_counted_by_reason(client: FlaskClient) -> None:
    bad = Delta("b24scribe_rejections_total", source="pbx", provider="generic", reason="bad_credentials")

    client.post("/hooks/pbx/generic", json=FINISHED, headers=auth("not-the-token"))

    assert bad.value == 1


def test_bitrix24_requests_are_counted_by_method_and_outcome(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24
) -> None:
    ok = Delta("b24scribe_bitrix24_requests_total", method=REGISTER, outcome="ok")
    failed = Delta("b24scribe_bitrix24_requests_total", method=REGISTER, outcome="transient")
    http_500 = Delta("b24scribe_bitrix24_errors_total", method=REGISTER, code="INTERNAL_SERVER_ERROR")
    timed = Delta("b24scribe_bitrix24_request_seconds_count", method=REGISTER)
    fake_bitrix24.inject("telephony.externalCall.register", 500, {"error": "INTERNAL_SERVER_ERROR"})

    post_call(client)
    worker.drain()
    with worker.db.write() as session:  # make the retried job due now
        from b24scribe.models import Job

        for job in session.query(Job).filter(Job.state == "pending"):
            job.next_attempt_at = 0
    worker.drain()

    assert (failed.value, http_500.value, ok.value, timed.value) == (1, 1, 1, 2)


def test_throttling_pauses_and_dead_jobs_are_counted(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24
) -> None:
    pauses = Delta("b24scribe_throttle_pauses_total", reason="QUERY_LIMIT_EXCEEDED")
    limit = Delta("b24scribe_bitrix24_errors_total", method=REGISTER, code="QUERY_LIMIT_EXCEEDED")
    dead = Delta("b24scribe_jobs_dead_total", kind="attach")
    dead_runs = Delta("b24scribe_job_runs_total", kind="attach", state="dead")
    done_runs = Delta("b24scribe_job_runs_total", kind="register", state="done")
    fake_bitrix24.inject("telephony.externalCall.register", 503)  # QUERY_LIMIT_EXCEEDED

    post_call(client)
    worker.drain()
    assert (pauses.value, limit.value) == (1, 1)
    with worker.db.write() as session:  # end the pause
        from b24scribe.models import Job, PortalPacing

        session.query(PortalPacing).update({"paused_until": 0.0, "tokens": 1000.0})
        session.query(Job).update({"next_attempt_at": 0.0})
    make_dead_attach(client, worker, fake_bitrix24)

    assert (dead.value, dead_runs.value, done_runs.value) == (1, 1, 1)


def test_the_queue_gauges_come_from_the_database(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24
) -> None:
    assert scrape(client)[("b24scribe_worker_heartbeat_age_seconds", ())] == float("inf")
    make_dead_attach(client, worker, fake_bitrix24)
    post_call(client, "second-call")  # register pending: due now
    worker.housekeeping()
    client.post("/hooks/pbx/generic", json={**FINISHED, "status": "voicemail"}, headers=auth())

    samples = scrape(client)

    assert samples[("b24scribe_jobs", (("state", "dead"),))] == 1
    assert ("b24scribe_jobs", (("state", "done"),)) not in samples  # history: b24scribe_job_runs_total counts it
    assert samples[("b24scribe_jobs", (("state", "pending"),))] == 1
    assert samples[("b24scribe_jobs", (("state", "leased"),))] == 0
    assert samples[("b24scribe_oldest_due_job_age_seconds", ())] >= 0
    assert samples[("b24scribe_worker_heartbeat_age_seconds", ())] < 5
    assert samples[("b24scribe_workers", ())] == 1
    assert samples[("b24scribe_rejected_events", ())] == 1
    assert samples[("b24scribe_transcripts", (("state", "queued"),))] == 1
    assert samples[("b24scribe_transcripts", (("state", "failed"),))] == 0


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (PermanentError("bad", 400, "ERROR_ARGUMENT"), "ERROR_ARGUMENT"),
        (PermanentError("Call is not found", 400, ""), "ERROR_CORE"),
        (TransientError("Bitrix24 answered HTTP 502 without JSON", 502), "HTTP_502"),
        (TransientError("could not connect", None, None), "UNREACHABLE"),
        (AmbiguousError("no answer", None, None), "NO_ANSWER"),
        (ThrottledError("Too many requests", 503, "QUERY_LIMIT_EXCEEDED"), "QUERY_LIMIT_EXCEEDED"),
    ],
)
def test_error_codes_are_a_bounded_label(error: Exception, code: str) -> None:
    assert metrics.error_code(error) == code  # type: ignore[arg-type]


def test_the_default_metrics_directory_is_private_and_shared_by_one_deployment(tmp_path: Path) -> None:
    one = metrics.default_multiprocess_dir("sqlite:///instance/b24scribe.sqlite3", cwd="/srv/a")
    same = metrics.default_multiprocess_dir("sqlite:///instance/b24scribe.sqlite3", cwd="/srv/a")
    other = metrics.default_multiprocess_dir("sqlite:///instance/b24scribe.sqlite3", cwd="/srv/b")
    assert one == same != other
    assert "sqlite" not in str(one)  # the URL (it may hold a password) is hashed


def test_files_of_dead_processes_are_removed_at_start(tmp_path: Path) -> None:
    import os

    (tmp_path / f"counter_{os.getpid()}.db").write_bytes(b"")
    (tmp_path / "counter_999999999.db").write_bytes(b"")

    assert metrics.remove_dead_process_files(str(tmp_path)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [f"counter_{os.getpid()}.db"]


@pytest.fixture
def stack_fake() -> Iterator[FakeBitrix24]:
    with FakeBitrix24() as fake:
        yield fake


def test_metrics_merge_every_gunicorn_worker_and_the_delivery_worker(
    tmp_path: Path, database_url: str, stack_fake: FakeBitrix24
) -> None:
    """The README's way of running (web + worker, no PROMETHEUS_MULTIPROC_DIR) exports one merged view."""
    stack_fake.inject("telephony.externalCall.register", 500, {"error": "INTERNAL_SERVER_ERROR"})
    environ = {
        "B24SCRIBE_DATABASE_URL": database_url,
        "B24SCRIBE_BITRIX24_WEBHOOK_URL": stack_fake.webhook_url,
        "B24SCRIBE_INBOUND_TOKEN": INBOUND_TOKEN,
        "B24SCRIBE_RETRY_SCHEDULE": "0.2,0.2,0.2",
    }
    with running_stack(tmp_path, environ, web_workers=2) as stack:
        session = requests.Session()
        for n in range(12):  # new connections: spread over both web processes
            answer = requests.post(
                f"{stack.url}/hooks/pbx/generic", json={**FINISHED, "call_id": f"mp-{n}"}, headers=auth(), timeout=10
            )
            assert answer.status_code == 202, answer.text

        def delivered() -> bool:
            now = parse(session.get(f"{stack.url}/metrics", timeout=10).text)
            finished = now.get(("b24scribe_job_runs_total", (("kind", "finish"), ("state", "done"))), 0)
            open_jobs = sum(now[("b24scribe_jobs", (("state", state),))] for state in ("waiting", "pending", "leased"))
            return finished == 12 and open_jobs == 0  # every call registered and finished, nothing left

        wait_until(delivered, timeout=60, message="every call registered and finished")
        text = session.get(f"{stack.url}/metrics", timeout=10).text
        samples = parse(text)

    received = samples[
        ("b24scribe_events_received_total", (("outcome", "accepted"), ("provider", "generic"), ("source", "pbx")))
    ]
    assert received == 12  # counted in two web processes, merged
    assert samples[("b24scribe_bitrix24_errors_total", (("code", "INTERNAL_SERVER_ERROR"), ("method", REGISTER)))] == 1
    assert samples[("b24scribe_bitrix24_requests_total", (("method", REGISTER), ("outcome", "ok")))] == 12
    assert samples[("b24scribe_job_runs_total", (("kind", "finish"), ("state", "done")))] == 12
    # web and worker processes each wrote their own file into the private default directory
    assert len(list(tmp_path.glob("b24scribe-metrics-*/counter_*.db"))) >= 2


def test_a_squatted_default_directory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    url = "sqlite:///instance/b24scribe.sqlite3"
    elsewhere = tmp_path / "someone-elses"
    elsewhere.mkdir()
    metrics.default_multiprocess_dir(url).symlink_to(elsewhere)

    with pytest.raises(RuntimeError, match="not a directory owned by this user"):
        metrics.prepare_multiprocess_dir(url)
    assert metrics.MULTIPROC_ENV not in __import__("os").environ
