"""Twilio Conversational Intelligence (Voice Intelligence) transcripts (`POST /hooks/stt/twilio`).

The Intelligence Service's webhook (`webhook_url`, method POST) carries only which transcript is
ready: `transcript_sid` (`GT…`), `customer_key`, `event_type`, `account_sid`, `service_sid`, as
form fields or as JSON (PascalCase names such as `TranscriptSid` are read too). It always becomes a
fetch; the worker then (Basic auth B24SCRIBE_TWILIO_ACCOUNT_SID:B24SCRIBE_TWILIO_AUTH_TOKEN):

1. `GET <api>/v2/Transcripts/{sid}`: its `status`. `completed` goes on; `failed`, `canceled` and
   `error` are a failed job whose reason is that status (the Transcript resource has no message);
   `queued`, `new`, `in-progress` are not ready yet (the fetch is retried on the retry schedule).
2. `GET <api>/v2/Transcripts/{sid}/Sentences?PageSize=1000`, then every `meta.next_page_url`, only on
   the configured API host (contract §11): a next page on `intelligence.twilio.com` is fetched from
   B24SCRIBE_TWILIO_API_URL when that replaces it, any other host is refused.

`<api>` is `https://intelligence.twilio.com`, or B24SCRIBE_TWILIO_API_URL (tests, proxies).

Sentences: `transcript` (text; null or empty is dropped), `start_time`/`end_time` in seconds as
strings (`"1.52"`), numbers in older API versions, or null (a null start takes the end of the
sentence before, a null end the start), `media_channel` 1, 2, … (counted from 1, so our channel is
`media_channel - 1`, contract §11), an optional `speaker` label. Sentence granularity. Which channel is
the employee depends on the recording (a dual-channel Twilio recording has the parent call leg on
channel 1): B24SCRIBE_CHANNEL0 / `?channel0=` decide, as for every stereo vendor (contract §6.3).
When every sentence is on one media channel the recording was mono: no channel names a side (a
`speaker`, where Twilio gives one, may; else the job fails saying so, contract
§6.3), unless `?channel=0|1` says which channel the recording held.

Job id: `transcript_sid` (a redelivery, or another event for the same transcript, is a duplicate).
Call reference: the URL (contract §3.3), or `customer_key` (set when the transcript is created):
a Bitrix24 CALL_ID, or `<pbx>:<call>` split at the first `:` (contract §11).

Authentication: `X-Twilio-Signature`, verified with Twilio's own SDK (`twilio.request_validator`):
base64 HMAC-SHA1, keyed with B24SCRIBE_TWILIO_AUTH_TOKEN, of the URL Twilio used (B24SCRIBE_PUBLIC_URL
+ path + query) followed by the sorted form parameters; a JSON body is signed through the
`bodySHA256` query parameter, the hex SHA-256 of the raw body bytes, which is compared here in
constant time. Under a Twilio webhook rule (`X-Twilio-Webhooks-Signature-Settings:
key=…,algorithm=HMAC_SHA256`) the same string is signed with the rule's SharedKey secret,
B24SCRIBE_TWILIO_WEBHOOK_SECRET. Twilio's signature has no timestamp: a replayed delivery is a
duplicate (the transcript SID). The inbound token works too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, parse_qsl, quote, urlsplit

from marshmallow import ValidationError, fields, validate
from twilio.request_validator import (  # type: ignore[import-untyped]  # the SDK ships no types
    HMAC_SHA1,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)
from werkzeug.datastructures import MultiDict

from b24scribe.inbound_auth import Authenticated, AuthFailure, HookRequest
from b24scribe.limits import MAX_CHANNEL
from b24scribe.settings import Settings
from b24scribe.sources import FetchContext, FetchError, FetchSpec, SttVendor
from b24scribe.transcript import CallReference, Segment, Transcript, VendorResult
from schemas._vendor_payload import (
    MAX_SECONDS,
    MISSING,
    FieldPath,
    PayloadErrors,
    VendorSchema,
    channel_from_query,
    field_error,
    load_json_object,
    new_segment,
)

NAME = "twilio"
DEFAULT_API_URL = "https://intelligence.twilio.com"
TWILIO_API_HOSTS = frozenset({"intelligence.twilio.com", "api.twilio.com"})  # replaced by B24SCRIBE_TWILIO_API_URL
SIGNATURE_HEADER = "X-Twilio-Signature"
PAGE_SIZE = 1000
MAX_PAGES = 1000  # a week of speech is far fewer pages: a loop of next pages is an error
FAILED_STATUSES = frozenset({"failed", "canceled", "error"})
TRANSCRIPT_SID = re.compile(r"GT[0-9a-fA-F]{32}")
MONO_WITHOUT_SPEAKERS = (
    "Twilio transcribed a one-channel recording, which names no side: record calls dual-channel, or "
    "add ?channel=0|1 to the webhook URL to say which side the recording holds (contract §6.3)"
)
_SECONDS_MESSAGE = f'Not a number of seconds from 0 to {MAX_SECONDS:g} (a number, or a string such as "1.52").'
_CHANNEL_MESSAGE = f"Must be a media channel from 1 to {MAX_CHANNEL + 1}."
# The webhook's fields, as Twilio's snake_case or PascalCase form names.
_ALIASES = {
    "TranscriptSid": "transcript_sid",
    "CustomerKey": "customer_key",
    "EventType": "event_type",
    "AccountSid": "account_sid",
    "ServiceSid": "service_sid",
}


# --- the signature -----------------------------------------------------------------------------


class TwilioSignature:
    """`X-Twilio-Signature`, checked by Twilio's SDK (RequestValidator) against the URL Twilio used.

    Form bodies: the SDK signs the URL followed by the sorted parameters. JSON bodies: the URL carries
    `bodySHA256`, the hex SHA-256 of the raw body (compared here, on the bytes, in constant time),
    and the SDK checks the URL's signature. With `X-Twilio-Webhooks-Signature-Settings` the
    webhook rule's algorithm and SharedKey secret (B24SCRIBE_TWILIO_WEBHOOK_SECRET) are used instead.
    """

    name = "twilio-signature"
    signature_header = SIGNATURE_HEADER
    description = (
        "Twilio request signature: base64 HMAC-SHA1 of the URL and the sorted form parameters (JSON "
        "bodies: the URL's bodySHA256) keyed with B24SCRIBE_TWILIO_AUTH_TOKEN, or HMAC-SHA256 with "
        "B24SCRIBE_TWILIO_WEBHOOK_SECRET under a webhook rule"
    )

    def configured(self, settings: Settings, source: str) -> bool:
        return bool(settings.vendor_setting(source, "AUTH_TOKEN") or settings.vendor_setting(source, "WEBHOOK_SECRET"))

    def present(self, request: HookRequest) -> bool:
        return request.header(SIGNATURE_HEADER) is not None

    def before_body(self, request: HookRequest, settings: Settings, source: str) -> None:
        self._key(request, settings, source)  # no secret for it, or an algorithm we cannot check

    def verify(self, request: HookRequest, body: bytes, settings: Settings, source: str) -> Authenticated:
        secret, algorithm = self._key(request, settings, source)
        url = request.url
        signature = (request.header(SIGNATURE_HEADER) or "").strip()
        body_hashes = parse_qs(urlsplit(url).query).get("bodySHA256")
        params: Any
        if body_hashes:  # a JSON body: the URL signs the body's hash, the body must match it
            expected = hashlib.sha256(body).hexdigest()
            if not hmac.compare_digest(body_hashes[0].encode(), expected.encode()):
                raise AuthFailure(401, "bad_signature", "the body does not match the URL's bodySHA256")
            params = {}
        else:  # form parameters, as Twilio signs them (decoded, sorted by the SDK)
            params = MultiDict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        if not RequestValidator(secret).validate(url, params, signature, algorithm):
            raise AuthFailure(401, "bad_signature", f"{SIGNATURE_HEADER} does not match the URL and body")
        return Authenticated(self.name)

    @staticmethod
    def _key(request: HookRequest, settings: Settings, source: str) -> tuple[str, str]:
        """The secret and algorithm this request is signed with; AuthFailure when we have none."""
        rule = request.header(SIGNATURE_SETTINGS_HEADER)
        if rule is None:
            token = settings.vendor_setting(source, "AUTH_TOKEN")
            if not token:
                raise AuthFailure(401, "bad_signature", "set B24SCRIBE_TWILIO_AUTH_TOKEN to verify X-Twilio-Signature")
            return token, HMAC_SHA1
        algorithm = get_signature_algorithm(rule).upper()
        if algorithm not in ("HMAC_SHA1", "HMAC_SHA256"):
            raise AuthFailure(401, "bad_signature", f"{SIGNATURE_SETTINGS_HEADER} names an unsupported algorithm")
        secret = settings.vendor_setting(source, "WEBHOOK_SECRET")
        if not secret:
            raise AuthFailure(
                401, "bad_signature", "a webhook rule signed this request: set B24SCRIBE_TWILIO_WEBHOOK_SECRET"
            )
        return secret, algorithm


SIGNATURE = TwilioSignature()


def sign(secret: str, url: str, params: Mapping[str, str] | None = None, algorithm: str = HMAC_SHA1) -> str:
    """The `X-Twilio-Signature` Twilio sends for `url` (and form `params`), by Twilio's own SDK."""
    return str(RequestValidator(secret).compute_signature(url, dict(params or {}), algorithm))


def body_sha256(body: bytes) -> str:
    """The `bodySHA256` query value Twilio adds to the URL of a JSON webhook."""
    return hashlib.sha256(body).hexdigest()


# --- the webhook -------------------------------------------------------------------------------


class TwilioWebhookSchema(VendorSchema):
    """The Intelligence Service webhook (form fields or JSON)."""

    transcript_sid = fields.String(
        required=True, validate=validate.Regexp(TRANSCRIPT_SID, error="Not a transcript SID (GT and 32 hex digits).")
    )
    customer_key = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=128))
    event_type = fields.String(load_default=None, allow_none=True)
    account_sid = fields.String(load_default=None, allow_none=True)
    service_sid = fields.String(load_default=None, allow_none=True)


WEBHOOK_SCHEMA = TwilioWebhookSchema()


def parse(raw_body: bytes, query: Mapping[str, str]) -> VendorResult:
    """The webhook: always a fetch of the transcript's sentences (or its failure)."""
    channel_from_query(query)  # a bad ?channel= is refused now, not after the fetch
    data = WEBHOOK_SCHEMA.load(_webhook_fields(raw_body))
    sid = data["transcript_sid"]
    return VendorResult(
        status="fetch", fetch_id=sid, vendor_job_id=sid, reference=customer_key_reference(data["customer_key"])
    )


def _webhook_fields(raw_body: bytes) -> dict[str, Any]:
    """The webhook's fields: a JSON object, else form fields (first values, stripped)."""
    if raw_body.lstrip()[:1] in (b"{", b"["):  # JSON (Twilio form fields start with a name)
        body = load_json_object(raw_body)
    else:
        try:
            text = raw_body.decode("utf-8")
        except UnicodeDecodeError:
            raise ValidationError({"_schema": ["The body is neither JSON nor UTF-8 form fields."]}) from None
        body = {}
        for key, value in parse_qsl(text, keep_blank_values=True):
            body.setdefault(key, value.strip())
    return {_ALIASES.get(key, key): value for key, value in body.items()}


def customer_key_reference(customer_key: str | None) -> CallReference:
    """`customer_key` as contract §11 reads it: `<pbx>:<call>` (split at the first `:`), else a CALL_ID."""
    key = (customer_key or "").strip()
    if not key:
        return CallReference()
    if ":" not in key:
        return CallReference(b24_call_id=key)
    pbx, _, call = key.partition(":")
    pbx, call = pbx.strip(), call.strip()
    if not pbx or not call:
        raise field_error(("customer_key",), "Must be a Bitrix24 CALL_ID or <pbx>:<call>.")
    return CallReference(pbx=pbx, pbx_call_id=call)


# --- the fetch ---------------------------------------------------------------------------------


def fetch(context: FetchContext) -> VendorResult:
    """The transcript's status, then every page of its sentences, from the configured API host."""
    sid = context.fetch_id
    if not TRANSCRIPT_SID.fullmatch(sid):
        raise FetchError(f"twilio transcript SID {sid!r} is not one", retry=False)
    headers = _api_headers(context)
    resource = _json(context.get(f"{context.api_url}/v2/Transcripts/{quote(sid)}", headers, what="transcript"))
    status = resource.get("status")
    if status in FAILED_STATUSES:
        return VendorResult(status="failed", failure_reason=f"Twilio transcript {status}", vendor_job_id=sid)
    if status != "completed":
        raise FetchError(f"twilio transcript is {str(status)[:32]!r}, not completed yet", retry=True)
    forced_channel = channel_from_query(context.callback_query)
    sentences_path = f"/v2/Transcripts/{quote(sid)}/Sentences"
    url: str | None = f"{context.api_url}{sentences_path}?PageSize={PAGE_SIZE}"
    segments: list[Segment] = []
    seen: set[str] = set()
    while url is not None:
        if url in seen or len(seen) >= MAX_PAGES:
            raise FetchError("twilio sentences pages do not end", retry=False)
        seen.add(url)
        page = context.get(url, headers, what="sentences")
        page_segments, next_url = _page(page.content, forced_channel)
        segments += page_segments
        url = None if next_url is None else _next_page(context.api_url, sentences_path, next_url)
    transcript = _transcript(segments, forced_channel)
    if any(segment.channel is None and segment.speaker is None for segment in transcript.segments):
        return VendorResult(status="failed", failure_reason=MONO_WITHOUT_SPEAKERS, vendor_job_id=sid)
    return VendorResult(status="completed", transcript=transcript, vendor_job_id=sid)


def _api_headers(context: FetchContext) -> dict[str, str]:
    account = context.settings.vendor_setting(NAME, "ACCOUNT_SID")
    token = context.settings.vendor_setting(NAME, "AUTH_TOKEN")
    if not account or not token:
        missing = "B24SCRIBE_TWILIO_ACCOUNT_SID" if not account else "B24SCRIBE_TWILIO_AUTH_TOKEN"
        raise FetchError(f"{missing} is not set", retry=False)
    credentials = base64.b64encode(f"{account}:{token}".encode()).decode()
    return {"Authorization": f"Basic {credentials}", "Accept": "application/json"}


def _json(answer: Any) -> dict[str, Any]:
    try:
        body = json.loads(answer.content)
    except (ValueError, RecursionError):
        raise FetchError("twilio answered something that is not JSON", retry=False) from None
    if type(body) is not dict:
        raise FetchError("twilio answered something that is not a JSON object", retry=False)
    return body


def _next_page(api_url: str, sentences_path: str, next_url: str) -> str:
    """`meta.next_page_url` on the configured API host (Twilio's own host is mapped onto it); the
    same transcript's sentences only."""
    api, page = urlsplit(api_url), urlsplit(next_url)
    if page.scheme or page.netloc:
        same_host = (page.scheme, page.netloc) == (api.scheme, api.netloc)
        if not same_host and not (page.scheme == "https" and page.netloc in TWILIO_API_HOSTS):
            raise FetchError("twilio named a next page on another host", retry=False)
    prefix = api.path.rstrip("/")
    path = page.path[len(prefix) :] if prefix and page.path.startswith(prefix + "/") else page.path
    if path != sentences_path:
        raise FetchError("twilio named a next page that is not this transcript's sentences", retry=False)
    return f"{api_url}{path}" + (f"?{page.query}" if page.query else "")


def parse_sentences(raw_body: bytes, query: Mapping[str, str]) -> VendorResult:
    """One fetched page of `GET /v2/Transcripts/{sid}/Sentences` as a whole transcript (the benchmark,
    tests)."""
    forced_channel = channel_from_query(query)
    segments, _next = _page(raw_body, forced_channel)
    return VendorResult(status="completed", transcript=_transcript(segments, forced_channel))


def _transcript(segments: list[Segment], forced_channel: int | None) -> Transcript:
    """The whole transcript: when every sentence is on one media channel the recording was mono
    (one channel names no side; its speakers may), unless `?channel=` said which channel it was."""
    if forced_channel is None and len({segment.channel for segment in segments} - {None}) == 1:
        segments = [new_segment(s.start, s.end, s.text, None, s.speaker) for s in segments]
    return Transcript(segments=segments)


def _page(raw_body: bytes, forced_channel: int | None) -> tuple[list[Segment], str | None]:
    """A page's sentences as segments, and its `meta.next_page_url`."""
    body = load_json_object(raw_body)
    items = body.get("sentences")
    if type(items) is not list:
        raise field_error(("sentences",), MISSING if items is None else "Not a valid list.")
    meta = body.get("meta")
    next_url = None
    if meta is not None:
        if type(meta) is not dict:
            raise field_error(("meta",), "Not a valid object.")
        next_url = meta.get("next_page_url")
        if next_url is not None and (type(next_url) is not str or not next_url.strip()):
            raise field_error(("meta", "next_page_url"), "Not a valid URL.")
    errors = PayloadErrors()
    segments = _segments(items, forced_channel, errors)
    errors.raise_if_any()
    return segments, next_url


def _segments(items: list[Any], forced_channel: int | None, errors: PayloadErrors) -> list[Segment]:
    segments: list[Segment] = []
    append = segments.append
    make, max_seconds, max_channel = new_segment, MAX_SECONDS, MAX_CHANNEL + 1
    clock = 0.0  # the end of the sentence before: where a sentence without a start begins
    start: Any
    end: Any
    for index, item in enumerate(items):
        try:
            text = item.get("transcript")
            start = item.get("start_time")
            end = item.get("end_time")
            media_channel = item.get("media_channel")
            speaker = item.get("speaker")
            # strings (the current API) and numbers (older versions) of seconds; bool is not a time
            start = clock if start is None else float(start) if type(start) is not bool else None
            end = start if end is None else float(end) if type(end) is not bool else None
            if item.get("start_time") is None and end is not None and end < start:
                start = end  # a sentence without a start that ends before the one before it began
            valid = (
                0 <= start <= end <= max_seconds  # NaN and infinities fail this too
                and (text is None or type(text) is str)
                and (media_channel is None or (type(media_channel) is int and 1 <= media_channel <= max_channel))
                and (speaker is None or type(speaker) is str or type(speaker) is int)
            )
        except (TypeError, AttributeError, ValueError, OverflowError):
            valid = False
        if not valid:
            _report(errors, ("sentences", index), item)
            continue
        clock = end
        if not text:
            continue
        channel = forced_channel if forced_channel is not None or media_channel is None else media_channel - 1
        append(make(start, end, text, channel, None if speaker is None else str(speaker)))
    return segments


def _seconds(value: Any) -> float | None:
    """Seconds from a string or a number, or None when it is neither (or not within a week)."""
    if type(value) is bool or type(value) not in (str, int, float):
        return None
    try:
        seconds = float(value)
    except (ValueError, OverflowError):
        return None
    return seconds if 0 <= seconds <= MAX_SECONDS else None


def _report(errors: PayloadErrors, path: FieldPath, item: Any) -> None:
    """Every problem of one sentence (its fast path failed)."""
    if type(item) is not dict:
        errors.add(path, "Not a valid object.")
        return
    found = False
    text = item.get("transcript")
    if text is not None and type(text) is not str:
        errors.add((*path, "transcript"), "Not a valid string.")
        found = True
    times: dict[str, float] = {}
    for key in ("start_time", "end_time"):
        value = item.get(key)
        if value is None:
            continue
        seconds = _seconds(value)
        if seconds is None:
            errors.add((*path, key), _SECONDS_MESSAGE)
            found = True
        else:
            times[key] = seconds
    channel = item.get("media_channel")
    if channel is not None and not (type(channel) is int and 1 <= channel <= MAX_CHANNEL + 1):
        errors.add((*path, "media_channel"), _CHANNEL_MESSAGE)
        found = True
    speaker = item.get("speaker")
    if speaker is not None and type(speaker) not in (str, int):
        errors.add((*path, "speaker"), "Not a valid string or integer.")
        found = True
    if not found:
        if "start_time" in times and "end_time" in times and times["end_time"] < times["start_time"]:
            errors.add((*path, "end_time"), "Must not be before start_time.")
        else:
            errors.add(path, "Not a valid sentence.")


VENDOR = SttVendor(
    name=NAME,
    summary="Twilio Conversational Intelligence webhooks (signed: X-Twilio-Signature; sentences are fetched)",
    parse=parse,
    fetch=FetchSpec(default_api_url=DEFAULT_API_URL, run=fetch, needs_api_key=False),
    signatures=(SIGNATURE,),
)
