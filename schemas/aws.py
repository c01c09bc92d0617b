"""AWS Transcribe batch jobs (`POST /hooks/stt/aws`), three ways in (docs/contract.md §11).

(a) The Transcribe output JSON as is (`jobName`, `results`): the call is named by the URL.
(b) The EventBridge "Transcribe Job State Change" event (`source` `aws.transcribe`), posted by an
    EventBridge API destination whose connection sends `Authorization: Bearer <inbound token>` (or
    Basic auth). `FAILED` is recorded with the event's `detail.FailureReason`; `COMPLETED` becomes a
    fetch: `GetTranscriptionJob` (boto3, credentials by the standard AWS chain, region
    `B24SCRIBE_AWS_REGION` else the event's `region`, endpoint `B24SCRIBE_AWS_API_URL` when set), the
    job's tags (`b24scribe_b24_call_id`, or `b24scribe_pbx` + `b24scribe_call`) must agree with the
    URL, and `Transcript.TranscriptFileUri` is downloaded: with a plain GET when presigned, else from
    S3 with the same credentials; only from AWS hosts or the configured endpoint.
(c) The same event inside an SNS envelope (`Type` `Notification`, `Message` = the event as a string),
    whose RSA signature is verified (`SignatureVersion` 1 SHA1, 2 SHA256) with the certificate at
    `SigningCertURL` (only an `https://sns.<region>.amazonaws.com/` URL; cached) for the topics in
    `B24SCRIBE_AWS_SNS_TOPIC_ARNS`. A `SubscriptionConfirmation` is answered by following its
    `SubscribeURL`, only to `https://sns.<region of the topic>.amazonaws.com/`; nothing is stored.

The output JSON: `results.items[]` of `type` `pronunciation` (times as STRINGS of seconds) and
`punctuation` (no times: glued to the word before, at its end), `alternatives[0].content`,
`speaker_label` `spk_0`… (ShowSpeakerLabels), `channel_label` `ch_0`/`ch_1` (ChannelIdentification,
already 0-based). Older outputs label words only in `results.speaker_labels.segments[].items` (by
start time) or in `results.channel_labels.channels[].items`; both are read. `results.audio_segments`
are used as messages when every one of them names its speaker or channel, else the words are grouped
(contract §6.4).

`B24SCRIBE_AWS_SNS_TEST_HOSTS` (comma-separated host[:port]) is FOR TESTS ONLY: it lets the SNS
certificate and subscription URLs come from those hosts (a fake) as well.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote, urlsplit

from marshmallow import ValidationError

from b24scribe.inbound_auth import Authenticated, AuthFailure, HookRequest
from b24scribe.limits import MAX_CHANNEL
from b24scribe.settings import Settings
from b24scribe.sources import FetchContext, FetchError, FetchSpec, HookAnswer, SttVendor
from b24scribe.transcript import CallReference, Segment, Transcript, VendorResult
from schemas._vendor_payload import (
    MAX_SECONDS,
    NUMBER_TYPES,
    FieldPath,
    PayloadErrors,
    channel_from_query,
    field_error,
    load_json_object,
    new_segment,
    reference_from_metadata,
)
from schemas.source import load_json

NAME = "aws"
EVENT_SOURCE = "aws.transcribe"
EVENT_DETAIL_TYPE = "Transcribe Job State Change"
SNS_TYPE_HEADER = "x-amz-sns-message-type"
SNS_MESSAGE_TYPES = frozenset({"Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation"})
# SNS retries a delivery for up to an hour (its HTTP/S delivery policy caps the retry phases at
# 3600 s); the Timestamp is the publish time, the same on every retry.
SNS_TOLERANCE_SECONDS = 3600 + 300
_SNS_HOST = re.compile(r"sns\.[a-z0-9-]{1,40}\.amazonaws\.com")
_AWS_HOST = re.compile(r"(?:[a-z0-9.-]{1,200}\.)?amazonaws\.com(?:\.cn)?")
_REGION = re.compile(r"[a-z]{2}(?:-[a-z]+){1,3}-[0-9]{1,2}")
_CHANNEL_LABEL = re.compile(r"ch_([0-9]{1,2})")
_TIME = 'Not a valid time: expected a string of seconds such as "4.87".'
_MAX_JOB_NAME = 200


# --- the Transcribe output JSON (a) -------------------------------------------------------------


def parse(raw_body: bytes, query: Mapping[str, str]) -> VendorResult:
    """Translate what AWS posted: an output JSON, an EventBridge event, or an SNS notification."""
    forced_channel = channel_from_query(query)
    body = load_json_object(raw_body)
    if "results" in body or "jobName" in body:
        return parse_output(body, forced_channel)
    if "Type" in body and "TopicArn" in body:
        return _event_result(_sns_event(body))
    if "detail-type" in body or "detail" in body:
        return _event_result(body)
    raise ValidationError(
        {"_schema": ["Not a Transcribe output JSON (results), an EventBridge event (detail) or an SNS message (Type)."]}
    )


def parse_output(body: dict[str, Any], forced_channel: int | None = None) -> VendorResult:
    """The Transcribe output JSON, decoded."""
    job_name = body.get("jobName")
    if job_name is not None and (type(job_name) is not str or not 0 < len(job_name) <= _MAX_JOB_NAME):
        raise field_error(("jobName",), "Not a valid job name.")
    results = body.get("results")
    if type(results) is not dict:
        raise field_error(
            ("results",), "Missing data for required field." if results is None else "Not a valid object."
        )
    errors = PayloadErrors()
    segments: list[Segment] | None = None
    granularity = "word"
    audio_segments = results.get("audio_segments")
    if type(audio_segments) is list and audio_segments:
        segments = _audio_segments(audio_segments, forced_channel, errors)
        granularity = "segment"
    if segments is None:
        segments = _words(results, forced_channel, errors)
        granularity = "word"
    errors.raise_if_any()
    return VendorResult(
        status="completed",
        transcript=Transcript(segments=segments, granularity=granularity),  # type: ignore[arg-type]
        vendor_job_id=job_name or None,
    )


def _time(value: Any) -> float:
    """AWS's string seconds ("4.87") as a float; ValueError when it is not one."""
    if type(value) is str:
        if not value or not (value[0].isdigit() and value[-1].isdigit()) or "_" in value:
            raise ValueError(value)
        seconds = float(value)
    elif type(value) in NUMBER_TYPES:
        seconds = float(value)
    else:
        raise ValueError(value)
    if not 0 <= seconds <= MAX_SECONDS:  # NaN fails this too
        raise ValueError(value)
    return seconds


def _channel(label: Any) -> int | None:
    """`ch_0` → 0 (already 0-based); None when it is not such a label."""
    if type(label) is not str:
        return None
    match = _CHANNEL_LABEL.fullmatch(label)
    if match is None or int(match.group(1)) > MAX_CHANNEL:
        return None
    return int(match.group(1))


def _words(results: dict[str, Any], forced_channel: int | None, errors: PayloadErrors) -> list[Segment]:
    """One word-level segment per pronunciation and punctuation item, from wherever they are labelled."""
    items = results.get("items")
    if type(items) is not list:
        errors.add(("results", "items"), "Missing data for required field." if items is None else "Not a valid list.")
        return []
    if forced_channel is None:
        first = next((item for item in items if type(item) is dict and item.get("type") == "pronunciation"), None)
        labelled = first is not None and ("speaker_label" in first or "channel_label" in first)
        channel_labels = results.get("channel_labels")
        if not labelled and type(channel_labels) is dict and "channels" in channel_labels:
            return _channel_label_words(channel_labels, errors)
        speaker_labels = results.get("speaker_labels")
        if not labelled and type(speaker_labels) is dict and "segments" in speaker_labels:
            speakers = _speakers_by_start(speaker_labels, errors)
            return _item_words(items, ("results", "items"), None, None, speakers, errors)
    return _item_words(items, ("results", "items"), forced_channel, None, None, errors)


def _item_words(
    items: list[Any],
    path: FieldPath,
    forced_channel: int | None,
    default_channel: int | None,
    speakers: dict[str, str] | None,
    errors: PayloadErrors,
) -> list[Segment]:
    segments: list[Segment] = []
    append = segments.append
    make = new_segment
    last: Segment | None = None
    to_float = float
    max_seconds = MAX_SECONDS
    labelled = forced_channel is None
    channel: int | None = forced_channel if forced_channel is not None else default_channel
    previous_label: Any = None  # labels come in runs: resolve one only when it changes
    speaker: Any = None
    for index, item in enumerate(items):
        try:
            kind = item["type"]
            text = item["alternatives"][0]["content"]
            if type(text) is not str:
                raise TypeError
            if kind == "pronunciation":
                raw_start = item["start_time"]
                raw_end = item["end_time"]
                start = to_float(raw_start) if type(raw_start) is str else _time(raw_start)
                end = to_float(raw_end) if type(raw_end) is str else _time(raw_end)
                if not 0 <= start <= end <= max_seconds:  # NaN fails this too
                    raise ValueError
                if labelled:
                    label = item.get("channel_label")
                    if label != previous_label:
                        resolved = default_channel if label is None else _channel(label)
                        if resolved is None and label is not None:
                            errors.add((*path, index, "channel_label"), 'Not a valid channel label ("ch_0", "ch_1").')
                            continue
                        channel, previous_label = resolved, label
                    speaker = item.get("speaker_label")
                    if speaker is None and speakers is not None:
                        speaker = speakers.get(raw_start)
                    elif speaker is not None and type(speaker) is not str:
                        errors.add((*path, index, "speaker_label"), "Not a valid string.")
                        continue
                last = make(start, end, text, channel, speaker)
                append(last)
            elif kind == "punctuation" and last is not None:  # glued to the word before, at its end
                append(make(last.end, last.end, text, last.channel, last.speaker, True))
            # other item types may come; they are not words
        except (KeyError, TypeError, IndexError, AttributeError, ValueError):
            _report_item(errors, (*path, index), item)
    return segments


def _channel_label_words(channel_labels: dict[str, Any], errors: PayloadErrors) -> list[Segment]:
    """Older stereo outputs: the labelled words are under `channel_labels.channels[].items`."""
    path: FieldPath = ("results", "channel_labels", "channels")
    channels = channel_labels["channels"]
    if type(channels) is not list:
        errors.add(path, "Not a valid list.")
        return []
    segments: list[Segment] = []
    for position, entry in enumerate(channels):
        if type(entry) is not dict or type(entry.get("items")) is not list:
            errors.add((*path, position, "items"), "Missing data for required field.")
            continue
        channel = _channel(entry.get("channel_label"))
        if channel is None:
            errors.add((*path, position, "channel_label"), 'Not a valid channel label ("ch_0", "ch_1").')
            continue
        segments += _item_words(entry["items"], (*path, position, "items"), None, channel, None, errors)
    return segments


def _speakers_by_start(speaker_labels: dict[str, Any], errors: PayloadErrors) -> dict[str, str]:
    """Older diarized outputs: `speaker_labels.segments[].items[]` label words by their start time."""
    path: FieldPath = ("results", "speaker_labels", "segments")
    speakers: dict[str, str] = {}
    segments = speaker_labels["segments"]
    if type(segments) is not list:
        errors.add(path, "Not a valid list.")
        return speakers
    for position, segment in enumerate(segments):
        words = segment.get("items") if type(segment) is dict else None
        if type(words) is not list:
            errors.add((*path, position, "items"), "Missing data for required field.")
            continue
        for number, word in enumerate(words):
            start = word.get("start_time") if type(word) is dict else None
            speaker = word.get("speaker_label") if type(word) is dict else None
            if type(start) is not str or type(speaker) is not str:
                errors.add((*path, position, "items", number), "Not a valid item: start_time and speaker_label.")
                continue
            speakers[start] = speaker
    return speakers


def _audio_segments(items: list[Any], forced_channel: int | None, errors: PayloadErrors) -> list[Segment] | None:
    """`results.audio_segments` as messages, when each names its speaker or channel (else None: words)."""
    if forced_channel is None and not all(
        type(item) is dict and ("speaker_label" in item or "channel_label" in item) for item in items
    ):
        return None
    segments: list[Segment] = []
    for index, item in enumerate(items):
        path: FieldPath = ("results", "audio_segments", index)
        if type(item) is not dict:
            errors.add(path, "Not a valid object.")
            continue
        text = item.get("transcript")
        if type(text) is not str:
            errors.add(
                (*path, "transcript"), "Missing data for required field." if text is None else "Not a valid string."
            )
            continue
        try:
            start = _time(item.get("start_time"))
        except ValueError:
            errors.add((*path, "start_time"), _TIME)
            continue
        try:
            end = _time(item.get("end_time"))
        except ValueError:
            errors.add((*path, "end_time"), _TIME)
            continue
        if end < start:
            errors.add((*path, "end_time"), "Must not be before start_time.")
            continue
        channel, speaker = forced_channel, None
        if forced_channel is None:
            label = item.get("channel_label")
            if label is not None:
                channel = _channel(label)
                if channel is None:
                    errors.add((*path, "channel_label"), 'Not a valid channel label ("ch_0", "ch_1").')
                    continue
            speaker = item.get("speaker_label")
            if speaker is not None and type(speaker) is not str:
                errors.add((*path, "speaker_label"), "Not a valid string.")
                continue
        segments.append(Segment(start, end, text, channel, speaker))
    return segments


def _report_item(errors: PayloadErrors, path: FieldPath, item: Any) -> None:
    """Every problem of one `items[]` entry (its fast path failed)."""
    if type(item) is not dict:
        errors.add(path, "Not a valid object.")
        return
    found = False
    kind = item.get("type")
    if kind is None:
        errors.add((*path, "type"), "Missing data for required field.")
        found = True
    elif type(kind) is not str:
        errors.add((*path, "type"), "Not a valid string.")
        found = True
    alternatives = item.get("alternatives")
    if type(alternatives) is not list or not alternatives:
        errors.add((*path, "alternatives"), "Must be a non-empty list.")
        found = True
    elif type(alternatives[0]) is not dict:
        errors.add((*path, "alternatives", 0), "Not a valid object.")
        found = True
    elif type(alternatives[0].get("content")) is not str:
        errors.add((*path, "alternatives", 0, "content"), "Not a valid string.")
        found = True
    if kind == "pronunciation":
        times: dict[str, float] = {}
        for key in ("start_time", "end_time"):
            if key not in item:
                errors.add((*path, key), "Missing data for required field.")
                found = True
                continue
            try:
                times[key] = _time(item[key])
            except ValueError:
                errors.add((*path, key), _TIME)
                found = True
        if len(times) == 2 and times["end_time"] < times["start_time"]:
            errors.add((*path, "end_time"), "Must not be before start_time.")
            found = True
    if not found:
        errors.add(path, "Not a valid item.")


# --- the EventBridge event (b) and its SNS envelope (c) -------------------------------------------


def _sns_event(envelope: dict[str, Any]) -> dict[str, Any]:
    """The EventBridge event an SNS Notification carries as its `Message` string."""
    kind = envelope.get("Type")
    if kind != "Notification":
        raise field_error(("Type",), f"Must be Notification (a {kind!r} message carries no event).")
    message = envelope.get("Message")
    if type(message) is not str:
        raise field_error(("Message",), "Not a valid string.")
    try:
        event = json.loads(message)
    except (ValueError, RecursionError):
        raise field_error(("Message",), "Not a JSON EventBridge event.") from None
    if type(event) is not dict:
        raise field_error(("Message",), "Not a JSON EventBridge event.")
    return event


@dataclass(frozen=True, slots=True)
class JobEvent:
    """A Transcribe Job State Change: which job reached which status, where."""

    job_name: str
    status: str
    failure_reason: str | None
    region: str | None


def job_event(event: dict[str, Any]) -> JobEvent:
    """Read a "Transcribe Job State Change" event (ValidationError naming the field)."""
    if event.get("source", EVENT_SOURCE) != EVENT_SOURCE:
        raise field_error(("source",), f"Must be {EVENT_SOURCE}.")
    if event.get("detail-type", EVENT_DETAIL_TYPE) != EVENT_DETAIL_TYPE:
        raise field_error(("detail-type",), f"Must be {EVENT_DETAIL_TYPE}.")
    detail = event.get("detail")
    if type(detail) is not dict:
        raise field_error(("detail",), "Missing data for required field." if detail is None else "Not a valid object.")
    name = detail.get("TranscriptionJobName")
    if type(name) is not str or not 0 < len(name) <= _MAX_JOB_NAME:
        raise field_error(("detail", "TranscriptionJobName"), "Not a valid job name.")
    status = detail.get("TranscriptionJobStatus")
    if status not in ("COMPLETED", "FAILED"):
        raise field_error(("detail", "TranscriptionJobStatus"), "Must be COMPLETED or FAILED.")
    reason = detail.get("FailureReason")
    region = event.get("region")
    if region is not None and (type(region) is not str or not _REGION.fullmatch(region)):
        raise field_error(("region",), "Not a valid AWS region.")
    return JobEvent(name, status, reason if type(reason) is str and reason.strip() else None, region)


def _event_result(event: dict[str, Any]) -> VendorResult:
    job = job_event(event)
    if job.status == "FAILED":
        reason = job.failure_reason or "AWS Transcribe reported the job FAILED without a reason."
        return VendorResult("failed", failure_reason=reason, vendor_job_id=job.job_name)
    return VendorResult("fetch", fetch_id=job.job_name, vendor_job_id=job.job_name)


def _callback_event(body: bytes) -> JobEvent | None:
    """The job event of a stored callback (for its region), if it was one."""
    try:
        decoded = load_json(body)
        if type(decoded) is dict and "Type" in decoded:
            decoded = _sns_event(decoded)
        return job_event(decoded) if type(decoded) is dict else None
    except ValidationError:
        return None


# --- the fetch: GetTranscriptionJob, then the transcript file ----------------------------------------


def fetch(context: FetchContext) -> VendorResult:
    """GetTranscriptionJob for the event's job; its tags must agree with the URL; then its file."""
    import boto3  # type: ignore[import-untyped]  # imported here: only the worker's fetch needs it
    from botocore.config import Config  # type: ignore[import-untyped]
    from botocore.exceptions import (  # type: ignore[import-untyped]
        BotoCoreError,
        ClientError,
        NoCredentialsError,
    )

    settings = context.settings
    event = _callback_event(context.callback_body)
    region = settings.vendor_setting(NAME, "REGION") or (event.region if event else None)
    if not region:
        raise FetchError("no AWS region: set B24SCRIBE_AWS_REGION (the event named none)", retry=False)
    endpoint = context.api_url or None
    config = Config(
        connect_timeout=context.timeout,
        read_timeout=context.timeout,
        retries={"max_attempts": 1, "mode": "standard"},  # the outbox retries, on its schedule
        s3={"addressing_style": "path"},
    )
    session = boto3.session.Session(region_name=region)
    try:
        transcribe = session.client("transcribe", endpoint_url=endpoint, config=config)
        answer = transcribe.get_transcription_job(TranscriptionJobName=context.fetch_id)
    except NoCredentialsError:
        raise FetchError("no AWS credentials (environment, profile or role)", retry=False) from None
    except ClientError as error:
        raise _client_failure(error, "GetTranscriptionJob") from None
    except BotoCoreError as error:
        raise FetchError(f"aws GetTranscriptionJob unreachable: {type(error).__name__}", retry=True) from None
    job = answer.get("TranscriptionJob") or {}
    name = job.get("TranscriptionJobName") or context.fetch_id
    tags = {tag.get("Key"): tag.get("Value") for tag in job.get("Tags") or [] if isinstance(tag, dict)}
    reference = reference_from_metadata(tags)
    _check_reference(reference, context.callback_query)
    status = job.get("TranscriptionJobStatus")
    if status == "FAILED":
        reason = job.get("FailureReason") or "AWS Transcribe reported the job FAILED without a reason."
        return VendorResult("failed", failure_reason=str(reason), vendor_job_id=name, reference=reference)
    if status != "COMPLETED":
        raise FetchError(f"aws transcription job is {status}", retry=True)
    uri = (job.get("Transcript") or {}).get("TranscriptFileUri")
    if not isinstance(uri, str) or not uri:
        raise FetchError("aws transcription job names no TranscriptFileUri", retry=False)
    raw = _download(context, uri, session, endpoint, config)
    result = parse_output(load_json_object(raw), channel_from_query(context.callback_query))
    result.vendor_job_id = result.vendor_job_id or name
    result.reference = reference
    return result


def _check_reference(tags: CallReference, query: Mapping[str, str]) -> None:
    """The URL and the job's tags must not name two calls (contract §11)."""
    url = CallReference(query.get("pbx") or None, query.get("call") or None, query.get("b24_call_id") or None)
    for attribute, name in (("pbx", "pbx"), ("pbx_call_id", "call"), ("b24_call_id", "b24_call_id")):
        from_url, from_tags = getattr(url, attribute), getattr(tags, attribute)
        if from_url and from_tags and from_url != from_tags:
            raise FetchError(f"the URL's {name} is not the one the job's tags name", retry=False)


def _client_failure(error: Any, what: str) -> FetchError:
    details = error.response.get("Error", {}) if isinstance(getattr(error, "response", None), dict) else {}
    code = str(details.get("Code") or "error")
    status = (error.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0
    retry = status >= 500 or status == 429 or code in ("ThrottlingException", "LimitExceededException", "SlowDown")
    return FetchError(f"aws {what} answered {code} (HTTP {status})", retry=retry)


def _allowed_download_host(host: str, endpoint: str | None) -> bool:
    if endpoint and urlsplit(endpoint).netloc.lower() == host:
        return True
    return bool(_AWS_HOST.fullmatch(host.split(":")[0]))


def _download(context: FetchContext, uri: str, session: Any, endpoint: str | None, config: Any) -> bytes:
    """The transcript file: a presigned URL with a plain GET, else an S3 object with the credentials."""
    from botocore.exceptions import BotoCoreError, ClientError

    parts = urlsplit(uri)
    host = parts.netloc.lower()
    if parts.scheme == "s3":
        bucket, key = host, parts.path.lstrip("/")
    else:
        configured = endpoint is not None and urlsplit(endpoint).netloc.lower() == host
        if not _allowed_download_host(host, endpoint) or (parts.scheme != "https" and not configured):
            raise FetchError("aws TranscriptFileUri is not on an AWS host: not downloaded", retry=False)
        if "X-Amz-Signature=" in parts.query or "Signature=" in parts.query:  # presigned
            return bytes(context.get(uri, what="transcript file").content)
        bucket, key = _bucket_and_key(host, parts.path, configured)
    try:
        s3 = session.client("s3", endpoint_url=endpoint, config=config)
        body = s3.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()
    except ClientError as error:
        raise _client_failure(error, "S3 GetObject") from None
    except BotoCoreError as error:
        raise FetchError(f"aws S3 GetObject unreachable: {type(error).__name__}", retry=True) from None


def _bucket_and_key(host: str, path: str, path_style: bool) -> tuple[str, str]:
    """`https://s3.<region>.amazonaws.com/<bucket>/<key>` or `https://<bucket>.s3.<region>…/<key>`."""
    path = unquote(path)
    if path_style or host.startswith("s3.") or host.startswith("s3-"):
        bucket, _, key = path.lstrip("/").partition("/")
    else:
        bucket, key = host.split(".s3", 1)[0], path.lstrip("/")
    if not bucket or not key:
        raise FetchError("aws TranscriptFileUri names no S3 bucket and key", retry=False)
    return bucket, key


# --- SNS: the signature and the subscription confirmation --------------------------------------------

_NOTIFICATION_FIELDS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
_SUBSCRIPTION_FIELDS = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")
_CERTIFICATES: dict[str, Any] = {}  # SigningCertURL -> public key (SNS rotates by URL)
_CERTIFICATES_LOCK = threading.Lock()
_MAX_CERTIFICATES = 16


def string_to_sign(message: Mapping[str, Any]) -> bytes:
    """The bytes SNS signs: `Name\\nvalue\\n` for its fields, in order (Subject only when present)."""
    names = _NOTIFICATION_FIELDS if message.get("Type") == "Notification" else _SUBSCRIPTION_FIELDS
    text = "".join(f"{name}\n{message[name]}\n" for name in names if message.get(name) is not None)
    return text.encode("utf-8")


def _test_hosts(settings: Settings) -> set[str]:
    """B24SCRIBE_AWS_SNS_TEST_HOSTS: FOR TESTS ONLY, hosts a fake serves certificates and confirmations on."""
    raw = settings.vendor_setting(NAME, "SNS_TEST_HOSTS") or ""
    return {host.strip().lower() for host in raw.split(",") if host.strip()}


def _topics(settings: Settings) -> set[str]:
    raw = settings.vendor_setting(NAME, "SNS_TOPIC_ARNS") or ""
    return {arn.strip() for arn in raw.split(",") if arn.strip()}


def _topic_region(topic_arn: str) -> str | None:
    parts = topic_arn.split(":")
    return parts[3] if len(parts) >= 6 and parts[2] == "sns" and _REGION.fullmatch(parts[3]) else None


def certificate_url_allowed(url: str, settings: Settings) -> bool:
    """Only `https://sns.<region>.amazonaws.com/….pem` (or a test host)."""
    parts = urlsplit(url)
    host = parts.netloc.lower()
    if host in _test_hosts(settings):
        return parts.scheme in ("http", "https")
    return parts.scheme == "https" and bool(_SNS_HOST.fullmatch(host)) and parts.path.endswith(".pem")


def _public_key(url: str, settings: Settings) -> Any:
    import requests
    from cryptography import x509

    with _CERTIFICATES_LOCK:
        cached = _CERTIFICATES.get(url)
    if cached is not None:
        certificate = cached
    else:
        try:
            answer = requests.get(url, timeout=min(10.0, settings.vendor_timeout_seconds), allow_redirects=False)
        except requests.RequestException:
            raise AuthFailure(
                503, "sns_certificate_unavailable", "the SNS signing certificate could not be fetched"
            ) from None
        if answer.status_code != 200:
            raise AuthFailure(503, "sns_certificate_unavailable", "the SNS signing certificate could not be fetched")
        try:
            certificate = x509.load_pem_x509_certificate(answer.content)
        except ValueError:
            raise AuthFailure(401, "bad_signature", "SigningCertURL is not a PEM certificate") from None
        with _CERTIFICATES_LOCK:
            if len(_CERTIFICATES) >= _MAX_CERTIFICATES:
                _CERTIFICATES.pop(next(iter(_CERTIFICATES)))
            _CERTIFICATES[url] = certificate
    now = datetime.now(certificate.not_valid_after_utc.tzinfo)
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise AuthFailure(401, "bad_signature", "the SNS signing certificate is not valid now")
    return certificate.public_key()


def _sns_timestamp(value: Any) -> float | None:
    if type(value) is not str:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class SnsSignature:
    """SNS's RSA signature over its message fields (SignatureVersion 1: SHA1, 2: SHA256), for the
    topics in B24SCRIBE_AWS_SNS_TOPIC_ARNS."""

    name = "sns-signature"
    signature_header = "x-amz-sns-message-type"
    description = (
        "Amazon SNS message signature (in the body: Signature, SigningCertURL from sns.<region>.amazonaws.com), "
        "for the topics in B24SCRIBE_AWS_SNS_TOPIC_ARNS"
    )

    def configured(self, settings: Settings, source: str) -> bool:
        return bool(_topics(settings))

    def present(self, request: HookRequest) -> bool:
        return request.header(SNS_TYPE_HEADER) is not None

    def before_body(self, request: HookRequest, settings: Settings, source: str) -> None:
        if request.header(SNS_TYPE_HEADER) not in SNS_MESSAGE_TYPES:
            raise AuthFailure(401, "bad_signature", "x-amz-sns-message-type is not an SNS message type")
        arn = request.header("x-amz-sns-topic-arn")
        if arn is not None and arn not in _topics(settings):
            raise AuthFailure(401, "bad_signature", "the SNS topic is not in B24SCRIBE_AWS_SNS_TOPIC_ARNS")

    def verify(self, request: HookRequest, body: bytes, settings: Settings, source: str) -> Authenticated:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, rsa

        def refused(why: str) -> AuthFailure:
            return AuthFailure(401, "bad_signature", f"SNS signature rejected: {why}")

        try:
            message = json.loads(body)
        except (ValueError, RecursionError):
            raise refused("the body is not an SNS message") from None
        if type(message) is not dict:
            raise refused("the body is not an SNS message")
        kind = message.get("Type")
        if kind not in SNS_MESSAGE_TYPES or kind != request.header(SNS_TYPE_HEADER):
            raise refused("Type does not match x-amz-sns-message-type")
        names = _NOTIFICATION_FIELDS if kind == "Notification" else _SUBSCRIPTION_FIELDS
        for name in names:
            value = message.get(name)
            if (value is None and name != "Subject") or (value is not None and type(value) is not str):
                raise refused(f"{name} is missing")
        if message["TopicArn"] not in _topics(settings):
            raise refused("the topic is not in B24SCRIBE_AWS_SNS_TOPIC_ARNS")
        published = _sns_timestamp(message.get("Timestamp"))
        if published is None or abs(time.time() - published) > SNS_TOLERANCE_SECONDS:
            raise refused("Timestamp is not within the hour SNS retries for")
        version = message.get("SignatureVersion")
        algorithm: hashes.HashAlgorithm
        if version == "1":
            algorithm = hashes.SHA1()  # noqa: S303  # SNS's SignatureVersion 1 is SHA1withRSA
        elif version == "2":
            algorithm = hashes.SHA256()
        else:
            raise refused("SignatureVersion must be 1 or 2")
        url = message.get("SigningCertURL")
        if type(url) is not str or not certificate_url_allowed(url, settings):
            raise refused("SigningCertURL is not an sns.<region>.amazonaws.com certificate")
        try:
            signature = base64.b64decode(str(message.get("Signature") or ""), validate=True)
        except (binascii.Error, ValueError):
            raise refused("Signature is not base64") from None
        key = _public_key(url, settings)
        if not isinstance(key, rsa.RSAPublicKey):
            raise refused("the certificate holds no RSA key")
        try:
            key.verify(signature, string_to_sign(message), padding.PKCS1v15(), algorithm)
        except InvalidSignature:
            raise refused("the signature does not match") from None
        # no delivery id: the job name de-duplicates better (EventBridge may publish a job's event
        # twice, as two SNS messages; the direct and the SNS way may both be set up)
        return Authenticated(self.name)


SNS_SIGNATURE = SnsSignature()


def subscribe_url_allowed(url: str, topic_arn: str, settings: Settings) -> bool:
    """Only `https://sns.<the topic's region>.amazonaws.com/` (or a test host)."""
    parts = urlsplit(url)
    host = parts.netloc.lower()
    if host in _test_hosts(settings):
        return parts.scheme in ("http", "https")
    region = _topic_region(topic_arn)
    return parts.scheme == "https" and region is not None and host == f"sns.{region}.amazonaws.com"


def _error(status: int, code: str, message: str) -> HookAnswer:
    body = json.dumps({"error": {"code": code, "message": message, "fields": {}}}).encode()
    return HookAnswer(status, body, "application/json")


def answer(request: HookRequest, body: bytes, settings: Settings) -> HookAnswer | None:
    """An SNS SubscriptionConfirmation is confirmed (its SubscribeURL followed), an
    UnsubscribeConfirmation acknowledged; neither is stored. Everything else is an event."""
    import requests

    kind = request.header(SNS_TYPE_HEADER)
    if kind not in ("SubscriptionConfirmation", "UnsubscribeConfirmation"):
        return None
    if kind == "UnsubscribeConfirmation":
        return HookAnswer(200, b"unsubscribed\n")
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):
        message = None
    if type(message) is not dict or type(message.get("SubscribeURL")) is not str:
        return _error(422, "invalid_payload", "a SubscriptionConfirmation needs its SubscribeURL")
    url, topic = message["SubscribeURL"], str(message.get("TopicArn") or "")
    if not subscribe_url_allowed(url, topic, settings):
        return _error(422, "invalid_payload", "SubscribeURL is not on sns.<the topic's region>.amazonaws.com")
    try:
        confirmed = requests.get(url, timeout=min(10.0, settings.vendor_timeout_seconds), allow_redirects=False)
    except requests.RequestException:
        confirmed = None
    if confirmed is None or confirmed.status_code != 200:
        return _error(502, "subscription_not_confirmed", "SNS did not confirm the subscription; send it again")
    return HookAnswer(200, b"subscription confirmed\n")


VENDOR = SttVendor(
    name=NAME,
    parse=parse,
    fetch=FetchSpec(default_api_url="", run=fetch, needs_api_key=False),
    fetch_names_call=True,  # the job's own metadata may name the call (contract §11)
    signatures=(SNS_SIGNATURE,),
    answer=answer,
    summary="AWS Transcribe: the output JSON, or the EventBridge job event (direct or via signed SNS), fetched",
)
