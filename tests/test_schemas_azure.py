"""Azure AI Speech batch transcription: web hook bodies, result files (ticks, ISO 8601 durations,
0-based channels, 1-based speakers), the signature, the challenge and the fetch."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from b24scribe.inbound_auth import AuthFailure, HookRequest
from b24scribe.messages import SideRules, build_messages, check_attributable
from b24scribe.settings import Settings, load_settings
from b24scribe.sources import FetchContext, FetchError
from b24scribe.transcript import CallReference, Segment
from schemas import azure
from schemas.registry import SOURCES
from tests.test_vendor_properties import assert_bitrix24_accepts, json_values, mutated, side_rules, timed

FIXTURES = Path(__file__).parent / "fixtures" / "azure"
CALL_ID = "externalCall.716f1cb73def9700a23842adf9c4c568.1773130779"
TRANSCRIPTION_ID = "5cff1d03-118f-4c4c-b3ba-e1f1cd88c14d"
SECRET = "azure-webhook-secret-7d2e"
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STEREO_MESSAGES = [  # channel 0 the caller (the client on an inbound call), channel 1 the employee
    {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good afternoon, Acme support."},
    {"SIDE": "Client", "START_TIME": 1, "STOP_TIME": 4, "MESSAGE": "Hi, I'm calling about my order."},
    {"SIDE": "User", "START_TIME": 4, "STOP_TIME": 6, "MESSAGE": "What's the order number?"},
]
DIARIZED_MESSAGES = [  # speaker 1 speaks first: the callee, the employee on an inbound call
    {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good morning, this is Anna."},
    {"SIDE": "Client", "START_TIME": 2, "STOP_TIME": 4, "MESSAGE": "Hello, I'd like to book a table."},
    {"SIDE": "User", "START_TIME": 5, "STOP_TIME": 7, "MESSAGE": "For how many?"},
    {"SIDE": "Client", "START_TIME": 7, "STOP_TIME": 9, "MESSAGE": "Two people, please."},
]


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> Any:
    return json.loads(fixture(name))


def parse(body: Any, query: Mapping[str, str] | None = None) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return SOURCES.stt["azure"].parse(raw, query or {})


def errors_of(body: Any, query: Mapping[str, str] | None = None) -> Any:
    with pytest.raises(ValidationError) as caught:
        parse(body, query)
    return caught.value.messages


def microsoft_signature(secret: str, payload: bytes) -> str:
    """As Microsoft's web hook receiver sample computes it:
    Convert.ToBase64String(new HMACSHA256(secret).ComputeHash(payload))."""
    return base64.b64encode(hmac.new(secret.encode("utf-8"), payload, hashlib.sha256).digest()).decode()


# --- result files -------------------------------------------------------------------------------


def test_a_stereo_result_file_gives_one_segment_per_phrase_in_seconds_from_ticks() -> None:
    result = parse(fixture("result_stereo.json"))

    assert result.status == "completed" and result.vendor_job_id is None
    assert result.transcript.segments == [
        Segment(1.2, 3.8, "Hi, I'm calling about my order.", channel=0),  # NoMatch phrase skipped
        Segment(0.3, 1.8, "Good afternoon, Acme support.", channel=1),
        Segment(4.1, 5.8, "What's the order number?", channel=1),
    ]
    assert result.transcript.granularity == "segment"
    assert build_messages(result.transcript, SideRules()) == STEREO_MESSAGES  # re-sorted by time


def test_a_diarized_result_file_is_mono_with_1_based_speakers_and_iso_durations() -> None:
    result = parse(fixture("result_diarized.json"))

    assert result.transcript.segments == [
        Segment(0.3, 1.9, "Good morning, this is Anna.", speaker="1"),
        Segment(2.1, 3.9, "Hello, I'd like to book a table.", speaker="2"),
        Segment(5.2, 6.5, "For how many?", speaker="1"),
        Segment(7.05, 8.7, "Two people, please.", speaker="2"),  # "PT7.05S" + "PT1.65S": no ticks
    ]
    assert build_messages(result.transcript, SideRules()) == DIARIZED_MESSAGES


def test_one_channel_without_speakers_cannot_be_attributed_unless_the_url_says_which() -> None:
    body = fixture_json("result_diarized.json")
    for phrase in body["recognizedPhrases"]:
        del phrase["speaker"]
    result = parse(body)
    assert {segment.channel for segment in result.transcript.segments} == {None}
    with pytest.raises(ValidationError):
        check_attributable(result.transcript)

    one_channel = parse(body, {"channel": "1"})
    assert {segment.channel for segment in one_channel.transcript.segments} == {1}


def test_two_channels_declared_in_combined_phrases_keep_a_silent_channels_neighbour_stereo() -> None:
    body = fixture_json("result_stereo.json")
    body["recognizedPhrases"] = [p for p in body["recognizedPhrases"] if p["channel"] == 1]
    result = parse(body)  # channel 0 said nothing, yet the file was transcribed as two channels
    assert {segment.channel for segment in result.transcript.segments} == {1}


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("PT0.76S", 0.76), ("PT1M2.5S", 62.5), ("PT1H0M3S", 3603.0), ("PT0S", 0.0), ("P1DT2H", 93600.0), ("PT4S", 4.0)],
)
def test_iso_8601_durations(value: str, seconds: float) -> None:
    assert azure.iso_seconds(value) == (pytest.approx(seconds), None)


@pytest.mark.parametrize("value", ["PT", "P", "1.5", "PT-1S", "PT1.5", "P8D", 1.5, None, "PT1S "])
def test_bad_iso_8601_durations(value: Any) -> None:
    assert azure.iso_seconds(value)[1] is not None


# --- web hook bodies ----------------------------------------------------------------------------


def test_a_succeeded_transcription_entity_is_a_fetch_named_by_custom_properties() -> None:
    result = parse(fixture("webhook_succeeded.json"))

    assert (result.status, result.fetch_id, result.vendor_job_id) == ("fetch", TRANSCRIPTION_ID, TRANSCRIPTION_ID)
    assert result.reference == CallReference(b24_call_id=CALL_ID)


def test_a_reference_only_body_of_api_2024_11_15_is_a_fetch_of_its_self() -> None:
    result = parse(fixture("webhook_reference.json"))

    assert (result.status, result.fetch_id) == ("fetch", TRANSCRIPTION_ID)
    assert result.reference.is_empty()


def test_a_failed_transcription_keeps_azures_reason() -> None:
    result = parse(fixture("webhook_failed.json"))

    assert result.status == "failed"
    assert result.failure_reason == "The recordings URI contains invalid data."
    assert result.reference == CallReference(b24_call_id="externalCall.f.1")
    body = fixture_json("webhook_failed.json")
    body["properties"]["error"] = {"code": "InvalidData"}
    assert parse(body).failure_reason == "Azure reported error code InvalidData."
    del body["properties"]
    assert parse(body).failure_reason == "Azure reported a failed transcription without a message."


@pytest.mark.parametrize(
    ("metadata", "reference"),
    [
        (
            {"b24scribe_pbx": "asterisk", "b24scribe_call": "1700000000.123"},
            CallReference("asterisk", "1700000000.123"),
        ),
        ({"b24scribe_b24_call_id": "externalCall.x.1", "other": "1"}, CallReference(b24_call_id="externalCall.x.1")),
        ({"team": "sales"}, CallReference()),
    ],
)
def test_custom_properties_name_the_call(metadata: dict[str, str], reference: CallReference) -> None:
    body = fixture_json("webhook_succeeded.json")
    body["customProperties"] = metadata
    assert parse(body).reference == reference


def test_bad_bodies_are_named_by_field() -> None:
    entity = fixture_json("webhook_succeeded.json")
    assert "self" in errors_of({"status": "Succeeded"})
    assert "_schema" in errors_of(b"[1, 2]")
    assert errors_of({**entity, "status": "Running"}) == {
        "status": ["Must be Succeeded or Failed: the transcription is Running."]
    }
    assert "self" in errors_of(
        {**entity, "self": "https://westeurope.api.cognitive.microsoft.com/speechtotext/v3.2/webhooks/1"}
    )
    assert "self" in errors_of({**entity, "self": 7})
    assert errors_of({**entity, "customProperties": ["b24scribe_call"]}) == {
        "customProperties": ["Not a valid object."]
    }
    assert errors_of({**entity, "links": {"files": "ftp://x"}}) == {"links": {"files": ["Not a valid URL."]}}
    assert "channel" in errors_of(entity, {"channel": "2"})


def test_broken_phrases_are_named_by_path() -> None:
    body = fixture_json("result_stereo.json")
    phrases = body["recognizedPhrases"]
    phrases[0]["offsetInTicks"] = -5
    del phrases[2]["nBest"]
    phrases[3]["nBest"][0]["display"] = 7
    phrases.append({**phrases[3], "channel": 40, "speaker": 0})
    del phrases[-1]["offsetInTicks"], phrases[-1]["durationInTicks"]
    phrases.append({**phrases[1], "recognitionStatus": 3})
    iso = {**phrases[2], "nBest": [{"display": "x"}], "offset": "soon"}
    del iso["offsetInTicks"], iso["durationInTicks"]
    phrases.append(iso)

    errors = errors_of(body)["recognizedPhrases"]
    assert errors[0] == {"offsetInTicks": [azure._TICKS_MESSAGE]}
    assert errors[2] == {"nBest": ["Missing data for required field."]}
    assert errors[3] == {"nBest": {0: {"display": ["Not a valid string."]}}}
    assert errors[4] == {  # a copy of phrase 3, whose display is broken too
        "nBest": {0: {"display": ["Not a valid string."]}},
        "channel": ["Must be an integer from 0 to 31."],
        "speaker": ["Must be an integer from 1 to 999."],
    }
    assert errors[5] == {"recognitionStatus": ["Not a valid string."]}
    assert errors[6] == {"offset": ['Not a valid ISO 8601 duration like "PT1.32S".']}
    assert errors_of({"recognizedPhrases": {}}) == {"recognizedPhrases": ["Not a valid list."]}
    assert errors_of({"combinedRecognizedPhrases": []}) == {"recognizedPhrases": ["Missing data for required field."]}


# --- the signature, the challenge and other events ----------------------------------------------


def request(signature: str | None = None, event: str | None = None, query: dict[str, str] | None = None) -> HookRequest:
    headers = {}
    if signature is not None:
        headers[azure.SIGNATURE_HEADER] = signature
    if event is not None:
        headers[azure.EVENT_HEADER] = event
    return HookRequest("POST", headers, query or {})


def configured(secret: str | None = SECRET) -> Settings:
    return load_settings({"B24SCRIBE_AZURE_WEBHOOK_SECRET": secret} if secret else {}, dotenv=False)


def test_a_signature_made_as_microsofts_sample_makes_it_is_accepted() -> None:
    body = fixture("webhook_succeeded.json")
    header = microsoft_signature(SECRET, body)
    scheme, settings_ = azure.SIGNATURE, configured()

    assert header == azure.sign(SECRET, body)
    assert scheme.configured(settings_, "azure") and scheme.present(request(header))
    scheme.before_body(request(header), settings_, "azure")
    assert (
        scheme.verify(request(header, "TranscriptionCompletion"), body, settings_, "azure").scheme == "azure-signature"
    )
    assert not scheme.configured(configured(None), "azure")
    assert SOURCES.stt["azure"].signatures == (azure.SIGNATURE,)


def test_forged_rotated_out_and_other_body_signatures_are_refused() -> None:
    body = fixture("webhook_succeeded.json")
    for forged in (
        microsoft_signature("guess", body),
        microsoft_signature("azure-webhook-secret-old", body),  # stale: signed with the secret before rotation
        microsoft_signature(SECRET, body + b" "),
        microsoft_signature(SECRET, body).lower(),
    ):
        with pytest.raises(AuthFailure) as caught:
            azure.SIGNATURE.verify(request(forged), body, configured(), "azure")
        assert (caught.value.status, caught.value.code) == (401, "bad_signature")


@pytest.mark.parametrize("header", ["", "abc", "not base64!", base64.b64encode(b"short").decode(), "é"])
def test_malformed_signatures_are_refused_before_the_body(header: str) -> None:
    with pytest.raises(AuthFailure) as caught:
        azure.SIGNATURE.before_body(request(header), configured(), "azure")
    assert caught.value.status == 401


def test_the_challenge_is_signed_over_its_validation_token_and_answered_with_it() -> None:
    token = "9f2c1b7e-3a4d-4e5f-8a6b-7c8d9e0f1a2b"
    challenge = request(microsoft_signature(SECRET, token.encode()), "Challenge", {"validationToken": token})

    assert azure.SIGNATURE.verify(challenge, b"", configured(), "azure")
    answered = azure.answer(challenge, b"", configured())
    assert answered is not None
    assert (answered.status, answered.body, answered.content_type) == (200, token.encode(), "text/plain; charset=utf-8")
    # the token's signature does not sign a body of another event
    with pytest.raises(AuthFailure):
        azure.SIGNATURE.verify(
            request(microsoft_signature(SECRET, token.encode()), "TranscriptionCompletion", {"validationToken": token}),
            b"{}",
            configured(),
            "azure",
        )


@pytest.mark.parametrize(
    ("event", "query", "status", "body"),
    [
        ("challenge", {"validationToken": "abc"}, 200, b"abc"),
        (None, {"validationToken": "abc"}, 200, b"abc"),
        ("Ping", {}, 200, b""),
        ("TranscriptionCreation", {}, 200, None),
        ("TranscriptionProcessing", {}, 200, None),
        ("challenge", {}, 200, None),  # no token: nothing to echo, and nothing is stored either
        ("challenge", {"validationToken": "x" * 1025}, 400, None),
    ],
)
def test_requests_that_are_not_results_are_answered_without_storing(
    event: str | None, query: dict[str, str], status: int, body: bytes | None
) -> None:
    answered = azure.answer(request(None, event, query), b"", configured())
    assert answered is not None and answered.status == status
    if body is not None:
        assert answered.body == body


@pytest.mark.parametrize("event", ["TranscriptionCompletion", "transcriptioncompletion", None])
def test_a_completion_is_an_event(event: str | None) -> None:
    assert azure.answer(request(None, event), b"{}", configured()) is None


# --- the fetch ----------------------------------------------------------------------------------

API = "https://westeurope.api.cognitive.microsoft.com"
FILES = f"{API}/speechtotext/v3.2/transcriptions/{TRANSCRIPTION_ID}/files"
CONTENT = json.loads(fixture("files.json"))["values"][1]["links"]["contentUrl"]


@dataclass
class _Answer:
    status_code: int
    content: bytes


@dataclass
class StubHttp:
    """A requests.Session stand-in: canned answers by URL, every request recorded."""

    answers: dict[str, bytes]
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def get(self, url: str, headers: dict[str, str], timeout: float) -> _Answer:
        self.seen.append((url, headers))
        return _Answer(200, self.answers[url]) if url in self.answers else _Answer(404, b"{}")


def context(http: StubHttp, body: bytes, vendor: dict[str, str] | None = None) -> FetchContext:
    values = {"B24SCRIBE_AZURE_API_URL": API, "B24SCRIBE_AZURE_API_KEY": "azure-key", **(vendor or {})}
    settings_ = load_settings({k: v for k, v in values.items() if v}, dotenv=False)
    return FetchContext(
        "azure",
        (settings_.vendor_setting("azure", "API_URL") or azure.DEFAULT_API_URL).rstrip("/"),
        settings_.vendor_setting("azure", "API_KEY"),
        TRANSCRIPTION_ID,
        body,
        {},
        http,
        5.0,
        settings_,
    )


def test_the_fetch_lists_the_files_with_the_key_and_downloads_the_result_without_it() -> None:
    http = StubHttp({FILES: fixture("files.json"), CONTENT: fixture("result_stereo.json")})
    result = SOURCES.stt["azure"].fetch.run(context(http, fixture("webhook_succeeded.json")))  # type: ignore[union-attr,misc]

    assert build_messages(result.transcript, SideRules()) == STEREO_MESSAGES
    assert (result.vendor_job_id, result.reference) == (TRANSCRIPTION_ID, CallReference(b24_call_id=CALL_ID))
    assert [url for url, _ in http.seen] == [FILES, CONTENT]  # the report file is not the result
    assert http.seen[0][1][azure.KEY_HEADER] == "azure-key"
    assert http.seen[1][1] == {}  # a SAS URL: the key never leaves for storage


def test_a_reference_only_body_fetches_the_transcription_first() -> None:
    self_url = json.loads(fixture("webhook_reference.json"))["self"]
    http = StubHttp(
        {
            self_url: fixture("webhook_succeeded.json"),
            FILES: fixture("files.json"),
            CONTENT: fixture("result_diarized.json"),
        }
    )
    result = azure.fetch(context(http, fixture("webhook_reference.json")))

    assert build_messages(result.transcript, SideRules()) == DIARIZED_MESSAGES  # type: ignore[arg-type]
    assert [url for url, _ in http.seen] == [self_url, FILES, CONTENT]


def test_a_failed_transcription_fetched_keeps_its_reason() -> None:
    self_url = json.loads(fixture("webhook_reference.json"))["self"]
    http = StubHttp({self_url: fixture("webhook_failed.json")})
    result = azure.fetch(context(http, fixture("webhook_reference.json")))
    assert (result.status, result.failure_reason) == ("failed", "The recordings URI contains invalid data.")


@pytest.mark.parametrize(
    ("files_url", "content_url"),
    [
        ("https://evil.example/speechtotext/v3.2/transcriptions/x/files", CONTENT),
        ("http://westeurope.api.cognitive.microsoft.com/speechtotext/v3.2/transcriptions/x/files", CONTENT),
        ("https://user@westeurope.api.cognitive.microsoft.com/speechtotext/x/files", CONTENT),
        (FILES, "https://evil.example/result.json"),
        (FILES, "http://spsvcprodweu.blob.core.windows.net/x.json"),
        (FILES, "https://x.blob.core.windows.net.evil.example/x.json"),
    ],
)
def test_only_the_configured_api_host_and_azure_storage_are_contacted(files_url: str, content_url: str) -> None:
    entity = fixture_json("webhook_succeeded.json")
    entity["links"]["files"] = files_url
    files = fixture_json("files.json")
    files["values"][1]["links"]["contentUrl"] = content_url
    http = StubHttp({FILES: json.dumps(files).encode(), content_url: fixture("result_stereo.json")})
    with pytest.raises(FetchError) as caught:
        azure.fetch(context(http, json.dumps(entity).encode()))
    assert caught.value.retry is False
    assert all(url == FILES for url, _ in http.seen)


def test_without_an_api_url_the_region_names_the_host_else_the_job_says_what_to_set() -> None:
    regional = "https://northeurope.api.cognitive.microsoft.com"
    entity = fixture_json("webhook_succeeded.json")
    entity["links"]["files"] = FILES.replace(API, regional)
    http = StubHttp({FILES.replace(API, regional): fixture("files.json"), CONTENT: fixture("result_stereo.json")})
    body = json.dumps(entity).encode()
    assert azure.fetch(context(http, body, {"B24SCRIBE_AZURE_API_URL": "", "B24SCRIBE_AZURE_REGION": "northeurope"}))
    with pytest.raises(FetchError) as caught:
        azure.fetch(context(http, body, {"B24SCRIBE_AZURE_API_URL": ""}))
    assert "B24SCRIBE_AZURE_API_URL" in caught.value.reason and not caught.value.retry


def test_a_transcription_still_running_is_retried_and_a_mono_result_without_speakers_is_named() -> None:
    self_url = json.loads(fixture("webhook_reference.json"))["self"]
    running = {**fixture_json("webhook_succeeded.json"), "status": "Running"}
    with pytest.raises(FetchError) as caught:
        azure.fetch(context(StubHttp({self_url: json.dumps(running).encode()}), fixture("webhook_reference.json")))
    assert caught.value.retry is True

    mono = fixture_json("result_diarized.json")
    for phrase in mono["recognizedPhrases"]:
        del phrase["speaker"]
    http = StubHttp({FILES: fixture("files.json"), CONTENT: json.dumps(mono).encode()})
    with pytest.raises(ValidationError) as error:
        azure.fetch(context(http, fixture("webhook_succeeded.json")))
    assert "segments" in error.value.messages


# --- properties (contract §6) -------------------------------------------------------------------


@st.composite
def azure_results(draw: st.DrawFn) -> tuple[Any, dict[str, str]]:
    style = draw(st.sampled_from(["stereo", "diarized", "one-channel"]))
    phrases: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 40))):
        start, end = draw(timed())
        status = draw(st.sampled_from(["Success", "Success", "Success", "NoMatch"]))
        phrase: dict[str, Any] = {
            "recognitionStatus": status,
            "channel": draw(st.integers(0, 1)) if style == "stereo" else 0,
            "nBest": [{"confidence": 0.9, "display": draw(st.text(max_size=20))}] if status == "Success" else [],
        }
        if draw(st.booleans()):
            phrase["offsetInTicks"] = float(round(start * 1e7))
            phrase["durationInTicks"] = float(round((end - start) * 1e7))
        else:
            phrase["offset"] = f"PT{round(start, 3)}S"
            phrase["duration"] = f"PT{round(end - start, 3)}S"
        if style == "diarized":
            phrase["speaker"] = draw(st.integers(1, 3))
        phrases.append(phrase)
    channels = [0, 1] if style == "stereo" else [0]
    if style == "diarized":  # every phrase named a speaker, even with none heard
        phrases.append(
            {"channel": 0, "speaker": 1, "offsetInTicks": 0, "durationInTicks": 1, "nBest": [{"display": "ok"}]}
        )
    body = {
        "source": "https://example/x.wav",
        "combinedRecognizedPhrases": [{"channel": c, "display": ""} for c in channels],
        "recognizedPhrases": phrases,
    }
    return body, ({"channel": draw(st.sampled_from(["0", "1"]))} if style == "one-channel" else {})


@PROPERTY_SETTINGS
@given(payload=azure_results(), rules=side_rules)
def test_valid_result_files_become_messages_bitrix24_accepts(
    payload: tuple[Any, dict[str, str]], rules: SideRules
) -> None:
    body, query = payload
    result = parse(body, query)
    assert result.status == "completed" and result.transcript is not None
    check_attributable(result.transcript)
    assert_bitrix24_accepts(build_messages(result.transcript, rules))
    kept = [p for p in body["recognizedPhrases"] if p.get("recognitionStatus", "Success") == "Success" and p["nBest"]]
    assert len(result.transcript.segments) == len(kept)
    for segment, phrase in zip(result.transcript.segments, kept, strict=True):
        assert 0 <= segment.start <= segment.end
        if "offsetInTicks" in phrase:  # contract §6.2: ticks are 100 ns
            assert segment.start == phrase["offsetInTicks"] / 10_000_000
        if query:
            assert segment.channel == int(query["channel"])
        elif "speaker" in phrase:
            assert (segment.channel, segment.speaker) == (None, str(phrase["speaker"]))
        else:
            assert segment.channel == phrase["channel"]  # channels are 0-based already (contract §11)


@PROPERTY_SETTINGS
@given(payload=mutated(azure_results()))
def test_broken_result_files_give_field_named_errors_never_a_crash(payload: tuple[Any, dict[str, str]]) -> None:
    body, query = payload
    try:
        result = parse(body, query)
    except ValidationError as error:
        assert isinstance(error.messages, dict) and error.messages
        return
    if result.transcript is None:
        return
    try:
        check_attributable(result.transcript)
    except ValidationError:
        return
    assert_bitrix24_accepts(build_messages(result.transcript, SideRules()))


@st.composite
def mutated_entities(draw: st.DrawFn) -> Any:
    body, _query = draw(
        mutated(
            st.just(
                (
                    fixture_json(
                        draw(
                            st.sampled_from(["webhook_succeeded.json", "webhook_failed.json", "webhook_reference.json"])
                        )
                    ),
                    {},
                )
            )
        )
    )
    return body


@PROPERTY_SETTINGS
@given(body=st.one_of(json_values, mutated_entities()))
def test_arbitrary_json_is_refused_by_field_not_by_crash(body: Any) -> None:
    try:
        result = parse(body)
    except ValidationError as error:
        assert isinstance(error.messages, dict) and error.messages
        return
    assert result.status in ("completed", "failed", "fetch")
