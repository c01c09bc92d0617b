"""The fuzz suite's own rules catch what they claim to: a 5xx, an accepted event the worker cannot
fold, and a value longer than its column (which only PostgreSQL would refuse)."""

from __future__ import annotations

import json
import time

import pytest
from flask import Flask
from marshmallow import ValidationError

from b24scribe import folding
from b24scribe.models import Call
from tests.conftest import auth
from tests.fuzz.invariants import KNOWN_OPEN, Fuzzer, Tally, assert_clean
from tests.hostile import GENERIC_EVENT, column_lengths, past_every_column


@pytest.fixture
def fuzz(fuzz: Fuzzer) -> Fuzzer:
    """The suite's fuzzer with a tally of its own: these planted failures stay out of the report."""
    fuzz.tally = Tally()
    return fuzz


def test_a_5xx_is_a_finding_with_the_servers_traceback(app: Flask, fuzz: Fuzzer) -> None:
    def boom() -> str:
        raise RuntimeError("boom in a view")

    app.add_url_rule("/boom", "boom", boom)

    fuzz.send("selftest", "GET", "/boom")

    assert [(f.kind, f.status) for f in fuzz.found] == [("5xx", 500)]
    assert "RuntimeError: boom in a view" in fuzz.found[0].detail
    assert fuzz.tally.cases["selftest"] == 1
    fuzz.found.clear()


def test_an_accepted_event_the_worker_cannot_fold_is_a_finding(fuzz: Fuzzer, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreadable(*args: object, **kwargs: object) -> None:  # as if the code changed after the 2xx
        raise ValidationError({"event": ["not what this version reads"]})

    monkeypatch.setattr(folding, "read_event", unreadable)

    response = fuzz.send("selftest", "POST", "/hooks/pbx/generic", None, auth(), None)  # no body: a 4xx
    assert response.status_code < 500
    accepted = fuzz.send(
        "selftest",
        "POST",
        "/hooks/pbx/generic",
        json.dumps(GENERIC_EVENT).encode(),
        {**auth(), "Content-Type": "application/json"},
    )
    assert accepted.status_code == 202
    fuzz.settle()

    details = [f.detail for f in fuzz.found if f.kind == "unprocessable"]
    assert any("apply job" in d and "dead" in d and "can no longer be read" in d for d in details), details
    assert all("call.finished" in f.request for f in fuzz.found)  # traced to the request that was accepted
    fuzz.found.clear()


def test_a_value_longer_than_its_column_is_a_finding(fuzz: Fuzzer) -> None:
    if not fuzz.db.is_sqlite:
        pytest.skip("PostgreSQL refuses the value itself: the check is what makes SQLite runs find it")
    now = time.time()
    with fuzz.db.write() as session:
        session.add(Call(portal="p", pbx="generic", pbx_call_id="7" * 129, created_at=now, updated_at=now))
    fuzz.pending = 1  # as if a request had been accepted

    fuzz.settle()

    assert [f.kind for f in fuzz.found] == ["too-long"]
    assert "call.pbx_call_id holds 129 characters, over its column's 128" in fuzz.found[0].detail
    fuzz.found.clear()


def test_the_corpus_reads_its_lengths_from_the_models() -> None:
    lengths = column_lengths()
    assert lengths["call.pbx_call_id"] == 128
    assert "7" * (lengths["call.pbx_call_id"] + 1) in past_every_column()


def test_only_findings_of_known_open_bugs_make_a_test_an_xfail(
    app: Flask, fuzz: Fuzzer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom() -> str:
        raise RuntimeError("boom in a view")

    app.add_url_rule("/boom", "boom", boom)
    fuzz.send("selftest", "GET", "/boom")

    with pytest.raises(AssertionError, match="boom in a view"):
        assert_clean(fuzz, "selftest")  # not a known bug: the test fails, with the request and the traceback line
    monkeypatch.setitem(KNOWN_OPEN, r"GET /boom -> RuntimeError", "the planted /boom view (reported)")
    with pytest.raises(pytest.xfail.Exception, match="the planted /boom view"):
        assert_clean(fuzz, "selftest")
    fuzz.found.clear()
