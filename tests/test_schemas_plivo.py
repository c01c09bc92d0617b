"""Plivo's callbacks (tests/fixtures/plivo/, from Plivo's documented request parameters) become the
exact CallEvents; its X-Plivo-Signature-V3, made as Plivo makes it (and checked with the official
SDK's own validator), is accepted, and forged, re-pointed or tampered requests are refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError
from plivo.utils.signature_v3 import validate_v3_signature  # type: ignore[import-untyped]

from b24scribe.events import CallEvent
from b24scribe.inbound_auth import Authenticated, AuthFailure, HookRequest
from b24scribe.settings import Settings
from b24scribe.transcript import Direction
from schemas import plivo
from schemas.registry import PBX_SOURCES

FIXTURES = Path(__file__).parent / "fixtures" / "plivo"
AUTH_TOKEN = "MjQ2ZTg5YzktcGxpdm8tYXV0aC10b2tlbg"  # a (sub)account auth token
PUBLIC_URL = "https://b24scribe.example.com"
PATH = "/hooks/pbx/plivo"
NONCE = "05429567804466091622"
SCENARIOS = sorted(path.stem for path in FIXTURES.glob("*.json"))
SETTINGS = Settings(vendor={"PLIVO_AUTH_TOKEN": AUTH_TOKEN})
SCHEME = plivo.SOURCE.signatures[0]


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return data


def call_event(expected: dict[str, Any]) -> CallEvent:
    values = dict(expected)
    if "direction" in values:
        values["direction"] = Direction(values["direction"])
    return CallEvent(**values)


def plivo_sign(auth_token: str, url: str, params: dict[str, str], nonce: str) -> str:
    """X-Plivo-Signature-V3 as Plivo documents it, written out here independently of the module:
    the URL without its query, `?` and its sorted query (`k=v&…`; the `?` also when only POST
    parameters follow), `.`, the POST parameters sorted by name as `namevalue`, then `.` + nonce."""
    parts = urlsplit(url)
    base = f"{parts.scheme}://{parts.netloc}{parts.path}"
    query = "&".join(f"{k}={v}" for k, v in sorted(pair.split("=", 1) for pair in parts.query.split("&") if pair))
    signed = base
    if query or params:
        signed += "?" + query
    if query and params:
        signed += "."
    signed += "".join(f"{key}{params[key]}" for key in sorted(params))
    digest = hmac.new(auth_token.encode(), f"{signed}.{nonce}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def request(
    params: dict[str, str], query: str = "", signature: str | None = None, nonce: str | None = NONCE
) -> tuple[HookRequest, bytes]:
    body = urlencode(params).encode()
    url = PUBLIC_URL + PATH + (f"?{query}" if query else "")
    headers = {"X-Plivo-Signature-V3": signature or plivo_sign(AUTH_TOKEN, url, params, nonce or "")}
    if nonce is not None:
        headers["X-Plivo-Signature-V3-Nonce"] = nonce
    environ = {"PATH_INFO": PATH, "QUERY_STRING": query}
    query_map = dict(pair.split("=", 1) for pair in query.split("&") if pair)
    return HookRequest("POST", headers, query_map, environ=environ, public_url=PUBLIC_URL), body


def verify(hook: HookRequest, body: bytes) -> Authenticated:
    SCHEME.before_body(hook, SETTINGS, "plivo")
    return SCHEME.verify(hook, body, SETTINGS, "plivo")


HANGUP = fixture("inbound_answered")["callbacks"][-1]["fields"]


# --- callbacks → events -------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCENARIOS)
def test_each_callback_of_each_scenario_becomes_its_exact_event(name: str) -> None:
    scenario = fixture(name)
    query = scenario.get("query", {})
    for callback in scenario["callbacks"]:
        body = urlencode(callback["fields"]).encode()
        expected = call_event(callback["event"])
        assert plivo.parse(body, query) == expected, callback["callback"]
        assert PBX_SOURCES["plivo"].parse(body, query) == expected  # through the registry's checks


def test_a_callback_sent_with_get_reads_its_query() -> None:
    fields = fixture("outbound_api_busy")["callbacks"][-1]["fields"]
    event = plivo.parse(b"", {**fields, "extension": "101"})
    assert (event.event, event.status, event.duration, event.extension) == ("finished", "busy", 0, "101")


def test_an_outbound_a_leg_answered_without_bill_duration_is_answered_with_no_talk_time() -> None:
    fields = {**fixture("outbound_api_answered")["callbacks"][-1]["fields"]}
    del fields["BillDuration"], fields["Duration"]
    assert plivo.parse(urlencode(fields).encode(), {}).status == "answered"


def test_a_leg_answered_in_a_dial_names_the_agent_only_when_it_is_a_sip_endpoint() -> None:
    fields = {"CallUUID": "a-1", "DialALegUUID": "a-1", "DialAction": "answer", "DialBLegTo": "14155550188"}
    event = plivo.parse(urlencode(fields).encode(), {})
    assert (event.event, event.status, event.extension) == ("answered", "answered", None)
    assert plivo.parse(urlencode(fields).encode(), {"user_id": "7"}).user_id == 7


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"CallStatus": "completed"}, "CallUUID"),
        ({"CallUUID": "a-1"}, "CallStatus"),
        ({"CallUUID": "a-1", "CallStatus": "exploded"}, "CallStatus"),
        (
            {"CallUUID": "a-1", "CallStatus": "completed", "Direction": "outbound", "BillDuration": "ten"},
            "BillDuration",
        ),
        (
            {"CallUUID": "a-1", "CallStatus": "completed", "Direction": "outbound", "BillDuration": "9999999"},
            "BillDuration",
        ),
        ({"CallUUID": "a-1", "RecordUrl": "ftp://media.plivo.com/r.mp3"}, "RecordUrl"),
        ({"CallUUID": "a-1", "DialStatus": "sideways"}, "DialStatus"),
        ({"CallUUID": "a" * 200, "CallStatus": "ringing"}, "CallUUID"),
        ({"CallUUID": "a\x00b", "CallStatus": "ringing"}, "CallUUID"),
    ],
)
def test_a_callback_that_cannot_be_a_call_event_names_the_field(fields: dict[str, str], field: str) -> None:
    with pytest.raises(ValidationError) as raised:
        plivo.parse(urlencode(fields).encode(), {})
    assert field in raised.value.messages_dict


def test_a_user_id_in_the_url_out_of_range_is_named() -> None:
    with pytest.raises(ValidationError) as raised:
        plivo.parse(urlencode(HANGUP).encode(), {"user_id": "0"})
    assert "user_id" in raised.value.messages_dict


KNOWN_FIELDS = [
    "CallUUID",
    "ParentUUID",
    "ParentCallUUID",
    "ALegUUID",
    "CallStatus",
    "Direction",
    "From",
    "To",
    "StartTime",
    "BillDuration",
    "Duration",
    "DialAction",
    "DialALegUUID",
    "DialBLegTo",
    "DialBLegBillDuration",
    "DialBLegHangupCause",
    "DialStatus",
    "RecordUrl",
    "record_url",
    "call_uuid",
]
VALUES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["completed", "busy", "no-answer", "ringing", "in-progress", "answer", "hangup", "inbound"]),
    st.sampled_from(["sip:101@phone.plivo.com", "https://media.plivo.com/r.mp3", "61", "-1", "1e400", "nan"]),
    st.integers(min_value=-(10**12), max_value=10**12).map(str),
)


def _parsed_or_named(body: bytes, query: dict[str, str]) -> None:
    try:
        event = PBX_SOURCES["plivo"].parse(body, query)
    except ValidationError as error:
        assert error.messages_dict and all(isinstance(key, str) and key for key in error.messages_dict)
        return
    assert isinstance(event, CallEvent) and event.call_id


@settings(max_examples=300, deadline=None)
@given(
    fields=st.dictionaries(st.sampled_from(KNOWN_FIELDS), VALUES, max_size=10),
    query=st.dictionaries(st.sampled_from(["extension", "user_id", "portal"]), VALUES, max_size=2),
)
def test_any_plivo_like_form_is_an_event_or_a_validation_error_naming_a_field(
    fields: dict[str, str], query: dict[str, str]
) -> None:
    _parsed_or_named(urlencode(fields).encode(), query)


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=300))
def test_any_bytes_are_an_event_or_a_validation_error_naming_a_field(body: bytes) -> None:
    _parsed_or_named(body, {})


# --- the signature ------------------------------------------------------------------------------


def test_the_test_signer_agrees_with_the_official_sdk() -> None:
    url = PUBLIC_URL + PATH + "?portal=main&extension=101"
    signature = plivo_sign(AUTH_TOKEN, url, HANGUP, NONCE)
    assert validate_v3_signature("POST", url, NONCE, AUTH_TOKEN, signature, dict(HANGUP))
    assert not validate_v3_signature("POST", url, NONCE, "another-token", signature, dict(HANGUP))
    assert plivo.expected_signature(AUTH_TOKEN, url, NONCE, urlencode(HANGUP).encode()) == signature


@pytest.mark.parametrize("query", ["", "portal=main", "extension=101&portal=main"])
def test_a_signed_callback_is_accepted(query: str) -> None:
    hook, body = request(HANGUP, query)
    assert verify(hook, body) == Authenticated("plivo-signature-v3")


def test_one_of_several_comma_separated_signatures_is_enough() -> None:
    url = PUBLIC_URL + PATH
    good = plivo_sign(AUTH_TOKEN, url, HANGUP, NONCE)
    old = plivo_sign("the-token-before-rotation", url, HANGUP, NONCE)
    hook, body = request(HANGUP, signature=f"{old}, {good}")
    assert verify(hook, body).scheme == "plivo-signature-v3"


def test_blank_parameters_are_signed_too() -> None:
    params = {**HANGUP, "ParentAuthID": "", "ForwardedFrom": ""}
    hook, body = request(params)
    assert verify(hook, body).scheme == "plivo-signature-v3"


def _refused(hook: HookRequest, body: bytes) -> AuthFailure:
    with pytest.raises(AuthFailure) as raised:
        verify(hook, body)
    assert raised.value.status == 401
    return raised.value


def test_a_signature_with_another_token_is_refused() -> None:
    url = PUBLIC_URL + PATH
    hook, body = request(HANGUP, signature=plivo_sign("guessed-token", url, HANGUP, NONCE))
    assert _refused(hook, body).code == "bad_signature"


def test_a_signature_made_for_another_url_is_refused() -> None:
    # signed for the hook without ?portal=…, replayed against another portal's URL
    signature = plivo_sign(AUTH_TOKEN, PUBLIC_URL + PATH, HANGUP, NONCE)
    hook, body = request(HANGUP, query="portal=other", signature=signature)
    _refused(hook, body)
    signature = plivo_sign(AUTH_TOKEN, "https://elsewhere.example.com" + PATH, HANGUP, NONCE)
    hook, body = request(HANGUP, signature=signature)
    _refused(hook, body)


def test_a_tampered_parameter_is_refused() -> None:
    hook, body = request(HANGUP)
    _refused(hook, body.replace(b"BillDuration=75", b"BillDuration=7"))


def test_a_signature_replayed_with_another_nonce_is_refused() -> None:
    signature = plivo_sign(AUTH_TOKEN, PUBLIC_URL + PATH, HANGUP, NONCE)
    hook, body = request(HANGUP, signature=signature, nonce="99999999999999999999")
    _refused(hook, body)


def test_a_signature_without_its_nonce_is_refused_before_the_body_is_read() -> None:
    hook, _ = request(HANGUP, nonce=None)
    with pytest.raises(AuthFailure) as raised:
        SCHEME.before_body(hook, SETTINGS, "plivo")
    assert raised.value.status == 401


@pytest.mark.parametrize("signature", ["", "not base64!", "AAAA", "=" * 8])
def test_malformed_signatures_are_refused(signature: str) -> None:
    hook, body = request(HANGUP, signature=signature or ",")
    _refused(hook, body)


def test_a_body_that_is_not_utf8_is_refused_not_an_error() -> None:
    hook, _ = request(HANGUP)
    _refused(hook, b"CallUUID=\xff\xfe")


def test_the_signature_is_configured_only_with_the_auth_token() -> None:
    assert SCHEME.configured(SETTINGS, "plivo")
    assert not SCHEME.configured(Settings(), "plivo")
