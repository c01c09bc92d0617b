"""Twilio Conversational Intelligence: a signed webhook names a transcript; its sentences are fetched
page by page (media channels counted from 1, times as strings) and become MESSAGES."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError
from twilio.request_validator import HMAC_SHA256, RequestValidator

from b24scribe.inbound_auth import AuthFailure, HookRequest
from b24scribe.messages import SideRules, build_messages, check_attributable
from b24scribe.settings import Settings, load_settings
from b24scribe.sources import FetchContext, FetchError
from b24scribe.transcript import CallReference, Direction, Role, Segment
from schemas import twilio
from schemas.registry import SOURCES
from tests.test_vendor_properties import assert_bitrix24_accepts, json_values, mutated, word_text

FIXTURES = Path(__file__).parent / "fixtures" / "twilio"
SID = "GT3f1c8e2a9b7d4c6e8f0a1b2c3d4e5f6a"
ACCOUNT = "ACa1b2c3d4e5f60718293a4b5c6d7e8f90"
CALL_ID = "externalCall.716f1cb73def9700a23842adf9c4c568.1773130779"
AUTH_TOKEN = "twilio-auth-token-7f3e"
SHARED_KEY = "twilio-shared-key-91ab"
URL = "https://b24scribe.example.com/hooks/stt/twilio"
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def errors_of(body: Any, parse: Any = twilio.parse, query: Mapping[str, str] | None = None) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ValidationError) as caught:
        parse(raw, query or {})
    return caught.value.messages


def page(sentences: list[Any], next_page_url: str | None = None) -> bytes:
    return json.dumps({"sentences": sentences, "meta": {"next_page_url": next_page_url, "key": "sentences"}}).encode()


# --- the webhook -------------------------------------------------------------------------------


def test_a_form_webhook_names_the_transcript_to_fetch_and_the_call_by_customer_key() -> None:
    result = twilio.parse(fixture("webhook_form.txt"), {})

    assert (result.status, result.fetch_id, result.vendor_job_id) == ("fetch", SID, SID)
    assert result.reference == CallReference(b24_call_id=CALL_ID)


def test_a_json_webhook_with_pbx_and_call_in_customer_key_split_at_the_first_colon() -> None:
    result = twilio.parse(fixture("webhook.json"), {})
    assert result.reference == CallReference(pbx="asterisk", pbx_call_id="1700000000.123")

    body = {"transcript_sid": SID, "customer_key": "generic:sip:abc:1"}
    assert twilio.parse(json.dumps(body).encode(), {}).reference == CallReference(
        pbx="generic", pbx_call_id="sip:abc:1"
    )


def test_pascal_case_form_names_and_no_customer_key() -> None:
    result = twilio.parse(urlencode({"TranscriptSid": SID, "EventType": "x"}).encode(), {})

    assert result.fetch_id == SID and result.reference.is_empty()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"customer_key": CALL_ID}, "transcript_sid"),
        ({"transcript_sid": "GT123"}, "transcript_sid"),
        ({"transcript_sid": "../../Accounts"}, "transcript_sid"),
        ({"transcript_sid": 5}, "transcript_sid"),
        ({"transcript_sid": SID, "customer_key": "asterisk:"}, "customer_key"),
        ({"transcript_sid": SID, "customer_key": ":1700000000.1"}, "customer_key"),
        ({"transcript_sid": SID, "customer_key": 12}, "customer_key"),
    ],
)
def test_bad_webhooks_name_the_field(body: dict[str, Any], field: str) -> None:
    assert field in errors_of(body)
    if isinstance(body.get(field), str) or field not in body:  # a form field is always text
        assert field in errors_of(urlencode(body).encode())


def test_bodies_that_are_neither_json_objects_nor_form_fields() -> None:
    assert "_schema" in errors_of(b"[1, 2]")
    assert "_schema" in errors_of(b"{not json")
    assert "_schema" in errors_of(b"transcript_sid=\xff\xfe")
    assert "channel" in errors_of(fixture("webhook.json"), query={"channel": "7"})


# --- a page of sentences -----------------------------------------------------------------------


def test_a_page_gives_sentences_with_channels_from_zero_and_string_times() -> None:
    transcript = twilio.parse_sentences(fixture("sentences_page1.json"), {}).transcript

    assert transcript is not None and transcript.granularity == "segment"
    assert transcript.segments == [
        Segment(0.24, 1.92, "Good afternoon, Acme support.", channel=1),
        Segment(1.5, 3.6, "Hi, I'm calling about my order.", channel=0),
    ]
    assert build_messages(transcript, SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good afternoon, Acme support."},
        {"SIDE": "Client", "START_TIME": 1, "STOP_TIME": 4, "MESSAGE": "Hi, I'm calling about my order."},
    ]


def test_null_times_and_null_text_numbers_and_speakers() -> None:
    body = page(
        [
            {"media_channel": 1, "start_time": 1.25, "end_time": 2, "transcript": "Hello."},
            {"media_channel": 2, "start_time": None, "end_time": None, "transcript": "Yes?"},
            {"media_channel": 2, "start_time": "3", "end_time": None, "transcript": None},
            {"media_channel": 1, "start_time": None, "end_time": "5.5", "transcript": "  "},
        ]
    )
    transcript = twilio.parse_sentences(body, {}).transcript

    assert transcript is not None
    assert transcript.segments == [
        Segment(1.25, 2, "Hello.", channel=0),
        Segment(2, 2, "Yes?", channel=1),  # no times: where the sentence before ended
        Segment(3.0, 5.5, "  ", channel=0),  # whitespace is dropped later, by the messages
    ]
    assert [m["MESSAGE"] for m in build_messages(transcript, SideRules())] == ["Hello.", "Yes?"]


def test_one_media_channel_is_a_mono_recording_unless_the_url_says_which() -> None:
    mono = twilio.parse_sentences(fixture("sentences_mono.json"), {}).transcript
    assert mono is not None and {s.channel for s in mono.segments} == {None}
    with pytest.raises(ValidationError):
        check_attributable(mono)

    said = twilio.parse_sentences(fixture("sentences_mono.json"), {"channel": "1"}).transcript
    assert said is not None
    assert build_messages(said, SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 3, "MESSAGE": "Hello, this is Anna."},
        {"SIDE": "User", "START_TIME": 2, "STOP_TIME": 4, "MESSAGE": "Hi Anna."},
    ]
    speakers = page([{"media_channel": 1, "start_time": "0", "end_time": "1", "transcript": "Hi", "speaker": 1}])
    transcript = twilio.parse_sentences(speakers, {}).transcript
    assert transcript is not None and transcript.segments == [Segment(0, 1, "Hi", speaker="1")]


@pytest.mark.parametrize(
    ("sentence", "path"),
    [
        ({"media_channel": 0, "start_time": "1", "end_time": "2", "transcript": "a"}, "media_channel"),
        ({"media_channel": "1", "start_time": "1", "end_time": "2", "transcript": "a"}, "media_channel"),
        ({"media_channel": 1, "start_time": "1.5s", "end_time": "2", "transcript": "a"}, "start_time"),
        ({"media_channel": 1, "start_time": "-1", "end_time": "2", "transcript": "a"}, "start_time"),
        ({"media_channel": 1, "start_time": "1", "end_time": 1e9, "transcript": "a"}, "end_time"),
        ({"media_channel": 1, "start_time": "3", "end_time": "2", "transcript": "a"}, "end_time"),
        ({"media_channel": 1, "start_time": True, "end_time": "2", "transcript": "a"}, "start_time"),
        ({"media_channel": 1, "start_time": "1", "end_time": "2", "transcript": ["a"]}, "transcript"),
        ({"media_channel": 1, "start_time": "1", "end_time": "2", "transcript": "a", "speaker": {}}, "speaker"),
    ],
)
def test_bad_sentences_name_the_field(sentence: dict[str, Any], path: str) -> None:
    errors = errors_of(page([sentence, sentence]), parse=twilio.parse_sentences)
    assert set(errors["sentences"]) == {0, 1}
    assert path in errors["sentences"][0]


def test_bad_pages_name_the_field() -> None:
    assert "sentences" in errors_of({"meta": {}}, parse=twilio.parse_sentences)
    assert "sentences" in errors_of({"sentences": {}}, parse=twilio.parse_sentences)
    assert "meta" in errors_of({"sentences": [], "meta": []}, parse=twilio.parse_sentences)
    assert errors_of({"sentences": [], "meta": {"next_page_url": 3}}, parse=twilio.parse_sentences) == {
        "meta": {"next_page_url": ["Not a valid URL."]}
    }
    assert errors_of({"sentences": ["x"]}, parse=twilio.parse_sentences) == {"sentences": {0: ["Not a valid object."]}}


# --- the fetch, without HTTP -------------------------------------------------------------------


class _Answer:
    def __init__(self, body: bytes) -> None:
        self.content = body


class _Api:
    """FetchContext.get on canned bodies, by URL."""

    def __init__(self, routes: dict[str, bytes]) -> None:
        self.routes, self.asked = routes, []

    def context(self, api_url: str = "https://intelligence.twilio.com", **vendor: str) -> FetchContext:
        configured = load_settings({}).with_overrides(
            vendor=vendor or {"TWILIO_ACCOUNT_SID": ACCOUNT, "TWILIO_AUTH_TOKEN": AUTH_TOKEN}
        )
        api = self

        class Context(FetchContext):
            def get(self, url: str, headers: Mapping[str, str] | None = None, what: str = "API") -> Any:
                api.asked.append((url, dict(headers or {})))
                if url not in api.routes:
                    raise FetchError(f"twilio {what} answered HTTP 404", retry=False)
                return _Answer(api.routes[url])

        return Context("twilio", api_url, None, SID, b"", {}, None, 1.0, configured)


BASE = f"https://intelligence.twilio.com/v2/Transcripts/{SID}"


def test_the_fetch_reads_the_status_then_every_page_with_basic_auth() -> None:
    api = _Api(
        {
            BASE: fixture("transcript_completed.json"),
            f"{BASE}/Sentences?PageSize=1000": fixture("sentences_page1.json"),
            f"{BASE}/Sentences?PageSize=2&Page=1&PageToken=PAGE1TOKEN": fixture("sentences_page2.json"),
        }
    )
    result = twilio.fetch(api.context())

    assert result.status == "completed" and result.vendor_job_id == SID and result.transcript is not None
    assert [(s.text, s.channel) for s in result.transcript.segments] == [
        ("Good afternoon, Acme support.", 1),
        ("Hi, I'm calling about my order.", 0),
        ("What's the order number?", 1),
    ]
    assert [url for url, _headers in api.asked] == list(api.routes)
    assert {headers["Authorization"] for _url, headers in api.asked} == {
        "Basic QUNhMWIyYzNkNGU1ZjYwNzE4MjkzYTRiNWM2ZDdlOGY5MDp0d2lsaW8tYXV0aC10b2tlbi03ZjNl"
    }


def test_a_failed_transcript_is_a_failed_job_with_twilios_status() -> None:
    result = twilio.fetch(_Api({BASE: fixture("transcript_failed.json")}).context())
    assert (result.status, result.failure_reason) == ("failed", "Twilio transcript failed")


def test_a_transcript_not_finished_is_retried_and_missing_credentials_are_not() -> None:
    queued = json.dumps({"sid": SID, "status": "in-progress"}).encode()
    with pytest.raises(FetchError) as caught:
        twilio.fetch(_Api({BASE: queued}).context())
    assert caught.value.retry is True
    with pytest.raises(FetchError) as caught:
        twilio.fetch(_Api({}).context(TWILIO_AUTH_TOKEN=AUTH_TOKEN))
    assert (caught.value.reason, caught.value.retry) == ("B24SCRIBE_TWILIO_ACCOUNT_SID is not set", False)


def test_a_one_channel_recording_without_speakers_fails_saying_what_to_change() -> None:
    api = _Api(
        {BASE: fixture("transcript_completed.json"), f"{BASE}/Sentences?PageSize=1000": fixture("sentences_mono.json")}
    )
    result = twilio.fetch(api.context())
    assert result.status == "failed" and "dual-channel" in (result.failure_reason or "")


@pytest.mark.parametrize(
    "next_page_url",
    [
        "https://evil.example.com/v2/Transcripts/" + SID + "/Sentences?Page=1",
        "http://intelligence.twilio.com/v2/Transcripts/" + SID + "/Sentences?Page=1",
        BASE.replace(SID, "GT" + "0" * 32) + "/Sentences?Page=1",
        BASE + "/Media",
    ],
)
def test_next_pages_elsewhere_are_refused(next_page_url: str) -> None:
    api = _Api({BASE: fixture("transcript_completed.json"), f"{BASE}/Sentences?PageSize=1000": page([], next_page_url)})
    with pytest.raises(FetchError) as caught:
        twilio.fetch(api.context())
    assert caught.value.retry is False and len(api.asked) == 2


def test_twilios_own_host_is_replaced_by_the_configured_api_url_and_loops_end() -> None:
    local = f"http://127.0.0.1:9/v2/Transcripts/{SID}"
    api = _Api(
        {
            local: fixture("transcript_completed.json"),
            f"{local}/Sentences?PageSize=1000": page([], f"{BASE}/Sentences?Page=1"),
            f"{local}/Sentences?Page=1": page([], f"{local}/Sentences?Page=1"),
        }
    )
    with pytest.raises(FetchError, match="do not end"):
        twilio.fetch(api.context("http://127.0.0.1:9"))
    assert [url for url, _headers in api.asked] == list(api.routes)


# --- the signature -----------------------------------------------------------------------------


def request(url: str, signature: str | None, rule: str | None = None) -> HookRequest:
    path, _, query = url.removeprefix("https://b24scribe.example.com").partition("?")
    headers = {"X-Twilio-Signature": signature} if signature is not None else {}
    if rule:
        headers["X-Twilio-Webhooks-Signature-Settings"] = rule
    environ = {"PATH_INFO": path, "QUERY_STRING": query}
    return HookRequest("POST", headers, {}, environ, public_url="https://b24scribe.example.com")


def configured(**vendor: str) -> Settings:
    return load_settings({}).with_overrides(vendor=vendor or {"TWILIO_AUTH_TOKEN": AUTH_TOKEN})


def verify(url: str, body: bytes, signature: str | None, rule: str | None = None, **vendor: str) -> str:
    settings_ = configured(**vendor)
    hook = request(url, signature, rule)
    twilio.SIGNATURE.before_body(hook, settings_, "twilio")
    return twilio.SIGNATURE.verify(hook, body, settings_, "twilio").scheme


def test_a_form_webhook_signed_by_the_sdk_is_accepted_and_any_change_refused() -> None:
    body = fixture("webhook_form.txt")
    params = dict(pair.split("=", 1) for pair in body.decode().split("&"))
    url = URL + "?portal=main"
    signature = RequestValidator(AUTH_TOKEN).compute_signature(url, params)

    assert verify(url, body, signature) == "twilio-signature"
    for forged_url, forged_body, forged_signature in [
        (url, body.replace(b"GT3f", b"GT4f"), signature),
        (URL, body, signature),  # signed for another URL
        (url, body, RequestValidator("guess").compute_signature(url, params)),
        (url, body, ""),
    ]:
        with pytest.raises(AuthFailure) as caught:
            verify(forged_url, forged_body, forged_signature)
        assert (caught.value.status, caught.value.code) == (401, "bad_signature")


def test_a_json_webhook_is_signed_through_body_sha256_on_the_raw_bytes() -> None:
    body = fixture("webhook.json")
    url = f"{URL}?bodySHA256={twilio.body_sha256(body)}"
    signature = twilio.sign(AUTH_TOKEN, url)
    assert RequestValidator(AUTH_TOKEN).validate(url, body.decode(), signature)  # the SDK agrees

    assert verify(url, body, signature) == "twilio-signature"
    with pytest.raises(AuthFailure):
        verify(url, body + b" ", signature)
    with pytest.raises(AuthFailure):  # a JSON body without bodySHA256 is read as form fields: unsigned
        verify(URL, body, twilio.sign(AUTH_TOKEN, URL))
    odd = b"\xff{" + body  # bytes that are not UTF-8 are hashed as they are
    odd_url = f"{URL}?bodySHA256={twilio.body_sha256(odd)}"
    assert verify(odd_url, odd, twilio.sign(AUTH_TOKEN, odd_url)) == "twilio-signature"


def test_a_webhook_rule_signs_with_hmac_sha256_and_the_shared_key() -> None:
    body = fixture("webhook_form.txt")
    params = dict(pair.split("=", 1) for pair in body.decode().split("&"))
    rule = "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256"
    signature = twilio.sign(SHARED_KEY, URL, params, HMAC_SHA256)
    keys = {"TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_WEBHOOK_SECRET": SHARED_KEY}

    assert verify(URL, body, signature, rule, **keys) == "twilio-signature"
    with pytest.raises(AuthFailure):  # the same signature without the rule's header: HMAC-SHA1, token
        verify(URL, body, signature, None, **keys)
    with pytest.raises(AuthFailure):  # no shared key configured
        verify(URL, body, signature, rule, TWILIO_AUTH_TOKEN=AUTH_TOKEN)
    with pytest.raises(AuthFailure):
        verify(URL, body, signature, "key=k,algorithm=HMAC_MD5", **keys)


def test_the_scheme_is_configured_by_either_secret_and_present_by_its_header() -> None:
    assert twilio.SIGNATURE.configured(configured(), "twilio")
    assert twilio.SIGNATURE.configured(configured(TWILIO_WEBHOOK_SECRET="k"), "twilio")
    assert not twilio.SIGNATURE.configured(configured(TWILIO_ACCOUNT_SID=ACCOUNT), "twilio")
    assert twilio.SIGNATURE.present(request(URL, "x")) and not twilio.SIGNATURE.present(request(URL, None))


# --- properties --------------------------------------------------------------------------------

seconds_values = st.floats(min_value=0, max_value=7200, allow_nan=False, allow_infinity=False)


@st.composite
def sentence_pages(draw: st.DrawFn) -> tuple[Any, dict[str, str]]:
    """A page of stereo sentences as Twilio writes them (string, number or null times)."""
    sentences: list[dict[str, Any]] = []
    for index in range(draw(st.integers(1, 12))):
        start = draw(seconds_values)
        end = start + draw(st.floats(min_value=0, max_value=30, allow_nan=False))
        times = [start, end]
        style = draw(st.sampled_from(["string", "number", "null"]))
        if style == "string":
            times = [f"{value:.3f}" for value in times]
        elif style == "null":
            times[draw(st.integers(0, 1))] = None
        sentences.append(
            {
                "media_channel": draw(st.integers(1, 2)),
                "sentence_index": index,
                "start_time": times[0],
                "end_time": times[1],
                "transcript": draw(word_text | st.none()),
                "sid": f"GX{index:032x}",
                "confidence": "0.9",
            }
        )
    sentences += [
        {"media_channel": channel, "start_time": "0", "end_time": "1", "transcript": "ok"} for channel in (1, 2)
    ]
    return {"sentences": sentences, "meta": {"next_page_url": None, "key": "sentences"}}, {}


side_rules = st.builds(
    SideRules, direction=st.sampled_from(Direction), channel0=st.sampled_from(Role), first_speaker=st.sampled_from(Role)
)


@PROPERTY_SETTINGS
@given(payload=sentence_pages(), rules=side_rules)
def test_valid_pages_become_messages_bitrix24_accepts(payload: tuple[Any, dict[str, str]], rules: SideRules) -> None:
    body, query = payload
    result = twilio.parse_sentences(json.dumps(body).encode(), query)
    assert result.status == "completed" and result.transcript is not None
    check_attributable(result.transcript)
    assert_bitrix24_accepts(build_messages(result.transcript, rules))
    for segment in result.transcript.segments:
        assert segment.channel in (0, 1) and 0 <= segment.start <= segment.end  # §11: channels from 0


@PROPERTY_SETTINGS
@given(payload=mutated(sentence_pages()))
def test_broken_pages_give_field_named_errors_never_a_crash(payload: tuple[Any, dict[str, str]]) -> None:
    body, query = payload
    try:
        result = twilio.parse_sentences(json.dumps(body).encode(), query)
    except ValidationError as error:
        assert isinstance(error.messages, dict) and error.messages
        return
    assert result.transcript is not None
    try:
        check_attributable(result.transcript)
    except ValidationError:
        return
    assert_bitrix24_accepts(build_messages(result.transcript, SideRules()))


@PROPERTY_SETTINGS
@given(body=json_values)
def test_arbitrary_json_is_refused_by_field_not_by_crash(body: Any) -> None:
    for parse in (SOURCES.stt["twilio"].parse, twilio.parse_sentences):
        try:
            parse(json.dumps(body).encode(), {})
        except ValidationError as error:
            assert isinstance(error.messages, dict) and error.messages


@PROPERTY_SETTINGS
@given(body=st.binary(max_size=200))
def test_arbitrary_bytes_are_refused_by_field_not_by_crash(body: bytes) -> None:
    try:
        SOURCES.stt["twilio"].parse(body, {})
    except ValidationError as error:
        assert isinstance(error.messages, dict) and error.messages
