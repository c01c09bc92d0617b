"""Azure AI Speech batch transcription web hooks (`POST /hooks/stt/azure`).

Accepted bodies (contract §11):
- the web hook body: the transcription entity (`self`, `links.files`, `properties`, `customProperties`,
  `status`), as API v3.x sends it, or only its reference (`self`, `invocationId`), as API 2024-11-15
  may. `Succeeded` (or no status) becomes a fetch; `Failed` is a failed job whose reason is
  `properties.error.message` (else its `code`).
- the result file as is (`recognizedPhrases`, …), e.g. posted by a script that downloaded it.

The fetch (worker): the entity's `links.files` (or, for a bare reference, `self` first) is fetched
only from the configured API host (B24SCRIBE_AZURE_API_URL, else https://<B24SCRIBE_AZURE_REGION>.api.
cognitive.microsoft.com) with `Ocp-Apim-Subscription-Key: <B24SCRIBE_AZURE_API_KEY>`; the first file of
`kind: Transcription` is downloaded from its `links.contentUrl` (a SAS URL on Azure blob storage, or
on the API host) WITHOUT the key.

The result file: every `recognizedPhrases[]` item whose `recognitionStatus` is `Success` becomes one
segment, text `nBest[0].display`, times `offsetInTicks`/`durationInTicks` (1 tick = 100 ns; else the
ISO 8601 `offset`/`duration`, `"PT1.32S"`). Who speaks: `channel` is 0-based (channels 0 and 1 are
transcribed by default) and two channels heard make a stereo call; `speaker` (diarization, mono only)
is 1-based and becomes the label "1", "2", … for B24SCRIBE_FIRST_SPEAKER; one channel without speakers
is a mono transcript that cannot be attributed (contract §6.3) unless the URL says `?channel=0|1`.

Job id: the transcription id (the last segment of `self`): a redelivery is a duplicate. Call
reference: `customProperties` with the keys of contract §11 (`b24scribe_b24_call_id`, or
`b24scribe_pbx` + `b24scribe_call`); one web hook serves a whole Speech resource, so the URL rarely
can. Authentication: `X-MicrosoftSpeechServices-Signature` = base64(HMAC-SHA256(secret, raw body)),
keyed with B24SCRIBE_AZURE_WEBHOOK_SECRET (the web hook's `properties.secret`); for the registration
challenge Azure signs the `validationToken` instead. The challenge (`?validationToken=…`,
`X-MicrosoftSpeechServices-Event: challenge`) is answered with the token as text/plain, a `ping`
with 200, other events than `TranscriptionCompletion` with 200 too; nothing of them is stored.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from marshmallow import ValidationError

from b24scribe.inbound_auth import Authenticated, AuthFailure, HookRequest
from b24scribe.limits import MAX_CHANNEL
from b24scribe.messages import check_attributable
from b24scribe.settings import Settings
from b24scribe.sources import FetchContext, FetchError, FetchSpec, HookAnswer, SttVendor
from b24scribe.transcript import CallReference, Segment, Transcript, VendorResult
from schemas._vendor_payload import (
    MAX_SECONDS,
    MISSING,
    NUMBER_TYPES,
    FieldPath,
    PayloadErrors,
    channel_from_query,
    field_error,
    load_json_object,
    new_segment,
    reference_from_metadata,
)

SIGNATURE_HEADER = "X-MicrosoftSpeechServices-Signature"
EVENT_HEADER = "X-MicrosoftSpeechServices-Event"
KEY_HEADER = "Ocp-Apim-Subscription-Key"
COMPLETION_EVENT = "transcriptioncompletion"
TICKS_PER_SECOND = 10_000_000
MAX_TICKS = MAX_SECONDS * TICKS_PER_SECOND
MAX_SPEAKER = 999  # Azure numbers a few speakers from 1; larger numbers are garbage
MAX_TOKEN_LENGTH = 1024  # the challenge's validationToken echoed back (a GUID in practice)
MAX_FILE_PAGES = 20  # `@nextLink` pages of the files list followed at most
DEFAULT_API_URL = "https://<region>.api.cognitive.microsoft.com"  # placeholder: set API_URL or REGION
# Where Azure stores result files (Microsoft-managed or the customer's own storage account).
STORAGE_HOST_SUFFIXES = (".blob.core.windows.net", ".blob.core.chinacloudapi.cn", ".blob.core.usgovcloudapi.net")
_REGION = re.compile(r"[a-z0-9]{2,40}")
# ISO 8601 durations as Azure writes them: "PT0.76S", "PT1M2.5S", "PT1H0M3S", "P1DT2H".
_ISO_DURATION = re.compile(
    r"P(?:([0-9]{1,3})D)?(?:T(?:([0-9]{1,6})H)?(?:([0-9]{1,8})M)?(?:([0-9]{1,9}(?:\.[0-9]{1,9})?)S)?)?"
)
_ISO_MESSAGE = 'Not a valid ISO 8601 duration like "PT1.32S".'
_TICKS_MESSAGE = f"Must be a number of ticks (100 ns) from 0 to {MAX_TICKS:g}."
_FAILED_WITHOUT_REASON = "Azure reported a failed transcription without a message."
_NOT_A_BODY = (
    "Missing data for required field: the body must be a transcription entity (self, links.files, status) "
    "or a transcription result file (recognizedPhrases)."
)


# --- the signature ------------------------------------------------------------------------------


def sign(secret: str, payload: bytes) -> str:
    """The header value Azure sends: base64 of HMAC-SHA256(secret, payload)."""
    return base64.b64encode(hmac.new(secret.encode("utf-8"), payload, hashlib.sha256).digest()).decode("ascii")


def _event(request: HookRequest) -> str:
    return (request.header(EVENT_HEADER) or "").strip().lower()


def _challenge_token(request: HookRequest) -> str | None:
    """The validationToken of a registration challenge (the query carries it; the event header, when
    sent, says `challenge`)."""
    token = request.query.get("validationToken")
    if not token or _event(request) not in ("", "challenge"):
        return None
    return token


class AzureSignature:
    """`X-MicrosoftSpeechServices-Signature`: base64(HMAC-SHA256(web hook secret, raw body)), as
    Microsoft's web hook receiver sample checks it; the challenge is signed over its validationToken.

    There is no timestamp in it: a replayed delivery is a duplicate of its transcription id (contract
    §5), and a signature made with a rotated-out secret or over other bytes does not verify.
    """

    name = "azure-signature"
    signature_header = SIGNATURE_HEADER
    description = (
        "Azure Speech web hook HMAC: base64 of HMAC-SHA256 of the raw body (of the validationToken for the "
        "registration challenge) made with B24SCRIBE_AZURE_WEBHOOK_SECRET"
    )

    def configured(self, settings: Settings, source: str) -> bool:
        return bool(settings.vendor_setting(source, "WEBHOOK_SECRET"))

    def present(self, request: HookRequest) -> bool:
        return request.header(SIGNATURE_HEADER) is not None

    def before_body(self, request: HookRequest, settings: Settings, source: str) -> None:
        _given(request)  # not base64 of 32 bytes: refused before the body is read

    def verify(self, request: HookRequest, body: bytes, settings: Settings, source: str) -> Authenticated:
        secret = settings.vendor_setting(source, "WEBHOOK_SECRET")
        if not secret:
            raise AuthFailure(401, "unauthenticated", f"the request carries no {SIGNATURE_HEADER}")
        given = _given(request)
        token = _challenge_token(request) if _event(request) == "challenge" else None
        signed = token.encode("utf-8", "surrogatepass") if token is not None else body
        expected = hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).digest()
        if not hmac.compare_digest(given, expected):
            raise AuthFailure(401, "bad_signature", f"{SIGNATURE_HEADER} does not match the body")
        return Authenticated(self.name)


def _given(request: HookRequest) -> bytes:
    value = (request.header(SIGNATURE_HEADER) or "").strip()
    try:
        digest = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        digest = b""
    if len(digest) != hashlib.sha256().digest_size:
        raise AuthFailure(401, "bad_signature", f"{SIGNATURE_HEADER} is not a base64 HMAC-SHA256")
    return digest


SIGNATURE = AzureSignature()


def answer(request: HookRequest, body: bytes, settings: Settings) -> HookAnswer | None:
    """The registration challenge (the token back, as text), a ping, and events that carry no result."""
    token = _challenge_token(request)
    if token is not None:
        if len(token) > MAX_TOKEN_LENGTH or not token.isprintable():
            return HookAnswer(400, b"validationToken is not a printable token of at most 1024 characters\n")
        return HookAnswer(200, token.encode("utf-8", "surrogatepass"))
    event = _event(request)
    if event == "ping":
        return HookAnswer(200)
    if event and event != COMPLETION_EVENT:  # creation, processing, deletion, datasets, models…
        return HookAnswer(200, b"nothing to do: only TranscriptionCompletion carries a result\n")
    return None


# --- the callback -------------------------------------------------------------------------------


def parse(raw_body: bytes, query: Mapping[str, str]) -> VendorResult:
    """The web hook body (transcription entity or its reference), or a result file posted as is."""
    body = load_json_object(raw_body)
    if "recognizedPhrases" in body or "combinedRecognizedPhrases" in body:
        return parse_result(body, query)
    channel_from_query(query)  # a bad ?channel= is refused now, not after the fetch
    if "self" not in body:
        raise field_error(("self",), _NOT_A_BODY)
    job_id = _transcription_id(body.get("self"), ("self",))
    reference = _reference(body.get("customProperties"))
    status = body.get("status")
    if status == "Failed":
        return VendorResult("failed", failure_reason=_failure_reason(body), vendor_job_id=job_id, reference=reference)
    if status is not None and status != "Succeeded":
        message = (
            f"Must be Succeeded or Failed: the transcription is {status}."
            if type(status) is str
            else "Not a valid string."
        )
        raise field_error(("status",), message)
    links = body.get("links")
    if links is not None:
        if type(links) is not dict:
            raise field_error(("links",), "Not a valid object.")
        files = links.get("files")
        if files is not None and (type(files) is not str or not files.startswith(("https://", "http://"))):
            raise field_error(("links", "files"), "Not a valid URL.")
    return VendorResult("fetch", fetch_id=job_id, vendor_job_id=job_id, reference=reference)


def _transcription_id(value: Any, path: FieldPath) -> str:
    """The transcription id: the last path segment of `self`, `…/transcriptions/<id>`."""
    if type(value) is not str:
        raise field_error(path, MISSING if value is None else "Not a valid string.")
    try:
        segments = urlsplit(value).path.rstrip("/").split("/")
    except ValueError:
        segments = []
    if len(segments) < 2 or segments[-2] != "transcriptions" or not segments[-1]:
        raise field_error(path, "Not a transcription: expected a URL ending in /transcriptions/<id>.")
    return segments[-1]


def _reference(custom_properties: Any) -> CallReference:
    if custom_properties is not None and type(custom_properties) is not dict:
        raise field_error(("customProperties",), "Not a valid object.")
    return reference_from_metadata(custom_properties)


def _failure_reason(entity: dict[str, Any]) -> str:
    """`properties.error.message`, else its `code`, else a plain sentence."""
    properties = entity.get("properties")
    error = properties.get("error") if type(properties) is dict else None
    if type(error) is dict:
        message, code = error.get("message"), error.get("code")
        if type(message) is str and message.strip():
            return message.strip()
        if type(code) is str and code.strip():
            return f"Azure reported error code {code.strip()}."
    return _FAILED_WITHOUT_REASON


# --- the fetch ----------------------------------------------------------------------------------


def fetch(context: FetchContext) -> VendorResult:
    """The entity (when the callback held only its reference), its files list, then the result file."""
    base = _api_base(context)
    headers = {KEY_HEADER: context.api_key or "", "Accept": "application/json"}
    try:
        entity = load_json_object(context.callback_body)
    except ValidationError:
        raise FetchError("azure callback body is no longer readable", retry=False) from None
    links = entity.get("links")
    if entity.get("status") is None or type(links) is not dict or not links.get("files"):
        entity = _json(context.get(_on_api_host(str(entity.get("self")), base, "self"), headers, "transcription"))
    job_id = context.fetch_id
    reference = reference_from_metadata(entity.get("customProperties"))
    status = entity.get("status")
    if status == "Failed":
        return VendorResult("failed", failure_reason=_failure_reason(entity), vendor_job_id=job_id, reference=reference)
    if status != "Succeeded":
        raise FetchError(f"azure transcription {job_id} is {str(status)[:40]}, not Succeeded yet", retry=True)
    links = entity.get("links")
    files_url = links.get("files") if type(links) is dict else None
    if type(files_url) is not str:
        raise FetchError(f"azure transcription {job_id} has no links.files", retry=False)
    content_url = _transcription_file(context, _on_api_host(files_url, base, "links.files"), headers, base)
    result_file = context.get(content_url, {}, what="result file")  # a SAS URL: never the key
    result = parse_result(load_json_object(result_file.content), context.callback_query, job_id, reference)
    if result.transcript is not None:
        check_attributable(result.transcript)  # dead now with the reason, not at the attach
    return result


def _api_base(context: FetchContext) -> str:
    """The configured API base: B24SCRIBE_AZURE_API_URL, else the region's host."""
    if context.settings.vendor_setting(context.vendor, "API_URL"):
        return context.api_url
    region = (context.settings.vendor_setting(context.vendor, "REGION") or "").strip().lower()
    if _REGION.fullmatch(region):
        return f"https://{region}.api.cognitive.microsoft.com"
    raise FetchError(
        "B24SCRIBE_AZURE_API_URL (https://<region>.api.cognitive.microsoft.com) or B24SCRIBE_AZURE_REGION is not set",
        retry=False,
    )


def _on_api_host(url: str, base: str, what: str) -> str:
    """`url` when it is on the configured API host (scheme, host, port and path prefix), else refused."""
    allowed = urlsplit(base)
    try:
        given = urlsplit(url)
        same = (
            given.scheme.lower() == allowed.scheme.lower()
            and given.netloc.lower() == allowed.netloc.lower()
            and given.path.startswith(allowed.path.rstrip("/") + "/")
        )
    except ValueError:
        same = False
    if not same:
        raise FetchError(f"azure {what} is not on the configured API host {allowed_origin(base)}", retry=False)
    return url


def allowed_origin(base: str) -> str:
    parts = urlsplit(base)
    return f"{parts.scheme}://{parts.netloc}"


def _on_storage(url: str, base: str) -> str:
    """A result file's `contentUrl`: https on Azure blob storage, or on the configured API host."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        on_storage = parts.scheme == "https" and host.endswith(STORAGE_HOST_SUFFIXES) and "@" not in parts.netloc
        on_api = allowed_origin(url).lower() == allowed_origin(base).lower()
    except ValueError:
        on_storage = on_api = False
    if not (on_storage or on_api):
        raise FetchError("azure contentUrl is neither on Azure blob storage nor on the API host", retry=False)
    return url


def _transcription_file(context: FetchContext, url: str, headers: dict[str, str], base: str) -> str:
    """The `contentUrl` of the first `kind: Transcription` file, following `@nextLink` pages."""
    for _ in range(MAX_FILE_PAGES):
        page = _json(context.get(url, headers, "files"))
        values = page.get("values")
        if type(values) is not list:
            raise FetchError("azure files list has no values", retry=False)
        for file in values:
            if type(file) is dict and file.get("kind") == "Transcription":
                links = file.get("links")
                content_url = links.get("contentUrl") if type(links) is dict else None
                if type(content_url) is not str:
                    raise FetchError("azure Transcription file has no links.contentUrl", retry=False)
                return _on_storage(content_url, base)
        next_link = page.get("@nextLink")
        if type(next_link) is not str or not next_link:
            break
        url = _on_api_host(next_link, base, "@nextLink")
    raise FetchError("azure transcription has no file of kind Transcription", retry=False)


def _json(answer: Any) -> dict[str, Any]:
    try:
        document = json.loads(answer.content)
    except ValueError:
        document = None
    if type(document) is not dict:
        raise FetchError("azure API answered something that is not a JSON object", retry=False)
    return document


# --- the result file ----------------------------------------------------------------------------


def parse_result(
    body: dict[str, Any],
    query: Mapping[str, str],
    job_id: str | None = None,
    reference: CallReference | None = None,
) -> VendorResult:
    """A transcription result file: one segment per recognized phrase."""
    forced_channel = channel_from_query(query)
    phrases = body.get("recognizedPhrases")
    if type(phrases) is not list:
        raise field_error(("recognizedPhrases",), MISSING if phrases is None else "Not a valid list.")
    errors = PayloadErrors()
    channels = _combined_channels(body.get("combinedRecognizedPhrases"), errors)
    segments, speakers = _segments(phrases, channels, errors)
    errors.raise_if_any()
    if forced_channel is not None:  # the file held that one channel of the call
        segments = [_with_channel(segment, forced_channel) for segment in segments]
    elif len(channels) < 2 or speakers:  # a mono file: its speakers (if any) decide
        segments = [_with_channel(segment, None) for segment in segments]
    return VendorResult(
        "completed",
        Transcript(segments=segments),
        vendor_job_id=job_id,
        reference=reference or CallReference(),
    )


def _with_channel(segment: Segment, channel: int | None) -> Segment:
    return new_segment(segment.start, segment.end, segment.text, channel, segment.speaker)


def _combined_channels(combined: Any, errors: PayloadErrors) -> set[int]:
    """The channels the file was transcribed for (one combined phrase each)."""
    channels: set[int] = set()
    if combined is None:
        return channels
    if type(combined) is not list:
        errors.add(("combinedRecognizedPhrases",), "Not a valid list.")
        return channels
    for index, item in enumerate(combined):
        channel = item.get("channel", 0) if type(item) is dict else None
        if type(channel) is int and 0 <= channel <= MAX_CHANNEL:
            channels.add(channel)
        else:
            errors.add(("combinedRecognizedPhrases", index, "channel"), f"Must be an integer from 0 to {MAX_CHANNEL}.")
    return channels


def _segments(phrases: list[Any], channels: set[int], errors: PayloadErrors) -> tuple[list[Segment], bool]:
    """One segment per successful phrase; whether any phrase named a speaker. `channels` gains
    every channel a phrase was heard on."""
    segments: list[Segment] = []
    append = segments.append
    make, numbers, max_ticks, max_channel = new_segment, NUMBER_TYPES, MAX_TICKS, MAX_CHANNEL
    speakers = False
    labels: dict[int, str] = {}
    for index, item in enumerate(phrases):
        try:
            status = item.get("recognitionStatus", "Success")
            if status != "Success":  # NoMatch, InitialSilenceTimeout, BabbleTimeout, Error: no text
                if type(status) is not str:
                    errors.add(("recognizedPhrases", index, "recognitionStatus"), "Not a valid string.")
                continue
            best = item["nBest"]
            if type(best) is list and not best:
                continue
            text = best[0]["display"]
            offset = item.get("offsetInTicks")
            duration = item.get("durationInTicks")
            channel = item.get("channel", 0)
            speaker = item.get("speaker")
            valid = (
                type(text) is str
                and type(channel) is int
                and 0 <= channel <= max_channel
                and (speaker is None or (type(speaker) is int and 1 <= speaker <= MAX_SPEAKER))
            )
            if valid and type(offset) in numbers and type(duration) in numbers and offset >= 0 and duration >= 0:
                end = offset + duration
                valid = end <= max_ticks
                start, end = offset / TICKS_PER_SECOND, end / TICKS_PER_SECOND
            elif valid:
                start, end, valid = _iso_times(item)
        except (KeyError, TypeError, IndexError, AttributeError):
            valid = False
        if not valid:
            _report_phrase(errors, ("recognizedPhrases", index), item)
            continue
        channels.add(channel)
        label = None
        if speaker is not None:
            speakers = True
            label = labels.get(speaker)
            if label is None:
                label = labels[speaker] = str(speaker)
        append(make(start, end, text, channel, label))
    return segments, speakers


def _iso_times(item: dict[str, Any]) -> tuple[float, float, bool]:
    """Times from the ISO 8601 `offset`/`duration` when the tick fields are absent."""
    if item.get("offsetInTicks") is not None or item.get("durationInTicks") is not None:
        return 0.0, 0.0, False  # present but not valid numbers
    start, start_problem = iso_seconds(item.get("offset"))
    duration, duration_problem = iso_seconds(item.get("duration"))
    if start_problem or duration_problem or start + duration > MAX_SECONDS:
        return 0.0, 0.0, False
    return start, start + duration, True


def iso_seconds(value: Any) -> tuple[float, str | None]:
    """An ISO 8601 duration (`"PT1M2.5S"`) as seconds: (seconds, None), or (0.0, why not)."""
    if type(value) is not str:
        return 0.0, MISSING if value is None else _ISO_MESSAGE
    match = _ISO_DURATION.fullmatch(value)
    if match is None or value in ("P", "PT") or value.endswith("T"):
        return 0.0, _ISO_MESSAGE
    days, hours, minutes, seconds = match.groups()
    total = int(days or 0) * 86400 + int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)
    if total > MAX_SECONDS:
        return 0.0, f"Must be a duration of at most {MAX_SECONDS:g} seconds."
    return total, None


def _report_phrase(errors: PayloadErrors, path: FieldPath, item: Any) -> None:
    """Every problem of one `recognizedPhrases[]` item (its fast path failed)."""
    if type(item) is not dict:
        errors.add(path, "Not a valid object.")
        return
    found = False
    best = item.get("nBest")
    if "nBest" not in item:
        errors.add((*path, "nBest"), MISSING)
        found = True
    elif type(best) is not list or not best:
        errors.add((*path, "nBest"), "Not a valid list.")
        found = True
    elif type(best[0]) is not dict:
        errors.add((*path, "nBest", 0), "Not a valid object.")
        found = True
    elif "display" not in best[0]:
        errors.add((*path, "nBest", 0, "display"), MISSING)
        found = True
    elif type(best[0]["display"]) is not str:
        errors.add((*path, "nBest", 0, "display"), "Not a valid string.")
        found = True
    channel = item.get("channel", 0)
    if type(channel) is not int or not 0 <= channel <= MAX_CHANNEL:
        errors.add((*path, "channel"), f"Must be an integer from 0 to {MAX_CHANNEL}.")
        found = True
    speaker = item.get("speaker")
    if speaker is not None and (type(speaker) is not int or not 1 <= speaker <= MAX_SPEAKER):
        errors.add((*path, "speaker"), f"Must be an integer from 1 to {MAX_SPEAKER}.")
        found = True
    ticks = [key for key in ("offsetInTicks", "durationInTicks") if item.get(key) is not None]
    for key in ticks:
        value = item[key]
        if type(value) not in NUMBER_TYPES or not 0 <= value <= MAX_TICKS:
            errors.add((*path, key), _TICKS_MESSAGE)
            found = True
    if not ticks:
        for key in ("offset", "duration"):
            _seconds, problem = iso_seconds(item.get(key))
            if problem:
                errors.add((*path, key), problem)
                found = True
    if not found:
        errors.add((*path, "durationInTicks" if ticks else "duration"), "The phrase ends after a week.")


VENDOR = SttVendor(
    name="azure",
    parse=parse,
    fetch=FetchSpec(default_api_url=DEFAULT_API_URL, run=fetch),
    fetch_names_call=True,  # the job's own metadata may name the call (contract §11)
    signatures=(SIGNATURE,),
    answer=answer,
    summary=(
        "Azure AI Speech batch transcription web hooks (signed: X-MicrosoftSpeechServices-Signature; "
        "the result file is fetched)"
    ),
)
