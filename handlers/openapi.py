"""The OpenAPI document (flask-smorest + apispec): served at `/openapi.json`, committed as `openapi.json`.

After changing an endpoint, regenerate the committed file (tests/test_openapi.py checks it):

    flask --app app openapi write openapi.json

The schemas below only document responses; the views build their bodies themselves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from flask import Flask
from flask_smorest import Api
from marshmallow import Schema, fields
from werkzeug.routing import Map, Rule

from b24scribe.sources import SignatureScheme, Source, Sources
from schemas.pbx_events import StartedAt


class ErrorDetailSchema(Schema):
    """What went wrong."""

    code = fields.String(required=True, metadata={"description": "machine-readable, e.g. invalid_payload"})
    message = fields.String(required=True, metadata={"description": "for a person; never holds a secret"})
    fields_ = fields.Dict(
        data_key="fields",
        required=True,
        metadata={"description": "each bad field (dotted path) with its messages; may hold event_id of a kept event"},
    )


class ErrorSchema(Schema):
    """Every error the service answers: {"error": {"code", "message", "fields"}}."""

    error = fields.Nested(ErrorDetailSchema, required=True)


class EventStoredSchema(Schema):
    """A hook's answer once the event is durably stored (202) or was already (200, duplicate)."""

    event_id = fields.Integer(required=True)
    duplicate = fields.Boolean(required=True)


class JobSchema(Schema):
    """An outbox job."""

    id = fields.Integer(required=True)
    kind = fields.String(required=True, metadata={"description": "register | finish | attach | fetch"})
    state = fields.String(required=True, metadata={"description": "waiting | pending | leased | done | dead"})
    attempts = fields.Integer(required=True)
    next_attempt_at = fields.DateTime(allow_none=True, metadata={"description": "pending and waiting jobs only"})
    last_error = fields.String(allow_none=True)
    dead_reason = fields.String(
        allow_none=True,
        metadata={
            "description": "why a dead job is dead: orphan (its call never finished; sent if it does) | retries "
            "(the retry schedule ran out) | permanent (no retry can mend it); null unless dead"
        },
    )
    call = fields.Integer(allow_none=True, metadata={"description": "the call's id in this service"})
    result = fields.Dict(allow_none=True, metadata={"description": "what Bitrix24 answered, e.g. CALL_ID"})


class CallJobSchema(JobSchema):
    """A job of one call, with the request it sent (or would send, in dry-run)."""

    request = fields.Dict(allow_none=True, metadata={"description": "{method, params}"})


class JobListSchema(Schema):
    """`GET /v1/jobs`."""

    counts = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)
    jobs = fields.List(fields.Nested(JobSchema), required=True)


class TranscriptStateSchema(Schema):
    """One transcript callback of a call and how far it got."""

    id = fields.Integer(required=True)
    vendor = fields.String(required=True)
    vendor_job_id = fields.String(allow_none=True)
    channel = fields.Integer(allow_none=True, metadata={"description": "0 or 1 for a one-channel file, else null"})
    received_at = fields.DateTime(required=True)
    segments = fields.Integer(required=True, metadata={"description": "how many segments or words it holds"})
    state = fields.String(
        required=True, metadata={"description": "waiting | pending | fetching | delivered | empty | failed"}
    )
    reason = fields.String(allow_none=True, metadata={"description": "why it is waiting or failed"})
    transcript_id = fields.Integer(allow_none=True, metadata={"description": "Bitrix24 TRANSCRIPT_ID"})
    delivered_at = fields.DateTime(allow_none=True)


class RecordingStateSchema(Schema):
    """A call's recording (contract §9) and what became of it."""

    state = fields.String(
        required=True,
        metadata={"description": "pending | attached | dry-run | refused (never retried) | failed (retries spent)"},
    )
    reason = fields.String(allow_none=True, metadata={"description": "why it is not attached (yet)"})
    url = fields.String(required=True, metadata={"description": "where it is, without userinfo or query"})
    channels = fields.Integer(allow_none=True, metadata={"description": "1 or 2, when the PBX said"})
    file = fields.String(allow_none=True, metadata={"description": "the FILENAME uploaded to Bitrix24"})
    sha256 = fields.String(allow_none=True, metadata={"description": "of the file uploaded"})
    attached_at = fields.DateTime(allow_none=True)


class TranscriptionRequestSchema(Schema):
    """The call's recording as submitted to the STT vendor by b24scribe itself (contract §10)."""

    state = fields.String(
        required=True,
        metadata={"description": "queued | sending | submitted | transcribed (answered at once) | failed"},
    )
    vendor = fields.String(allow_none=True)
    vendor_job_id = fields.String(allow_none=True, metadata={"description": "the vendor's id of the job"})
    submitted_at = fields.DateTime(allow_none=True)
    reason = fields.String(allow_none=True, metadata={"description": "why it failed, or the last error"})


class CallSchema(Schema):
    """A call: its Bitrix24 CALL_ID and stage, recording, transcripts and jobs."""

    id = fields.Integer(required=True)
    pbx = fields.String(allow_none=True)
    pbx_call_id = fields.String(allow_none=True)
    b24_call_id = fields.String(allow_none=True, metadata={"description": "Bitrix24 CALL_ID once registered"})
    portal = fields.String(required=True)
    external = fields.Boolean(required=True, metadata={"description": "registered by something else"})
    stage = fields.String(required=True, metadata={"description": "new | registered | finished"})
    registered = fields.Boolean(required=True)
    finished = fields.Boolean(required=True)
    direction = fields.String(allow_none=True)
    from_ = fields.String(data_key="from", allow_none=True)
    to = fields.String(allow_none=True)
    extension = fields.String(allow_none=True)
    user_id = fields.Integer(allow_none=True)
    started_at = fields.String(allow_none=True)
    duration = fields.Integer(allow_none=True)
    status = fields.String(allow_none=True)
    last_error = fields.String(allow_none=True)
    recording = fields.Nested(RecordingStateSchema, allow_none=True)
    transcription = fields.Nested(
        TranscriptionRequestSchema,
        allow_none=True,
        metadata={"description": "b24scribe's own request to the STT vendor (B24SCRIBE_TRANSCRIBE_WITH); null: none"},
    )
    transcripts = fields.List(fields.Nested(TranscriptStateSchema), required=True)
    jobs = fields.List(fields.Nested(CallJobSchema), required=True)


class EventCallSchema(Schema):
    """The call an event became."""

    id = fields.Integer(required=True)
    pbx = fields.String(allow_none=True)
    pbx_call_id = fields.String(allow_none=True)
    b24_call_id = fields.String(allow_none=True, metadata={"description": "Bitrix24 CALL_ID once registered"})
    portal = fields.String(required=True)
    stage = fields.String(required=True, metadata={"description": "new | registered | finished"})


class EventSchema(Schema):
    """`GET /v1/events/{event_id}`: one stored inbound event and what became of it (never its body)."""

    id = fields.Integer(required=True)
    source = fields.String(required=True, metadata={"description": "pbx | stt"})
    provider = fields.String(required=True, metadata={"description": "the PBX or vendor route, e.g. generic"})
    received_at = fields.DateTime(required=True)
    content_type = fields.String(allow_none=True)
    query = fields.Dict(required=True, metadata={"description": "the hook URL's query, without the token"})
    body_bytes = fields.Integer(required=True, metadata={"description": "size of the stored body (0 once purged)"})
    state = fields.String(required=True, metadata={"description": "accepted | rejected | replaying | replayed"})
    outcome = fields.String(
        required=True,
        metadata={
            "description": "accepted (stored, not yet folded into its call) | folded (its call, transcript and "
            "jobs exist) | rejected (can never be processed as it is: see reason and fields) | failed (stored, "
            "but folding it gave up: see reason) | replayed (rejected, then stored again as replayed_as)"
        },
    )
    reason = fields.String(allow_none=True, metadata={"description": "why it was rejected, failed or replayed"})
    fields_ = fields.Dict(
        data_key="fields", allow_none=True, metadata={"description": "rejected: each bad field with its messages"}
    )
    replayed_as = fields.Integer(allow_none=True, metadata={"description": "the event a replay stored"})
    purged_at = fields.DateTime(
        allow_none=True, metadata={"description": "when retention emptied its body and its transcript's text"}
    )
    call = fields.Nested(EventCallSchema, allow_none=True)
    transcripts = fields.List(fields.Nested(TranscriptStateSchema), required=True)
    jobs = fields.List(fields.Nested(JobSchema), required=True)


class PortalPacingSchema(Schema):
    """A portal's request pacing (B24SCRIBE_RATE_PER_SECOND, B24SCRIBE_RATE_BURST), shared by every worker."""

    tokens = fields.Float(required=True, metadata={"description": "requests it may send at once now"})
    paused_until = fields.DateTime(
        allow_none=True, metadata={"description": "Bitrix24 made the service pause it until then; null: not paused"}
    )
    pause_reason = fields.String(allow_none=True, metadata={"description": "why it is paused"})


class PortalJobsSchema(Schema):
    """How many of a portal's jobs are still to go, or given up."""

    waiting = fields.Integer(required=True)
    pending = fields.Integer(required=True)
    dead = fields.Integer(required=True)


class PortalSchema(Schema):
    """A Bitrix24 portal: a webhook portal of the settings, or one that installed the local application."""

    name = fields.String(required=True, metadata={"description": "its domain; what ?portal= and calls name it by"})
    kind = fields.String(required=True, metadata={"description": "webhook | application"})
    member_id = fields.String(allow_none=True, metadata={"description": "Bitrix24's id of an installed portal"})
    state = fields.String(
        required=True,
        metadata={
            "description": "configured (a webhook portal) | installed | needs_reinstall (the refresh token was "
            "refused: its jobs wait) | uninstalled (its jobs wait)"
        },
    )
    state_reason = fields.String(allow_none=True, metadata={"description": "why it needs re-install or was removed"})
    fix = fields.String(allow_none=True, metadata={"description": "what to do about its state; null: nothing"})
    inbound_token = fields.String(
        allow_none=True,
        metadata={"description": "its own inbound token: opens this portal's hooks only and selects it; null: none"},
    )
    installed_at = fields.DateTime(allow_none=True, metadata={"description": "installed portals only"})
    refreshed_at = fields.DateTime(allow_none=True, metadata={"description": "its OAuth token's last refresh"})
    refreshes = fields.Integer(allow_none=True, metadata={"description": "OAuth token refreshes since installed"})
    pacing = fields.Nested(PortalPacingSchema, allow_none=True, metadata={"description": "null: nothing sent yet"})
    jobs = fields.Nested(PortalJobsSchema, required=True)


class PortalListSchema(Schema):
    """`GET /v1/portals`."""

    portals = fields.List(fields.Nested(PortalSchema), required=True)


class CheckSchema(Schema):
    """One readiness check."""

    ok = fields.Boolean(required=True)
    error = fields.String(metadata={"description": "database: the exception's class name"})
    heartbeat_age_seconds = fields.Float(allow_none=True)
    oldest_due_job_age_seconds = fields.Float()


class ReadinessSchema(Schema):
    """`GET /readyz`."""

    status = fields.String(required=True, metadata={"description": "ok | unavailable"})
    checks = fields.Dict(keys=fields.String(), values=fields.Nested(CheckSchema), required=True)
    portals = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        metadata={
            "description": "each portal's state by name: configured (webhook) | installed | needs_reinstall | "
            "uninstalled; informative, readiness does not depend on it. Absent when the database cannot be read"
        },
    )


class LivenessSchema(Schema):
    """`GET /livez`."""

    status = fields.String(required=True, metadata={"description": "always ok"})


SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    "inboundBearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "Authorization: Bearer <B24SCRIBE_INBOUND_TOKEN> (Basic with the token as password works too)",
    },
    "inboundQueryToken": {
        "type": "apiKey",
        "in": "query",
        "name": "token",
        "description": "?token=<B24SCRIBE_INBOUND_TOKEN>, for senders that can only set a URL; redacted in logs",
    },
    "adminBearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "Authorization: Bearer <B24SCRIBE_ADMIN_TOKEN>",
    },
    "metricsBearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "Authorization: Bearer <B24SCRIBE_METRICS_TOKEN>, needed only when that token is set",
    },
}
ADMIN_SECURITY: list[dict[str, list[str]]] = [{"adminBearer": []}]
NO_SECURITY: list[dict[str, list[str]]] = []
METRICS_SECURITY: list[dict[str, list[str]]] = [{"metricsBearer": []}]


class ScribeApi(Api):
    """flask-smorest's Api with our error shape; handlers/errors.py answers errors, not flask-smorest."""

    ERROR_SCHEMA = ErrorSchema

    def _register_error_handlers(self) -> None:
        """Keep the app's own handlers."""


def _version() -> str:
    try:
        return version("b24scribe")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "0.0.0"


def init_api(app: Flask) -> ScribeApi:
    """Configure the OpenAPI document and serve it at /openapi.json (no UI: it would need a CDN)."""
    app.config.update(
        API_TITLE="b24scribe",
        API_VERSION=_version(),
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        API_SPEC_OPTIONS={
            "info": {
                "description": "Phone calls and their transcripts into Bitrix24. PBXs POST call events to "
                "/hooks/pbx/{pbx}, speech-to-text vendors POST transcripts to /hooks/stt/{vendor}; a durable "
                "outbox registers and finishes each call in Bitrix24 and attaches its transcript. The admin "
                "API under /v1 shows calls and jobs and replays dead jobs.",
            },
        },
    )
    api = ScribeApi(app)
    api.register_field(StartedAt, "string", "date-time")
    for name, scheme in SECURITY_SCHEMES.items():
        api.spec.components.security_scheme(name, scheme)
    return api


# -- the hooks: raw vendor bodies, documented here so handlers/hooks.py stays about behaviour ---------

VendorBody = {
    "type": "object",
    "additionalProperties": True,
    "description": "a vendor's own callback body, as the vendor sends it (see the README for each vendor)",
}


def _query(name: str, description: str, enum: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if enum:
        schema["enum"] = enum
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


PORTAL_PARAMETER = _query("portal", "the Bitrix24 portal to deliver to, by name (B24SCRIBE_BITRIX24_PORTALS)")
ROLES = ["caller", "callee", "user", "client"]
STT_PARAMETERS = [
    _query("pbx", "the PBX that reported the call (with `call`)"),
    _query("call", "the PBX's call id (with `pbx`)"),
    _query("b24_call_id", "a Bitrix24 CALL_ID of a call registered by something else"),
    _query("channel", "the file holds this one channel of a stereo recording", ["0", "1"]),
    _query(
        "parts",
        "2: the call's transcript comes as two files, one per channel; the first waits for the second "
        "(at most 10 minutes) before it is attached",
        ["1", "2"],
    ),
    _query("channel0", "who speaks on channel 0 (overrides B24SCRIBE_CHANNEL0)", ROLES),
    _query("first_speaker", "who the first diarized speaker is (overrides B24SCRIBE_FIRST_SPEAKER)", ROLES),
    _query("direction", "the call's direction, for a call registered by something else", ["inbound", "outbound"]),
    PORTAL_PARAMETER,
]
HOOK_ERRORS = [
    (
        400,
        "the request cannot be read: a broken chunked body, a body shorter than its Content-Length, or more than "
        "200 query fields; nothing is stored",
    ),
    (401, "authentication failed (missing or wrong token or signature); nothing is stored"),
    (403, "authentication failed (a vendor's own scheme refused the request); nothing is stored"),
    (404, "no such vendor or PBX"),
    (408, "the body did not arrive within B24SCRIBE_BODY_TIMEOUT_SECONDS (30 s); nothing is stored"),
    (
        413,
        "the body is over the route's limit: PBX events 64 KiB, transcripts B24SCRIBE_MAX_BODY_BYTES "
        "(default 20 MiB); nothing is stored",
    ),
    (
        422,
        "the payload can never be processed: `fields` names each bad field; it is kept as a rejected event "
        "(`fields.event_id`) to replay after a fix",
    ),
    (503, "hooks are disabled (no B24SCRIBE_INBOUND_TOKEN), or the event could not be stored: retry"),
]

HOOKS_TAG = {
    "name": "hooks",
    "description": "Inbound webhooks from PBXs and speech-to-text vendors, one route per source of the registry. "
    "Every hook authenticates before anything is stored; a 2xx answer means the event is durably stored.",
}
_TOKEN_SECURITY: list[dict[str, list[str]]] = [{"inboundBearer": []}, {"inboundQueryToken": []}]


def _security_name(scheme: SignatureScheme) -> str:
    """A signature scheme's name as an OpenAPI security scheme: `standard-webhooks` → `standardWebhooks`."""
    first, *rest = scheme.name.split("-")
    return first + "".join(part.title() for part in rest)


def _hook_security(api: Api, sources: Iterable[Source]) -> list[dict[str, list[str]]]:
    """The token schemes every hook takes, then each signature scheme one of these sources accepts."""
    security = list(_TOKEN_SECURITY)
    for source in sources:
        for scheme in source.signatures:
            name = _security_name(scheme)
            if {name: []} in security:
                continue
            if name not in api.spec.components.security_schemes:
                api.spec.components.security_scheme(
                    name,
                    {
                        "type": "apiKey",
                        "in": "header",
                        "name": scheme.signature_header,
                        "description": scheme.description,
                    },
                )
            security.append({name: []})
    return security


def _hook_operation(
    api: Api, kind: str, sources: Mapping[str, Source], request_body: dict[str, Any], parameters: list[dict[str, Any]]
) -> dict[str, Any]:
    noun = "PBX" if kind == "pbx" else "STT vendor"
    names = sorted(sources)
    listing = "\n".join(f"- `{name}`: {sources[name].summary or name}" for name in names)
    name_parameter = {
        "name": kind if kind == "pbx" else "vendor",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "enum": names},
        "description": f"the {noun}, one of the registry's",
    }
    responses: dict[str, Any] = {
        "202": {
            "description": "the event is durably stored",
            "content": {"application/json": {"schema": EventStoredSchema}},
        },
        "200": {
            "description": "a duplicate of a stored event",
            "content": {"application/json": {"schema": EventStoredSchema}},
        },
    }
    for status, description in HOOK_ERRORS:
        responses[str(status)] = {"description": description, "content": {"application/json": {"schema": ErrorSchema}}}
    return {
        "tags": ["hooks"],
        "summary": "A call life-cycle event from a PBX"
        if kind == "pbx"
        else "A transcript callback from an STT vendor",
        "description": f"Sources:\n{listing}",
        "operationId": f"{kind}_hook",
        "security": _hook_security(api, sources.values()),
        "parameters": [name_parameter, *parameters],
        "requestBody": request_body,
        "responses": responses,
    }


def document_hooks(api: Api, sources: Sources) -> None:
    """Document `POST /hooks/pbx/{pbx}` and `POST /hooks/stt/{vendor}` from the registry: the names,
    each source's body schema (ours where we define one, else the vendor's own object), credentials."""
    api.spec.tag(HOOKS_TAG)
    by_type: dict[str, list[Any]] = {}
    for pbx in sources.pbx.values():
        if pbx.openapi_schema is not None:
            content_type = "application/json" if pbx.encoding == "json" else "application/x-www-form-urlencoded"
            by_type.setdefault(content_type, []).append(pbx.openapi_schema)
    pbx_body = {
        "required": True,
        "description": "a JSON call event, or the same fields form-encoded (Asterisk's dialplan CURL()), "
        "in the body or the query string; see each PBX",
        "content": {
            content_type: {"schema": found[0] if len(found) == 1 else {"oneOf": found}}
            for content_type, found in by_type.items()
        },
    }
    ours = [vendor.openapi_schema for vendor in sources.stt.values() if vendor.openapi_schema is not None]
    stt_body = {
        "required": True,
        "description": "`generic`: our transcript format; any other vendor: its own callback body, read raw",
        "content": {"application/json": {"schema": {"oneOf": [*ours, VendorBody]}}},
    }
    # flask-smorest's path helper reads a werkzeug rule (bound to a map, as Flask's are); the hooks'
    # own application serves the paths, so the rules exist only to be documented
    pbx_rule, stt_rule = Rule("/hooks/pbx/<pbx>", defaults={}), Rule("/hooks/stt/<vendor>", defaults={})
    Map([pbx_rule, stt_rule])
    api.spec.path(
        rule=pbx_rule, operations={"post": _hook_operation(api, "pbx", sources.pbx, pbx_body, [PORTAL_PARAMETER])}
    )
    api.spec.path(
        rule=stt_rule, operations={"post": _hook_operation(api, "stt", sources.stt, stt_body, STT_PARAMETERS)}
    )
