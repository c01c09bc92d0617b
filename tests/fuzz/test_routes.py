"""hypothesis on every route, in-process: every STT vendor's hook (its recorded payloads with fields
made hostile, and arbitrary JSON), the PBX hooks (generic JSON, Asterisk form-encoded and query-only),
the admin API, the status pages, health and metrics. Each case is held to the two rules of
tests/fuzz/invariants.py."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from flask import Flask
from hypothesis import example, given
from hypothesis import strategies as st

from handlers import status_page
from schemas.registry import STT_VENDORS
from tests.conftest import ADMIN_TOKEN, INBOUND_TOKEN, admin, auth, sign_standard_webhook
from tests.fuzz.conftest import FUZZ_SETTINGS
from tests.fuzz.invariants import Fuzzer, assert_clean
from tests.hostile import GENERIC_EVENT, GENERIC_TRANSCRIPT, HOSTILE_NUMBERS, HOSTILE_STRINGS, hostile_texts

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

# hostile values small enough to draw thousands of times (the megabyte ones are in the corpus)
SMALL_HOSTILE = [
    value for value in [*HOSTILE_NUMBERS, *HOSTILE_STRINGS] if not isinstance(value, str) or len(value) < 5000
]
scalars = st.one_of(
    st.sampled_from(SMALL_HOSTILE),
    st.text(max_size=40),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.none(),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
ids = st.one_of(
    st.sampled_from(["fz-1", "fz-2", "1700000000.123", ""]),
    st.text(min_size=1, max_size=140),
    st.sampled_from(["7" * 129, "7" * 201, "a\x00b", "\ud800", " x ", "\u202e1"]),
)


def recorded_payloads(vendor: str) -> list[Any]:
    """The vendor's recorded callbacks (tests/fixtures/<vendor>/), and the generic format's example
    (a vendor added without recordings is still fuzzed, from that and arbitrary JSON)."""
    return [GENERIC_TRANSCRIPT] + [json.loads(path.read_text()) for path in sorted((FIXTURES / vendor).glob("*.json"))]


def paths_of(document: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside a JSON document (capped, so huge fixtures stay cheap)."""
    found: list[tuple[Any, ...]] = [prefix] if prefix else []
    items: list[tuple[Any, Any]] = []
    if isinstance(document, dict):
        items = list(document.items())
    elif isinstance(document, list):
        items = list(enumerate(document[:3]))
    for key, value in items:
        found.extend(paths_of(value, (*prefix, key)))
    return found[:400]


def replaced(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    copy = json.loads(json.dumps(document))
    node = copy
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return copy


@st.composite
def mutated(draw: st.DrawFn, payloads: list[Any]) -> bytes:
    """A recorded payload with one to three values replaced by hostile ones, or something else entirely."""
    how = draw(st.sampled_from(["as recorded", "mutate", "mutate", "mutate", "arbitrary", "text"]))
    if how == "text":
        return draw(st.sampled_from(list(hostile_texts().values())))
    if how == "arbitrary":
        return json.dumps(draw(json_values), allow_nan=True).encode()
    document = draw(st.sampled_from(payloads))
    for _ in range(draw(st.integers(1, 3)) if how == "mutate" else 0):
        if paths := paths_of(document):  # again after each change: a replaced branch has other paths
            document = replaced(document, draw(st.sampled_from(paths)), draw(json_values))
    return json.dumps(document, allow_nan=True).encode()


references = st.one_of(
    st.fixed_dictionaries({"pbx": st.sampled_from(["generic", "asterisk"]), "call": ids}),
    st.fixed_dictionaries({"b24_call_id": ids}),
    st.fixed_dictionaries({}, optional={"pbx": st.text(max_size=40), "call": ids, "b24_call_id": ids}),
)
options = st.fixed_dictionaries(
    {},
    optional={
        "channel": st.sampled_from(["0", "1", "2", "-1", "", "x"]),
        "channel0": st.sampled_from(["caller", "callee", "user", "client", "nobody", ""]),
        "first_speaker": st.sampled_from(["caller", "callee", "bogus"]),
        "direction": st.sampled_from(["inbound", "outbound", "sideways"]),
        "portal": st.text(max_size=220),
        "parts": st.sampled_from(["2", "0", "999999999999999999999"]),
    },
)


def query_of(*parts: dict[str, str]) -> list[tuple[str, str]]:
    return [(key, value) for part in parts for key, value in part.items()]


def is_utf8(body: bytes) -> bool:
    try:
        body.decode()
    except UnicodeDecodeError:
        return False
    return True


CREDENTIALS = ["bearer", "query", "vendor header", "standard webhooks", "basic"]


def credentials_for(
    how: str, vendor_header: str | None, body: bytes, query: list[tuple[str, str]]
) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The headers and query of one way of authenticating (every way a hook accepts, contract §4)."""
    if how == "query":
        return {}, [*query, ("token", INBOUND_TOKEN)]
    if how == "vendor header" and vendor_header:
        return {vendor_header: INBOUND_TOKEN}, query
    if how == "standard webhooks" and is_utf8(body):  # the reference signer takes text
        return sign_standard_webhook(body), query  # generic hooks only; elsewhere a 401, which is fine
    if how == "basic":
        return {"Authorization": "Basic " + base64.b64encode(f"x:{INBOUND_TOKEN}".encode()).decode()}, query
    return auth(), query


@pytest.mark.parametrize("vendor", sorted(STT_VENDORS))
def test_stt_hooks_never_5xx_and_accept_only_what_they_can_process(fuzz: Fuzzer, vendor: str) -> None:
    payloads = recorded_payloads(vendor)
    vendor_header = STT_VENDORS[vendor].auth_header

    @FUZZ_SETTINGS
    @given(
        body=mutated(payloads),
        reference=references,
        extra=options,
        how=st.sampled_from(CREDENTIALS),
        repeated=st.none() | st.sampled_from(["call", "pbx", "b24_call_id", "channel"]),
    )
    def case(body: bytes, reference: dict[str, str], extra: dict[str, str], how: str, repeated: str | None) -> None:
        query = query_of(reference, extra)
        if repeated:  # a repeated query field: the first value is the one read
            query.append((repeated, "repeated-value"))
        headers, query = credentials_for(how, vendor_header, body, query)
        headers["Content-Type"] = "application/json"
        fuzz.send(f"stt {vendor}", "POST", f"/hooks/stt/{vendor}", body, headers, query)
        fuzz.settle()

    case()
    assert_clean(fuzz, f"stt/{vendor}")


def event_fields(valid: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Each field of a valid event kept, dropped or made hostile; sometimes an unknown field too."""
    kept_or_hostile = {key: st.one_of(st.just(value), st.just(value), json_values) for key, value in valid.items()}
    return st.fixed_dictionaries(
        {
            "event": st.sampled_from(["call.started", "call.answered", "call.finished", "call.finished", "x"]),
            "call_id": ids,
        },
        optional={
            **{key: value for key, value in kept_or_hostile.items() if key not in ("event", "call_id")},
            "unknown_field": json_values,
        },
    )


@FUZZ_SETTINGS
@given(
    fields=event_fields(GENERIC_EVENT),
    raw=st.none() | st.sampled_from(list(hostile_texts().values())),
    how=st.sampled_from(["bearer", "standard webhooks", "query"]),
)
def _generic_case(fuzz: Fuzzer, fields: dict[str, Any], raw: bytes | None, how: str) -> None:
    body = raw if raw is not None else json.dumps(fields, allow_nan=True).encode()
    headers, query = credentials_for(how, None, body, [])
    headers["Content-Type"] = "application/json"
    fuzz.send("pbx generic", "POST", "/hooks/pbx/generic", body, headers, query)
    fuzz.settle()


def test_the_generic_pbx_hook_never_5xx_and_accepts_only_what_it_can_process(fuzz: Fuzzer) -> None:
    _generic_case(fuzz)
    assert_clean(fuzz, "pbx/generic")


form_values = st.one_of(st.text(max_size=60), st.sampled_from([str(v) for v in SMALL_HOSTILE]))
asterisk_fields = st.fixed_dictionaries(
    {
        "event": st.sampled_from(["started", "answered", "finished", "call.finished", "hangup", ""]),
        "call_id": ids,
    },
    optional={
        **{
            key: st.one_of(st.just(str(value)), form_values)
            for key, value in GENERIC_EVENT.items()
            if key not in ("event", "call_id")
        },
        "status": st.sampled_from(["ANSWER", "NOANSWER", "BUSY", "CHANUNAVAIL", "answered", "weird", ""]),
        "duration": st.sampled_from(["73", "73.9", "nan", "inf", "-1", "1e400", "9" * 30, ""]),
        "started_at": st.sampled_from(["1700000000.123456", "2026-11-25 10:20:30+0100", "99999999999", "", "x"]),
        "linkedid": st.text(max_size=20),
    },
)


FORM = "application/x-www-form-urlencoded"


def form(fields: dict[str, str]) -> bytes:
    return urlencode(fields, errors="surrogatepass").encode()


@FUZZ_SETTINGS
@given(fields=asterisk_fields)
def _asterisk_form_case(fuzz: Fuzzer, fields: dict[str, str]) -> None:
    headers = {**auth(), "Content-Type": "application/x-www-form-urlencoded"}
    fuzz.send("pbx asterisk form", "POST", "/hooks/pbx/asterisk", form(fields), headers)
    fuzz.settle()


@FUZZ_SETTINGS
@given(fields=asterisk_fields, how=st.sampled_from(["bearer", "query", "basic"]))
def _asterisk_query_case(fuzz: Fuzzer, fields: dict[str, str], how: str) -> None:
    headers, query = credentials_for(how, None, b"", list(fields.items()))  # a dialplan CURL() sends ?token=
    fuzz.send("pbx asterisk query", "POST", "/hooks/pbx/asterisk", None, headers, query)
    fuzz.settle()


def test_the_asterisk_hook_form_encoded_never_5xx_and_accepts_only_what_it_can_process(fuzz: Fuzzer) -> None:
    _asterisk_form_case(fuzz)
    assert_clean(fuzz, "pbx/asterisk form")


def test_the_asterisk_hook_query_only_never_5xx_and_accepts_only_what_it_can_process(fuzz: Fuzzer) -> None:
    _asterisk_query_case(fuzz)
    assert_clean(fuzz, "pbx/asterisk query")


segments = st.text(max_size=150).map(lambda text: quote(text, safe="", errors="surrogatepass"))
numbers = st.one_of(st.integers(min_value=-(2**70), max_value=2**70).map(str), segments)


@st.composite
def admin_requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str]]:
    """One admin API request: (method, path with query, headers)."""
    route = draw(st.sampled_from(["by-b24", "call", "jobs", "retry", "event"]))
    if route == "by-b24":
        path = f"/v1/calls/by-b24/{draw(segments)}"
    elif route == "call":
        path = f"/v1/calls/{draw(segments)}/{draw(segments)}"
    elif route == "jobs":
        query = draw(st.fixed_dictionaries({}, optional={"state": st.text(max_size=20), "limit": numbers}))
        path = "/v1/jobs" + ("?" + urlencode(query, errors="surrogatepass") if query else "")
    elif route == "retry":
        path = f"/v1/jobs/{draw(numbers)}/retry"
    else:
        path = f"/v1/events/{draw(numbers)}"
    method = "POST" if route == "retry" else "GET"
    headers = draw(st.sampled_from([admin(), {}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic \x00"}]))
    return method, path, headers


@FUZZ_SETTINGS
@given(request=admin_requests())
@example(request=("GET", "/v1/calls/%00x/~", admin()))  # found: NUL in a path id (PostgreSQL refuses it)
@example(request=("GET", "/v1/calls/by-b24/" + "7" * 300, admin()))
def _admin_case(fuzz: Fuzzer, request: tuple[str, str, dict[str, str]]) -> None:
    method, path, headers = request
    fuzz.send("v1 admin", method, path, None, headers)


def test_the_admin_api_never_5xx(fuzz: Fuzzer) -> None:
    _admin_case(fuzz)
    assert_clean(fuzz, "/v1 admin API")


@st.composite
def status_requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str], bytes | None]:
    """One status page request, signed in with the admin bearer (so the pages themselves are reached)."""
    route = draw(st.sampled_from(["overview", "call", "retry", "replay", "login", "sign in", "logout"]))
    query = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "notice": st.text(max_size=20),
                "id": numbers,
                "q": st.text(max_size=80),
                "state": st.text(max_size=20),
                "page": numbers,
            },
        )
    )
    suffix = "?" + urlencode(query, errors="surrogatepass") if query else ""
    body = None
    if route == "overview":
        method, path = "GET", "/status/"
    elif route == "call":
        method, path = "GET", f"/status/calls/{draw(numbers)}"
    elif route == "login":
        method, path = "GET", "/status/login"
    elif route == "sign in":
        method, path = "POST", "/status/login"
        body = form({"token": draw(st.sampled_from([ADMIN_TOKEN, "", "wrong"]) | st.text(max_size=70))})
    elif route == "logout":
        method, path = "POST", "/status/logout"
        body = form({"csrf_token": draw(st.text(max_size=70))})
    else:
        method = "POST"
        path = f"/status/jobs/{draw(numbers)}/retry" if route == "retry" else f"/status/events/{draw(numbers)}/replay"
        body = form({"csrf_token": draw(st.text(max_size=70))})
    headers = {**admin(), "Content-Type": "application/x-www-form-urlencoded"}
    return method, path + suffix, headers, body


@FUZZ_SETTINGS
@given(request=status_requests())
@example(request=("POST", "/status/jobs/1/retry", {**admin(), "Content-Type": FORM}, form({"csrf_token": "é"})))
def _status_case(fuzz: Fuzzer, request: tuple[str, str, dict[str, str], bytes | None]) -> None:
    method, path, headers, body = request
    fuzz.send("status pages", method, path, body, headers)


def test_the_status_pages_never_5xx(app: Flask, fuzz: Fuzzer) -> None:
    if hasattr(status_page, "SignInThrottle"):  # failed sign-ins are slowed down: not what is fuzzed here
        app.extensions["b24scribe.sign_in_throttle"] = status_page.SignInThrottle(sleep=lambda _seconds: None)
    _status_case(fuzz)
    assert_clean(fuzz, "/status pages")


@FUZZ_SETTINGS
@given(
    path=st.sampled_from(["/livez", "/readyz", "/metrics", "/openapi.json"]),
    query=st.dictionaries(st.text(max_size=10), st.text(max_size=40), max_size=3),
    token=st.sampled_from([None, "Bearer x", "Bearer", "Basic Zm9vOmJhcg==", "\x00"]),
)
def _health_case(fuzz: Fuzzer, path: str, query: dict[str, str], token: str | None) -> None:
    headers = {"Authorization": token} if token else {}
    family = "metrics" if path == "/metrics" else "health"
    # /readyz answers 503 when not ready (no worker heartbeat in a test): documented, not a failure
    fuzz.send(family, "GET", path, None, headers, list(query.items()), documented={503} if path == "/readyz" else ())


def test_health_and_metrics_never_5xx(fuzz: Fuzzer) -> None:
    _health_case(fuzz)
    assert_clean(fuzz, "health and metrics")


@pytest.mark.parametrize("limit", ["0", "-1", "1001", str(2**64)])
def test_the_job_lists_documented_limit_range_is_enforced(fuzz: Fuzzer, limit: str) -> None:
    """openapi.json promises 1 <= limit <= 1000: outside it is a 422 naming `limit` (schemathesis found it)."""
    response = fuzz.send("v1 admin", "GET", "/v1/jobs", None, admin(), {"limit": limit})

    assert response.status_code == 422, response.get_data(as_text=True)
    assert "limit" in response.get_json()["error"]["fields"]
