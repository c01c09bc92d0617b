"""Zadarma's cloud PBX (`/hooks/pbx/zadarma`): its call notifications, form-encoded (contract §11).

Zadarma posts `NOTIFY_START` (an inbound call reaches the PBX), `NOTIFY_INTERNAL` (it rings an
extension), `NOTIFY_ANSWER` (an extension answers), `NOTIFY_END` (the inbound call ends),
`NOTIFY_OUT_START` / `NOTIFY_OUT_END` (an extension's outbound call) and `NOTIFY_RECORD` (a recording
is ready), each naming its call with `pbx_call_id` (the same for every leg, transfer and queue member
of one external call). They fold into one Bitrix24 call:

- the user is the extension (`internal`): the one rung last, then the one that answered, then the one
  `NOTIFY_END` names; a transfer's second `NOTIFY_ANSWER` moves the call to the new extension;
- `disposition` gives the status (`answered`, `busy`, `cancel` → cancelled, `no answer` → no-answer,
  the rest failed); `duration` is the talk time of an answered call, 0 for any other;
- `NOTIFY_RECORD` names a recording only by an id (`call_id_with_rec`) that Zadarma's API turns
  into a link (see Recordings below). `NOTIFY_IVR` and Zadarma's non-call notifications are
  answered 200 and not stored.

`call_start` is the account's local time without an offset: `?tz=<IANA zone>` on the hook URL (the
account's time zone, e.g. `?tz=Europe/Moscow`) makes it `started_at`; without it the call has no start
time and Bitrix24 takes the time of registration.

Recordings. With B24SCRIBE_ZADARMA_API_KEY and B24SCRIBE_ZADARMA_API_SECRET set, `NOTIFY_RECORD` is a
`recording` event (contract §9) whose `recording_url` is the API request that names the file,
`https://api.zadarma.com/v1/pbx/record/request/?call_id=<call_id_with_rec>` (by `call_id` the API
answers this one recording's `link`; by `pbx_call_id` it may answer several `links`). The URL is
built from the notification alone, so a stored event replays to the same call. When the record job
runs, `resolve_recording` asks that request, signed as Zadarma's SDKs sign API requests (official
zadarma/user-api-py-v1 `zadarma/api.py`, user-api-v1 `lib/Client.php`): the parameters (with
`format=json`, which the SDKs always add) sorted by name and form-encoded, then

    Authorization: <key>:base64(hex(HMAC-SHA1(secret, "/v1/pbx/record/request/" + query + md5hex(query))))

to B24SCRIBE_ZADARMA_API_URL (default https://api.zadarma.com; tests point it at a fake), and
answers the link (on api.zadarma.com, `/v1/pbx/record/download/...`; a download may go there
without B24SCRIBE_RECORDING_HOSTS naming it). Without the key and secret, `NOTIFY_RECORD` is
answered 200 and not stored (as is one without `call_id_with_rec`), unless a relay added its own
`recording_url`, which is taken as it is.

Failure policy of the API request: a 401/403 is refused for good (the reason names the settings to
check); a 404, or Zadarma's `{"status": "error"}` with a 200 or a 400 (the file is not stored yet:
Zadarma advises asking about 40 s after the notification), is "not ready" and retried on the retry
schedule, then dead with Zadarma's message; a 5xx, 408, 425, 429 or an unreachable API is retried.

Authentication. Zadarma signs a notification (when the account has an API key and secret) with a
`Signature` header: base64 of the lowercase hex HMAC-SHA1 (PHP's `hash_hmac` default) of a few of its
fields, keyed with B24SCRIBE_ZADARMA_API_SECRET (the official SDK zadarma/user-api-v1,
lib/Webhook/Notify*.php `getSignatureString`, and examples/callinfo_callback.php):

    NOTIFY_START, NOTIFY_INTERNAL, NOTIFY_END (and NOTIFY_IVR): caller_id + called_did + call_start
    NOTIFY_ANSWER: caller_id + destination + call_start
    NOTIFY_OUT_START, NOTIFY_OUT_END: internal + destination + call_start
    NOTIFY_RECORD: pbx_call_id + call_id_with_rec

The rest of the body (`duration`, `disposition`, `pbx_call_id`, ...) is not covered, so the signed
fields make the delivery id: the same signed event (event, call, signed fields, and the extension of a
ring or an answer) is stored once, and a replay of a captured signature with other unsigned values is
a 200 duplicate that changes nothing. A signed event whose `call_start` is more than a day from now
(more than a day plus a week, the longest call, in the past for the `*_END` events; a day covers any
time zone) is stale: 401, like a forged one. Zadarma has no Python SDK that verifies notifications
(the PyPI `zadarma` package is an API client), so the check is the standard library's `hmac`.

The URL check: Zadarma first GETs the hook URL with `?zd_echo=<value>` and expects the value as the
body. Zadarma cannot add headers to it and does not sign it, so it is authenticated like every
request without a signature: by `?token=<B24SCRIBE_INBOUND_TOKEN>` in the URL pasted at Zadarma (the
same URL then carries the notifications, which the signature checks when the secret is set). An
unauthenticated echo is a 401: the hook never reflects a stranger's text.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlencode, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import requests
from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, pre_load, validate

from b24scribe.delivery.download import TRANSIENT_STATUSES, DownloadFailed, NotReady, RecordingError, Refused
from b24scribe.events import CallEvent
from b24scribe.inbound_auth import Authenticated, AuthFailure, HookRequest
from b24scribe.limits import (
    MAX_DURATION,
    MAX_EXTENSION_LENGTH,
    MAX_ID_LENGTH,
    MAX_NUMBER_LENGTH,
    MAX_URL_LENGTH,
    StoredText,
)
from b24scribe.parsing import form_fields, parse_form
from b24scribe.settings import Settings
from b24scribe.sources import HookAnswer, PbxSource
from b24scribe.transcript import Direction

NAME = "zadarma"
SECRET_SETTING = "API_SECRET"  # noqa: S105 (a setting name: B24SCRIBE_ZADARMA_API_SECRET)
KEY_SETTING = "API_KEY"  # B24SCRIBE_ZADARMA_API_KEY: the API's user key, for `pbx/record/request`
API_URL_SETTING = "API_URL"  # B24SCRIBE_ZADARMA_API_URL: replaces DEFAULT_API_URL (tests, proxies)
DEFAULT_API_URL = "https://api.zadarma.com"
API_HOST = "api.zadarma.com"  # the API, and where its recording links point (/v1/pbx/record/download/…)
RECORD_REQUEST = "/v1/pbx/record/request/"  # the API method (and signed path) that answers a recording's link
RECORD_REQUEST_PARAMETERS = ("call_id", "pbx_call_id", "lifetime")  # what a stored request URL may carry

# event → (CallEvent.event, direction)
EVENTS: dict[str, tuple[str, Direction | None]] = {
    "NOTIFY_START": ("started", Direction.INBOUND),
    "NOTIFY_INTERNAL": ("started", Direction.INBOUND),
    "NOTIFY_ANSWER": ("answered", None),
    "NOTIFY_END": ("finished", Direction.INBOUND),
    "NOTIFY_OUT_START": ("started", Direction.OUTBOUND),
    "NOTIFY_OUT_END": ("finished", Direction.OUTBOUND),
    "NOTIFY_RECORD": ("recording", None),
}
# Zadarma notifications that are no call event of ours: answered 200, nothing stored.
IGNORED_EVENTS = frozenset({"NOTIFY_IVR", "NOTIFY_SMS", "SMS", "SPEECH_RECOGNITION", "NUMBER_LOOKUP", "CALL_TRACKING"})
# The fields each event's signature covers, in order (SDK getSignatureString).
SIGNED_FIELDS: dict[str, tuple[str, ...]] = {
    "NOTIFY_START": ("caller_id", "called_did", "call_start"),
    "NOTIFY_INTERNAL": ("caller_id", "called_did", "call_start"),
    "NOTIFY_END": ("caller_id", "called_did", "call_start"),
    "NOTIFY_IVR": ("caller_id", "called_did", "call_start"),
    "NOTIFY_ANSWER": ("caller_id", "destination", "call_start"),
    "NOTIFY_OUT_START": ("internal", "destination", "call_start"),
    "NOTIFY_OUT_END": ("internal", "destination", "call_start"),
    "NOTIFY_RECORD": ("pbx_call_id", "call_id_with_rec"),
}
DEFAULT_SIGNED_FIELDS = SIGNED_FIELDS["NOTIFY_START"]
# Several of these per call differ only in the extension (unsigned): it is part of their delivery id.
PER_EXTENSION_EVENTS = frozenset({"NOTIFY_INTERNAL", "NOTIFY_ANSWER"})
END_EVENTS = frozenset({"NOTIFY_END", "NOTIFY_OUT_END"})
# `disposition` → our status (contract §3.1); any other value is a failed call.
DISPOSITIONS = {
    "answered": "answered",
    "busy": "busy",
    "cancel": "cancelled",
    "cancelled": "cancelled",
    "no answer": "no-answer",
    "noanswer": "no-answer",
    "failed": "failed",
}
STALE_AFTER = timedelta(days=1)  # call_start is local time: a day covers every time zone
CALL_START = re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}")
ECHO = re.compile(r"[A-Za-z0-9._~-]{1,128}")


def signature_string(form: Mapping[str, str]) -> str:
    """What Zadarma signs for this notification: its event's fields, concatenated as sent."""
    names = SIGNED_FIELDS.get(form.get("event", ""), DEFAULT_SIGNED_FIELDS)
    return "".join(form.get(name, "") for name in names)


def sign(secret: str, form: Mapping[str, str]) -> str:
    """The `Signature` header Zadarma sends: base64(hex(HMAC-SHA1(secret, signed fields)))."""
    digest = hmac.new(secret.encode(), signature_string(form).encode(), hashlib.sha1).hexdigest()
    return base64.b64encode(digest.encode()).decode()


def api_query(parameters: Mapping[str, str]) -> str:
    """The parameters sorted by name and form-encoded as PHP's `http_build_query(..., PHP_QUERY_RFC1738)`
    encodes them (Zadarma's documented recipe; Python's urlencode differs from it in sparing `~`)."""
    return "&".join(f"{_php_quote(name)}={_php_quote(value)}" for name, value in sorted(parameters.items()))


def _php_quote(text: str) -> str:
    return quote_plus(text, safe="").replace("~", "%7E")


def api_signature(method: str, parameters: Mapping[str, str], secret: str) -> str:
    """The signature of an API request, as Zadarma's SDKs make it: the parameters' `api_query`, then
    base64(hex(HMAC-SHA1(secret, method + query + md5hex(query))))."""
    query = api_query(parameters)
    checksum = hashlib.md5(query.encode(), usedforsecurity=False).hexdigest()
    digest = hmac.new(secret.encode(), (method + query + checksum).encode(), hashlib.sha1).hexdigest()
    return base64.b64encode(digest.encode()).decode()


def record_request_url(call_id_with_rec: str) -> str:
    """The API request that names one recording: what a `NOTIFY_RECORD` stores as its recording URL."""
    return f"{DEFAULT_API_URL}{RECORD_REQUEST}?{urlencode({'call_id': call_id_with_rec})}"


def delivery_id(form: Mapping[str, str]) -> str:
    """One signed notification: the event, its call, what the signature covers (and, for a ring or an
    answer, the extension). A replay with other unsigned values is the same delivery."""
    event = form.get("event", "")
    parts = [event, form.get("pbx_call_id", ""), *(form.get(name, "") for name in SIGNED_FIELDS.get(event, ()))]
    if event in PER_EXTENSION_EVENTS:
        parts.append(form.get("internal", ""))
    return "zadarma:" + "\x1f".join(parts)


def local_call_start(value: str) -> datetime | None:
    """`call_start` ("2026-11-25 10:20:30") as a naive datetime, None when it is not one."""
    value = value.strip()
    if not CALL_START.fullmatch(value):
        return None
    try:
        return datetime.fromisoformat(value.replace(" ", "T", 1))
    except ValueError:
        return None


def is_stale(form: Mapping[str, str], now: float) -> bool:
    """A signed event whose call_start is too far from now (in any time zone) to be a fresh one."""
    if "call_start" not in form:
        return False  # NOTIFY_RECORD: signed over ids only
    started = local_call_start(form["call_start"])
    if started is None:
        return True
    current = datetime.fromtimestamp(now, UTC).replace(tzinfo=None)
    past = STALE_AFTER + (timedelta(seconds=MAX_DURATION) if form.get("event") in END_EVENTS else timedelta(0))
    return not current - past <= started <= current + STALE_AFTER


class ZadarmaSignature:
    """Zadarma's `Signature` header: HMAC-SHA1 over a few of the form's fields (see the module doc)."""

    name = "zadarma-signature"
    signature_header = "Signature"
    description = (
        "base64 of the hex HMAC-SHA1 of the event's signed fields (caller_id + called_did + call_start, ...), "
        "with B24SCRIBE_ZADARMA_API_SECRET"
    )

    def configured(self, settings: Settings, source: str) -> bool:
        return bool(settings.vendor_setting(source, SECRET_SETTING))

    def present(self, request: HookRequest) -> bool:
        return request.header(self.signature_header) is not None

    def before_body(self, request: HookRequest, settings: Settings, source: str) -> None:
        """The signed fields are in the body: nothing to refuse from the headers alone."""

    def verify(self, request: HookRequest, body: bytes, settings: Settings, source: str) -> Authenticated:
        secret = settings.vendor_setting(source, SECRET_SETTING) or ""
        given = (request.header(self.signature_header) or "").strip()
        try:
            form = parse_form(body) if body else dict(request.query)
        except ValidationError:
            raise AuthFailure(401, "bad_signature", "Signature: the body is not a readable form") from None
        if not given or not hmac.compare_digest(given.encode(), sign(secret, form).encode()):
            raise AuthFailure(401, "bad_signature", "Signature does not match the notification's signed fields")
        if is_stale(form, time.time()):
            raise AuthFailure(401, "bad_signature", "Signature rejected: call_start is not within a day of now")
        return Authenticated(self.name, delivery_id(form))


SIGNATURE = ZadarmaSignature()


class ZadarmaEventSchema(Schema):
    """A Zadarma notification's form fields (the ones we read; any other is ignored)."""

    class Meta:
        unknown = EXCLUDE

    event = fields.String(required=True, validate=validate.OneOf(sorted(EVENTS)))
    pbx_call_id = fields.String(required=True, validate=StoredText(MAX_ID_LENGTH, identifier=True, min_length=1))
    call_start = fields.String(validate=StoredText(32))
    caller_id = fields.String(validate=StoredText(MAX_NUMBER_LENGTH))
    called_did = fields.String(validate=StoredText(MAX_NUMBER_LENGTH))
    destination = fields.String(validate=StoredText(MAX_NUMBER_LENGTH))
    internal = fields.String(validate=StoredText(MAX_EXTENSION_LENGTH))
    duration = fields.Integer(validate=validate.Range(min=0, max=MAX_DURATION), strict=False)
    disposition = fields.String(validate=StoredText(64))
    status_code = fields.String(validate=StoredText(16))
    is_recorded = fields.String(validate=StoredText(8))
    call_id_with_rec = fields.String(validate=StoredText(MAX_ID_LENGTH))
    recording_url = fields.Url(schemes={"http", "https"}, require_tld=False, validate=StoredText(MAX_URL_LENGTH))
    tz = fields.String(validate=StoredText(64))  # from the hook URL's query: the account's time zone

    @pre_load
    def strip(self, data: Any, **_: Any) -> Any:
        """Empty values count as absent; values are stripped."""
        if not isinstance(data, dict):
            return data
        return {key: value.strip() for key, value in data.items() if isinstance(value, str) and value.strip()}

    @post_load
    def to_event(self, data: dict[str, Any], **_: Any) -> CallEvent:
        name = data["event"]
        kind, direction = EVENTS[name]
        if kind == "recording" and "recording_url" not in data:
            if "call_id_with_rec" not in data:
                raise ValidationError({"call_id_with_rec": ["NOTIFY_RECORD names no recording (call_id_with_rec)"]})
            data["recording_url"] = record_request_url(data["call_id_with_rec"])
        started_at = _started_at(data)
        status = duration = None
        if kind == "finished":
            disposition = data.get("disposition")
            if disposition is not None:
                status = DISPOSITIONS.get(disposition.lower(), "failed")
            # the talk time: an answered call's duration (a missed call's is its ringing, not talk)
            duration = data.get("duration", 0) if status in ("answered", None) else 0
        caller, did, destination = data.get("caller_id"), data.get("called_did"), data.get("destination")
        outbound = direction is Direction.OUTBOUND
        return CallEvent(
            event=kind,
            call_id=data["pbx_call_id"],
            direction=direction,
            from_number=caller if kind != "recording" else None,
            to_number=destination if outbound else did,
            extension=data.get("internal") if kind != "recording" else None,
            started_at=started_at,
            duration=duration,
            status=status,
            recording_url=data.get("recording_url"),
            line=did if direction is Direction.INBOUND else None,
        )


def _started_at(data: dict[str, Any]) -> str | None:
    """`call_start` in the zone `?tz=` names, as ISO-8601 with its offset; None without a zone."""
    if "call_start" not in data:
        return None
    started = local_call_start(data["call_start"])
    if started is None:
        raise ValidationError({"call_start": ["expected the time as YYYY-MM-DD HH:MM:SS"]})
    if "tz" not in data:
        return None
    try:
        zone = ZoneInfo(data["tz"])
    except (ZoneInfoNotFoundError, ValueError, OSError):  # not a zone key ("../x", NUL), an odd path
        raise ValidationError({"tz": ["expected an IANA time zone, like Europe/Moscow"]}) from None
    return started.replace(tzinfo=zone).isoformat(timespec="seconds")


_SCHEMA = ZadarmaEventSchema()


def parse(body: bytes, query: Mapping[str, str]) -> CallEvent:
    """A Zadarma notification: its form body (or, with no body, the query); `?tz=` from the URL."""
    form: dict[str, Any] = dict(form_fields(body, query))
    form.pop("tz", None)
    if "tz" in query:
        form["tz"] = query["tz"]
    event: CallEvent = _SCHEMA.load(form)
    return event


def answer(request: HookRequest, body: bytes, settings: Settings) -> HookAnswer | None:
    """The URL check (`GET ?zd_echo=`), and notifications that are no call event: not stored."""
    if request.method == "GET":
        echo = request.query.get("zd_echo")
        if echo is None or not ECHO.fullmatch(echo):
            return HookAnswer(400, b"expected ?zd_echo=<letters, digits, . _ ~ ->\n")
        return HookAnswer(200, echo.encode())
    try:
        form = parse_form(body) if body else dict(request.query)
    except ValidationError:
        return None  # the parser names what is wrong
    event = form.get("event", "").strip()
    if event in IGNORED_EVENTS or (event == "NOTIFY_RECORD" and not _recording_named(form, settings)):
        return HookAnswer(200, b'{"ignored": true}\n', "application/json")
    return None


def _recording_named(form: Mapping[str, str], settings: Settings) -> bool:
    """A NOTIFY_RECORD names a recording b24scribe can fetch: a relay's `recording_url`, or an id the
    API can be asked about with the key and secret (without them it is not stored, as before)."""
    if form.get("recording_url", "").strip():
        return True
    asked = settings.vendor_setting(NAME, KEY_SETTING) and settings.vendor_setting(NAME, SECRET_SETTING)
    return bool(asked and form.get("call_id_with_rec", "").strip())


def resolve_recording(url: str, settings: Settings, http: requests.Session) -> str:
    """The link Zadarma's API gives for a stored `pbx/record/request` URL (any other URL as it is);
    NotReady, Refused or DownloadFailed when the API gives none (see the module doc)."""
    parts = urlsplit(url)
    if parts.hostname != API_HOST or parts.path != RECORD_REQUEST:
        return url  # a relay's own recording URL
    key, secret = settings.vendor_setting(NAME, KEY_SETTING), settings.vendor_setting(NAME, SECRET_SETTING)
    if not key or not secret:
        raise Refused(
            "Zadarma names this recording by its API: set B24SCRIBE_ZADARMA_API_KEY and "
            "B24SCRIBE_ZADARMA_API_SECRET (Zadarma's API keys page), then retry the job",
            "not_configured",
        )
    parameters = {k: v for k, v in parse_qsl(parts.query) if k in RECORD_REQUEST_PARAMETERS}
    if "call_id" not in parameters and "pbx_call_id" not in parameters:
        raise Refused("the Zadarma recording request names no call_id or pbx_call_id", "bad_url")
    parameters["format"] = "json"  # as the SDKs send (and sign) it
    base = (settings.vendor_setting(NAME, API_URL_SETTING) or DEFAULT_API_URL).rstrip("/")
    headers = {"Authorization": f"{key}:{api_signature(RECORD_REQUEST, parameters, secret)}"}
    try:
        answer = http.get(
            f"{base}{RECORD_REQUEST}?{api_query(parameters)}",
            headers=headers,
            timeout=settings.vendor_timeout_seconds,
            allow_redirects=False,
        )
    except requests.RequestException as error:
        raise DownloadFailed(f"Zadarma's API is unreachable ({type(error).__name__})", "unreachable") from None
    try:
        body = answer.json()
    except ValueError:
        body = None
    body = body if isinstance(body, dict) else {}
    if answer.status_code == 200 and body.get("status") == "success":
        return _link(body)
    raise _api_error(answer.status_code, body)


def _link(body: Mapping[str, Any]) -> str:
    """The answer's `link` (asked by call_id), else the first of its `links` (asked by pbx_call_id)."""
    links = body.get("links")
    link = body.get("link") or (links[0] if isinstance(links, list) and links else None)
    if link is None:
        raise NotReady("Zadarma's API answered success without a link yet", "not_ready")
    if not isinstance(link, str) or len(link) > MAX_URL_LENGTH or urlsplit(link).scheme not in ("http", "https"):
        raise Refused("Zadarma's API answered a link that is not an http(s) URL", "bad_url")
    return link


def _api_error(status: int, body: Mapping[str, Any]) -> RecordingError:
    """What an answer without a link means (the failure policy in the module doc)."""
    message = " ".join(str(body.get("message", "")).split())[:200]
    said = f"Zadarma's API answered HTTP {status}" + (f" ({message})" if message else "")
    if status in (401, 403):
        return Refused(
            f"{said}: it refused the key or the signature; check B24SCRIBE_ZADARMA_API_KEY and "
            "B24SCRIBE_ZADARMA_API_SECRET (the key and secret of Zadarma's API keys page)",
            "api_auth",
        )
    if status == 404 or (status in (200, 400) and body.get("status") == "error"):
        return NotReady(f"{said}: the recording is not stored yet", "not_ready")
    if status >= 500 or status in TRANSIENT_STATUSES:
        return DownloadFailed(said, "http_status")
    return Refused(said, "http_status")


SOURCE = PbxSource(
    NAME,
    parse,
    encoding="form",
    signatures=(SIGNATURE,),
    answer=answer,
    methods=("GET", "POST"),
    recording_hosts=(API_HOST,),
    resolve_recording=resolve_recording,
    summary="Zadarma cloud PBX notifications (NOTIFY_START ... NOTIFY_END, form-encoded, Signature header)",
    openapi_schema=ZadarmaEventSchema,
)
