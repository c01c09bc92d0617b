"""Logs are JSON lines with request, event, job and call ids, and never hold a secret or a transcript."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
from datetime import timedelta
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import requests
import structlog
from flask.testing import FlaskClient

from b24scribe.logging import configure_logging, redact
from b24scribe.worker import Worker
from tests.conftest import ADMIN_TOKEN, INBOUND_TOKEN, WEBHOOK_SECRET, admin, auth
from tests.fake_bitrix24 import FakeBitrix24
from tests.operations import CALL_ID, FINISHED, ROOT, SENTENCE, TRANSCRIPT, running_stack, wait_until


def webhook_code(fake: FakeBitrix24) -> str:
    return fake.webhook_url.rstrip("/").rsplit("/", 1)[1]


def secrets_in(text: str, code: str) -> list[str]:
    """Which of the test's secrets (and the webhook URL's `code`) appear in `text`."""
    candidates = {
        "inbound token": INBOUND_TOKEN,
        "admin token": ADMIN_TOKEN,
        "webhook secret": WEBHOOK_SECRET,
        "webhook URL code": code,
        "transcript sentence": SENTENCE,
    }
    return [name for name, secret in candidates.items() if secret in text]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("POST /hooks/stt/generic?token=abc123&pbx=x HTTP/1.1", "POST /hooks/stt/generic?token=***&pbx=x HTTP/1.1"),
        ("pbx=x&token=abc123", "pbx=x&token=***"),
        ("token=abc123", "token=***"),
        ("Authorization: Bearer abc.def-123", "Authorization: Bearer ***"),
        (
            "url: /rest/1/k3y9code/telephony.externalCall.register.json",
            "url: /rest/1/***/telephony.externalCall.register.json",
        ),
        ("secret whsec_c2VjcmV0", "secret whsec_***"),
        ("access_token_name=kept", "access_token_name=kept"),
    ],
)
def test_redact(line: str, expected: str) -> None:
    assert redact(line) == expected


def load_gunicorn_config() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gunicorn_conf", ROOT / "gunicorn.conf.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_access_log_holds_no_token() -> None:
    config = load_gunicorn_config()
    from gunicorn.config import Config

    settings = Config()
    settings.set("accesslog", "-")
    every_atom = " ".join(f"%({name})s" for name in ("r", "q", "U", "{authorization}i", "{cookie}i"))
    settings.set("access_log_format", f'{every_atom} %({{x-request-id}}o)s %({{http_authorization}}e)s "%(a)s"')
    logger = config.RedactingLogger(settings)
    written = io.StringIO()
    handler = logging.StreamHandler(written)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.access_log.handlers[:] = [handler]
    environ = {
        "REQUEST_METHOD": "POST",
        "RAW_URI": f"/hooks/pbx/asterisk?event=finished&token={INBOUND_TOKEN}",
        "PATH_INFO": "/hooks/pbx/asterisk",
        "QUERY_STRING": f"token={INBOUND_TOKEN}&event=finished",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_AUTHORIZATION": f"Bearer {INBOUND_TOKEN}",
        "HTTP_USER_AGENT": 'curl "quoted"',
    }
    request = SimpleNamespace(
        headers=[("AUTHORIZATION", f"Bearer {ADMIN_TOKEN}"), ("COOKIE", f"b24scribe_admin={ADMIN_TOKEN}")]
    )
    response = SimpleNamespace(status="202 ACCEPTED", sent=30, headers=[("X-Request-Id", "r1")])

    logger.access(response, request, environ, timedelta(milliseconds=5))

    line = written.getvalue().strip()
    assert line == (
        "POST /hooks/pbx/asterisk?event=finished&token=*** HTTP/1.1 token=***&event=finished "
        '/hooks/pbx/asterisk *** *** r1 *** "curl \\"quoted\\""'
    )
    assert INBOUND_TOKEN not in line and ADMIN_TOKEN not in line
    assert config.preload_app is False  # the metrics directory must be set before the app imports prometheus


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_in_process_logs_bind_ids_and_hold_no_secret(
    client: FlaskClient,
    worker: Worker,
    fake_bitrix24: FakeBitrix24,
    capfd: pytest.CaptureFixture[str],
) -> None:
    configure_logging("DEBUG", "json")
    fake_bitrix24.inject("telephony.externalCall.register", 500, {"error": "INTERNAL_SERVER_ERROR"})
    fake_bitrix24.inject_drop("telephony.externalCall.finish")

    client.post(f"/hooks/pbx/generic?token={INBOUND_TOKEN}", json=FINISHED, headers={"X-Request-Id": "req-from-pbx"})
    client.post(f"/hooks/stt/generic?pbx=generic&call={CALL_ID}", json=TRANSCRIPT, headers=auth())
    client.post("/hooks/stt/generic?pbx=generic", json=TRANSCRIPT, headers=auth())  # rejected: no call named
    client.post(f"/hooks/pbx/generic?token={ADMIN_TOKEN}", json=FINISHED)  # a wrong credential
    client.get("/v1/jobs", headers=admin())
    client.post("/status/login", data={"token": ADMIN_TOKEN})
    for _ in range(4):
        worker.drain()
        with worker.db.write() as session:
            from b24scribe.models import Job

            session.query(Job).filter(Job.state == "pending").update({"next_attempt_at": 0.0})
    logging.getLogger("some.library").warning(
        "leaked? %s", f"https://x/rest/1/{webhook_code(fake_bitrix24)}/ ?token={INBOUND_TOKEN}"
    )
    structlog.get_logger("test").info("bound values", authorization=f"Bearer {ADMIN_TOKEN}", text=SENTENCE)

    output = capfd.readouterr()
    text = output.out + output.err

    assert secrets_in(text, webhook_code(fake_bitrix24)) == []
    lines = json_lines(output.out)
    stored = [line for line in lines if line["event"] == "event stored"]
    assert stored and all("event_id" in line and "request_id" in line for line in stored)
    assert stored[0]["request_id"] == "req-from-pbx" and stored[0]["pbx_call_id"] == CALL_ID
    errors = [line for line in lines if line["event"] == "bitrix24 error"]
    assert {"job_id", "call_id", "job_kind"} <= set(errors[0])
    assert fake_bitrix24.calls_to("telephony.call.attachTranscription")  # the transcript did go out


def test_a_real_gunicorn_and_worker_log_no_secret(tmp_path: Path, database_url: str) -> None:
    """Representative traffic through the real processes; all output (app, gunicorn, access log) is grepped."""
    with FakeBitrix24() as fake:
        code = webhook_code(fake)
        fake.inject("telephony.externalCall.register", 500, {"error": "INTERNAL_SERVER_ERROR"})
        fake.inject_drop("telephony.externalCall.finish")
        environ = {
            "B24SCRIBE_DATABASE_URL": database_url,
            "B24SCRIBE_BITRIX24_WEBHOOK_URL": fake.webhook_url,
            "B24SCRIBE_INBOUND_TOKEN": INBOUND_TOKEN,
            "B24SCRIBE_ADMIN_TOKEN": ADMIN_TOKEN,
            "B24SCRIBE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "B24SCRIBE_LOG_LEVEL": "DEBUG",
            "B24SCRIBE_RETRY_SCHEDULE": "0.2,0.2,0.2,0.2",
        }
        with running_stack(tmp_path, environ) as stack:
            url = stack.url
            assert (
                requests.post(f"{url}/hooks/pbx/generic?token={INBOUND_TOKEN}", json=FINISHED, timeout=10).status_code
                == 202
            )
            transcript = requests.post(
                f"{url}/hooks/stt/generic?pbx=generic&call={CALL_ID}", json=TRANSCRIPT, headers=auth(), timeout=10
            )
            assert transcript.status_code == 202
            rejected = requests.post(f"{url}/hooks/stt/generic?token={INBOUND_TOKEN}", json=TRANSCRIPT, timeout=10)
            assert rejected.status_code == 422
            assert (
                requests.post(f"{url}/hooks/pbx/generic?token={ADMIN_TOKEN}", json=FINISHED, timeout=10).status_code
                == 401
            )
            assert requests.get(f"{url}/v1/jobs", headers=admin(), timeout=10).status_code == 200
            browser = requests.Session()
            assert browser.post(f"{url}/status/login", data={"token": ADMIN_TOKEN}, timeout=10).status_code == 200

            def delivered() -> bool:
                return bool(fake.calls_to("telephony.call.attachTranscription"))

            wait_until(delivered, timeout=60, message="the transcript to reach the fake Bitrix24")
            assert browser.get(f"{url}/status/calls/1", timeout=10).status_code == 200
            wait_until(lambda: "bitrix24 error" in stack.output(), message="the failed delivery to be logged")
        output = stack.output()

    assert secrets_in(output, code) == [], output
    lines = stack.json_lines()  # every line, gunicorn's included, is JSON
    access = [line["event"] for line in lines if line.get("logger") == "gunicorn.access"]
    assert any('/hooks/pbx/generic?token=*** HTTP/1.1" 202' in line for line in access), access
    assert all("request_id=" in line for line in access)
    assert any(line.get("event") == "event stored" and "event_id" in line for line in lines)
    failures = [line for line in lines if line.get("event") == "bitrix24 error"]
    assert failures and all("job_id" in line and "call_id" in line for line in failures)


def test_every_answer_carries_the_request_id_given_or_a_new_one(client: FlaskClient) -> None:
    given = client.post("/hooks/pbx/generic", json=FINISHED, headers={**auth(), "X-Request-Id": "pbx-req-1"})
    fresh = [
        client.post("/hooks/pbx/generic", json=FINISHED, headers=auth()),  # a duplicate: 200
        client.post("/hooks/pbx/generic", json={"event": "call.ended"}, headers=auth()),  # 422
        client.post("/hooks/pbx/nosuchpbx", json=FINISHED, headers=auth()),  # 404
        client.post("/hooks/pbx/generic", json=FINISHED),  # 401
        client.get("/livez"),
    ]

    assert given.status_code == 202 and given.headers["X-Request-Id"] == "pbx-req-1"
    assert [r.status_code for r in fresh] == [200, 422, 404, 401, 200]
    ids = [r.headers["X-Request-Id"] for r in fresh]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids) and len(set(ids)) == len(ids)
