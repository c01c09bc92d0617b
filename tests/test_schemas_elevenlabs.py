"""ElevenLabs sends words with spacing tokens to a signed workspace webhook; we group them per side."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from b24scribe.inbound_auth import AuthFailure, HookRequest
from b24scribe.messages import SideRules, build_messages, check_attributable
from b24scribe.settings import Settings, load_settings
from b24scribe.transcript import CallReference, Direction, Role, Segment, Side
from schemas import elevenlabs
from schemas.registry import SOURCES
from tests.test_vendor_properties import assert_bitrix24_accepts, json_values, mutated, timed, word_text

FIXTURES = Path(__file__).parent / "fixtures" / "elevenlabs"
CALL_ID = "externalCall.716f1cb73def9700a23842adf9c4c568.1773130779"
SECRET = "wsec_elevenlabs_test_3c9a"
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> Any:
    return json.loads(fixture(name))


def errors_of(body: Any, query: dict[str, str] | None = None) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ValidationError) as caught:
        elevenlabs.parse(raw, query or {})
    return caught.value.messages


def sdk_signature(secret: str, body: bytes, timestamp: int) -> str:
    """The header as ElevenLabs' SDK computes it (`construct_event`: HMAC-SHA256 of f"{t}.{body}", hex)."""
    digest = hmac.new(secret.encode("utf-8"), f"{timestamp}.{body.decode()}".encode(), hashlib.sha256)
    return f"t={timestamp},v0={digest.hexdigest()}"


def test_a_diarized_webhook_gives_words_glued_only_where_no_spacing_separates_them() -> None:
    result = elevenlabs.parse(fixture("diarized_webhook.json"), {})

    assert result.status == "completed"
    assert result.vendor_job_id == "rq_5Hk2v9QzT1b7"
    assert result.reference == CallReference(b24_call_id=CALL_ID)
    transcript = result.transcript
    assert transcript is not None and transcript.granularity == "word"
    assert transcript.segments[:3] == [
        Segment(0.3, 0.54, "Good", speaker="speaker_0"),
        Segment(0.6, 0.84, "morning,", speaker="speaker_0"),
        Segment(0.9, 1.14, "this", speaker="speaker_0"),
    ]
    assert "(laughs)" not in [segment.text for segment in transcript.segments]  # audio events are not speech
    assert not any(segment.glue for segment in transcript.segments)
    assert build_messages(transcript, SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good morning, this is Anna."},
        {"SIDE": "Client", "START_TIME": 2, "STOP_TIME": 4, "MESSAGE": "Hello, I'd like to book a table."},
        {"SIDE": "User", "START_TIME": 5, "STOP_TIME": 7, "MESSAGE": "For how many?"},
        {"SIDE": "Client", "START_TIME": 7, "STOP_TIME": 9, "MESSAGE": "Two people, please."},
    ]


def test_multichannel_transcripts_keep_their_channel_and_json_text_metadata_names_the_call() -> None:
    result = elevenlabs.parse(fixture("multichannel_webhook.json"), {})

    assert result.reference == CallReference(pbx="asterisk", pbx_call_id="1700000000.123")
    transcript = result.transcript
    assert transcript is not None
    assert {segment.channel for segment in transcript.segments} == {0, 1}
    assert build_messages(transcript, SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good afternoon, Acme support."},
        {"SIDE": "Client", "START_TIME": 1, "STOP_TIME": 4, "MESSAGE": "Hi, I'm calling about my order."},
        {"SIDE": "User", "START_TIME": 4, "STOP_TIME": 6, "MESSAGE": "What's the order number?"},
    ]
    outbound = SideRules(direction=Direction.OUTBOUND, channel0=Role.CALLER)
    assert [m["SIDE"] for m in build_messages(transcript, outbound)] == ["Client", "User", "Client"]


def test_combined_multichannel_words_carry_their_channel() -> None:
    body = fixture_json("multichannel_webhook.json")
    chunks = body["data"]["transcription"].pop("transcripts")
    body["data"]["transcription"]["words"] = sorted(
        chunks[0]["words"] + chunks[1]["words"], key=lambda word: word["start"]
    )
    transcript = elevenlabs.parse(json.dumps(body).encode(), {}).transcript
    assert transcript is not None

    assert [m["MESSAGE"] for m in build_messages(transcript, SideRules())] == [
        "Good afternoon, Acme support.",
        "Hi, I'm calling about my order.",
        "What's the order number?",
    ]


def test_one_channel_only_is_a_mono_file_whose_speakers_decide() -> None:
    body = fixture_json("diarized_webhook.json")
    for word in body["data"]["transcription"]["words"]:
        word["channel_index"] = 0
    transcript = elevenlabs.parse(json.dumps(body).encode(), {}).transcript
    assert transcript is not None

    assert {segment.channel for segment in transcript.segments} == {None}
    assert [m["SIDE"] for m in build_messages(transcript, SideRules())] == ["User", "Client", "User", "Client"]


def test_speaker_roles_name_the_sides_and_a_token_without_spacing_glues() -> None:
    result = elevenlabs.parse(fixture("speaker_roles_response.json"), {})  # the bare answer, no envelope

    assert result.vendor_job_id == "tr_roles01"
    assert result.reference.is_empty()
    transcript = result.transcript
    assert transcript is not None
    assert transcript.segments[0] == Segment(0.2, 0.413, "Thank", speaker="agent", side=Side.USER)
    assert transcript.segments[-1] == Segment(4.4, 4.4, "…", speaker="customer", side=Side.CLIENT, glue=True)
    for rules in (SideRules(), SideRules(first_speaker=Role.CALLER, direction=Direction.OUTBOUND)):
        assert build_messages(transcript, rules) == [
            {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 3, "MESSAGE": "Thank you for calling Acme, how can I help?"},
            {"SIDE": "Client", "START_TIME": 3, "STOP_TIME": 5, "MESSAGE": "My parcel is late.…"},
        ]


def test_a_word_without_times_takes_the_end_of_the_word_before() -> None:
    body = fixture_json("diarized_webhook.json")
    words = body["data"]["transcription"]["words"]
    del words[2]["start"], words[2]["end"]  # "morning,"
    del words[4]["end"]  # "this"
    segments = elevenlabs.parse(json.dumps(body).encode(), {}).transcript.segments  # type: ignore[union-attr]

    assert segments[1] == Segment(0.54, 0.54, "morning,", speaker="speaker_0")
    assert segments[2] == Segment(0.9, 0.9, "this", speaker="speaker_0")


def test_the_url_says_which_one_channel_a_file_held() -> None:
    transcript = elevenlabs.parse(fixture("multichannel_webhook.json"), {"channel": "1"}).transcript
    assert transcript is not None

    assert {segment.channel for segment in transcript.segments} == {1}


def test_a_mono_transcript_without_speakers_cannot_be_attributed() -> None:
    body = fixture_json("diarized_webhook.json")
    for word in body["data"]["transcription"]["words"]:
        word.pop("speaker_id")
    transcript = elevenlabs.parse(json.dumps(body).encode(), {}).transcript
    assert transcript is not None

    with pytest.raises(ValidationError) as caught:
        check_attributable(transcript)
    assert "segments" in caught.value.messages


@pytest.mark.parametrize(
    ("metadata", "reference"),
    [
        ({"b24scribe_b24_call_id": "externalCall.a.1"}, CallReference(b24_call_id="externalCall.a.1")),
        ('{"b24scribe_pbx": "asterisk", "b24scribe_call": "17.1"}', CallReference(pbx="asterisk", pbx_call_id="17.1")),
        ("pbx=asterisk&call=17.2", CallReference(pbx="asterisk", pbx_call_id="17.2")),
        ({"b24_call_id": "externalCall.b.2"}, CallReference(b24_call_id="externalCall.b.2")),
        ("{not json", CallReference()),
        ({"crm": {"ticket": 5}}, CallReference()),
        (None, CallReference()),
    ],
)
def test_webhook_metadata_names_the_call(metadata: Any, reference: CallReference) -> None:
    body = fixture_json("diarized_webhook.json")
    body["data"]["webhook_metadata"] = metadata

    assert elevenlabs.parse(json.dumps(body).encode(), {}).reference == reference


def test_a_failed_job_keeps_the_vendors_reason() -> None:
    result = elevenlabs.parse(fixture("failed_webhook.json"), {})

    assert result.status == "failed"
    assert result.failure_reason == "Audio file is corrupted or in an unsupported format."
    assert result.vendor_job_id == "rq_Fail0x33"
    assert result.reference == CallReference(b24_call_id="externalCall.f.1")


def test_an_event_without_a_transcription_or_an_error_is_named() -> None:
    body = {"type": "speech_to_text_transcription", "data": {"request_id": "rq_1"}}

    assert errors_of(body) == {"data": {"transcription": [elevenlabs._MISSING_TRANSCRIPTION]}}
    assert errors_of({"type": "post_call_transcription", "data": {}}) == {
        "type": ["Must be speech_to_text_transcription."]
    }
    assert errors_of({"type": "speech_to_text_transcription"}) == {"data": ["Missing data for required field."]}
    assert errors_of({"language_code": "eng"}) == {"words": ["Missing data for required field."]}
    assert errors_of(b"not json") == {"_schema": ["The body is not valid JSON (JSONDecodeError)."]}


def test_broken_words_are_named_by_path() -> None:
    body = fixture_json("diarized_webhook.json")
    words = body["data"]["transcription"]["words"]
    words[0]["text"] = 3
    words[2]["start"] = "0.6"
    words[4]["speaker_id"] = 1
    words[6]["channel_index"] = 40
    words[8]["start"] = 9.0  # after its end
    words[10] = "word"

    path = ("data", "transcription", "words")
    assert errors_of(body) == {
        path[0]: {
            path[1]: {
                path[2]: {
                    0: {"text": ["Not a valid string."]},
                    2: {"start": ["Not a valid number of seconds."]},
                    4: {"speaker_id": ["Not a valid string."]},
                    6: {"channel_index": ["Must be an integer from 0 to 31."]},
                    8: {"end": ["Must not be before start."]},
                    10: ["Not a valid object."],
                }
            }
        }
    }


def test_broken_channel_transcripts_are_named_by_path() -> None:
    body = fixture_json("multichannel_webhook.json")
    body["data"]["transcription"]["transcripts"][0]["channel_index"] = "left"
    del body["data"]["transcription"]["transcripts"][1]["words"]

    assert errors_of(body) == {
        "data": {
            "transcription": {
                "transcripts": {
                    0: {"channel_index": ["Must be an integer from 0 to 31."]},
                    1: {"words": ["Missing data for required field."]},
                }
            }
        }
    }


# --- the signature -----------------------------------------------------------------------------


def request(header: str | None) -> HookRequest:
    return HookRequest("POST", {} if header is None else {"ElevenLabs-Signature": header}, {})


def configured(secret: str | None = SECRET) -> Settings:
    return load_settings({"B24SCRIBE_ELEVENLABS_WEBHOOK_SECRET": secret} if secret else {}, dotenv=False)


def test_a_signature_made_as_the_sdk_makes_it_is_accepted() -> None:
    body = fixture("diarized_webhook.json")
    settings_ = configured()
    header = sdk_signature(SECRET, body, int(time.time()))
    scheme = elevenlabs.SIGNATURE

    assert scheme.configured(settings_, "elevenlabs") and scheme.present(request(header))
    scheme.before_body(request(header), settings_, "elevenlabs")
    assert scheme.verify(request(header), body, settings_, "elevenlabs").scheme == "elevenlabs-signature"
    # a rotated secret: another v0 beside the right one still verifies
    assert scheme.verify(request(header.replace("v0=", "v0=00,v0=")), body, settings_, "elevenlabs")


@pytest.mark.parametrize(
    "header",
    [
        "v0=abc",
        "t=1764066030",
        "t=soon,v0=abc",
        "t=99999999999999999999,v0=abc",
        "",
    ],
)
def test_malformed_headers_are_refused_before_the_body(header: str) -> None:
    with pytest.raises(AuthFailure) as caught:
        elevenlabs.SIGNATURE.before_body(request(header), configured(), "elevenlabs")
    assert caught.value.status == 401


def test_stale_forged_and_other_body_signatures_are_refused() -> None:
    body = fixture("diarized_webhook.json")
    settings_ = configured()
    now = int(time.time())
    stale = sdk_signature(SECRET, body, now - 31 * 60)
    with pytest.raises(AuthFailure):
        elevenlabs.SIGNATURE.before_body(request(stale), settings_, "elevenlabs")
    with pytest.raises(AuthFailure):
        elevenlabs.SIGNATURE.verify(request(stale), body, settings_, "elevenlabs")
    for forged in (sdk_signature("guess", body, now), sdk_signature(SECRET, body + b" ", now)):
        with pytest.raises(AuthFailure) as caught:
            elevenlabs.SIGNATURE.verify(request(forged), body, settings_, "elevenlabs")
        assert caught.value.code == "bad_signature"
    # 29 minutes old is still inside the tolerance
    elevenlabs.SIGNATURE.before_body(request(sdk_signature(SECRET, body, now - 29 * 60)), settings_, "elevenlabs")


def test_the_signature_covers_bytes_that_are_not_utf8() -> None:
    body = b'{"data": "\xff"}'
    header = f"t={int(time.time())},{elevenlabs.sign(SECRET, str(int(time.time())), body)}"

    assert elevenlabs.SIGNATURE.verify(request(header), body, configured(), "elevenlabs")


def test_the_registry_verifies_it_with_its_secret() -> None:
    vendor = SOURCES.stt["elevenlabs"]
    assert vendor.signatures == (elevenlabs.SIGNATURE,)
    assert not elevenlabs.SIGNATURE.configured(configured(None), "elevenlabs")


# --- properties (contract §6) ------------------------------------------------------------------


@st.composite
def elevenlabs_payloads(draw: st.DrawFn) -> tuple[Any, dict[str, str]]:
    style = draw(st.sampled_from(["diarized", "roles", "channels"]))
    words: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 60))):
        start, end = draw(timed())
        kind = draw(st.sampled_from(["word", "word", "spacing", "audio_event"]))
        word: dict[str, Any] = {"text": draw(word_text), "start": start, "end": end, "type": kind, "logprob": -0.1}
        if style == "diarized":
            word["speaker_id"] = draw(st.sampled_from(["speaker_0", "speaker_1", "speaker_2"]))
        elif style == "roles":
            word["speaker_id"] = draw(st.sampled_from(["agent", "customer"]))
        else:
            word["channel_index"] = draw(st.integers(0, 1))
        if draw(st.integers(0, 9)) == 0:  # start/end are optional
            del word[draw(st.sampled_from(["start", "end"]))]
        words.append(word)
    if style == "channels":  # both channels heard, or one channel is a mono file without speakers
        words += [{"text": "ok", "start": 0, "end": 1, "type": "word", "channel_index": channel} for channel in (0, 1)]
    transcription: dict[str, Any] = {"language_code": "eng", "text": "", "words": words}
    if style == "channels" and draw(st.booleans()):
        transcription = {
            "transcripts": [
                {"channel_index": channel, "words": [w for w in words if w["channel_index"] == channel]}
                for channel in (0, 1)
            ]
        }
    if draw(st.booleans()):
        transcription["transcription_id"] = "tr_1"
        return transcription, {}
    body = {
        "type": "speech_to_text_transcription",
        "event_timestamp": 1764066030,
        "data": {
            "request_id": "rq_1",
            "webhook_metadata": {"b24scribe_b24_call_id": CALL_ID},
            "transcription": transcription,
        },
    }
    return body, {}


side_rules = st.builds(
    SideRules, direction=st.sampled_from(Direction), channel0=st.sampled_from(Role), first_speaker=st.sampled_from(Role)
)


@PROPERTY_SETTINGS
@given(payload=elevenlabs_payloads(), rules=side_rules)
def test_valid_webhooks_become_messages_bitrix24_accepts(payload: tuple[Any, dict[str, str]], rules: SideRules) -> None:
    body, query = payload
    result = SOURCES.stt["elevenlabs"].parse(json.dumps(body).encode(), query)
    assert result.status == "completed" and result.transcript is not None
    transcript = result.transcript
    check_attributable(transcript)
    messages = build_messages(transcript, rules)
    assert_bitrix24_accepts(messages)
    for segment in transcript.segments:  # contract §6.3: roles name sides whatever the rules say
        if segment.speaker in ("agent", "customer"):
            assert segment.side == (Side.USER if segment.speaker == "agent" else Side.CLIENT)
        assert 0 <= segment.start <= segment.end
    channels = {segment.channel for segment in transcript.segments}
    assert channels <= {0, 1, None} and len(channels - {None}) != 1  # one channel seen is a mono file


@PROPERTY_SETTINGS
@given(payload=mutated(elevenlabs_payloads()))
def test_broken_webhooks_give_field_named_errors_never_a_crash(payload: tuple[Any, dict[str, str]]) -> None:
    body, query = payload
    try:
        result = SOURCES.stt["elevenlabs"].parse(json.dumps(body).encode(), query)
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


@PROPERTY_SETTINGS
@given(body=json_values)
def test_arbitrary_json_is_refused_by_field_not_by_crash(body: Any) -> None:
    try:
        SOURCES.stt["elevenlabs"].parse(json.dumps(body).encode(), {})
    except ValidationError as error:
        assert isinstance(error.messages, dict) and error.messages
