"""From a hook's raw bytes and URL query to what the core stores: the parse step of every hook.

The hooks (handlers/hooks.py), the worker's fold and `flask events replay` all call these functions
with the registry the app handed them, so a stored event replayed after a fix goes through exactly
the code a new request would. Each raises marshmallow's ValidationError naming the bad fields;
nothing here touches the request or the database.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl

from marshmallow import ValidationError

from b24scribe.events import CallEvent, TranscriptOptions
from b24scribe.limits import MAX_PORTAL_LENGTH, check_reference, id_problem
from b24scribe.messages import check_attributable
from b24scribe.settings import Settings
from b24scribe.sources import Sources
from b24scribe.transcript import CallReference, Direction, Role, VendorResult


@dataclass(frozen=True, slots=True)
class ParsedTranscript:
    """A transcript callback, read: the vendor's result, the call it names and the URL's options."""

    result: VendorResult
    reference: CallReference
    options: TranscriptOptions
    # the query naming the call that the vendor's job id found (the callback named none itself)
    named_by_job: dict[str, str] | None = None


def _one_of(query: Mapping[str, str], name: str, allowed: list[str]) -> str | None:
    value = query.get(name)
    if value is None:
        return None
    if value not in allowed:
        raise ValidationError({name: [f"must be one of: {', '.join(allowed)}"]})
    return value


def channel_slot(query: Mapping[str, str]) -> int | None:
    """`?channel=0|1` (contract §6.3): the recording holds only that channel of the call; None when
    absent or empty (a URL template with nothing filled in). The hooks and every vendor's parser read
    it here."""
    value = (query.get("channel") or "").strip()
    if not value:
        return None
    if value not in ("0", "1"):
        raise ValidationError({"channel": ["Must be 0 or 1: the one channel of the call this recording holds."]})
    return int(value)


def transcript_options(query: Mapping[str, str]) -> TranscriptOptions:
    """`?channel=`, `?channel0=`, `?first_speaker=` and `?direction=` of a transcript callback URL."""
    roles = [r.value for r in Role]
    channel = channel_slot(query)
    overrides = {
        name: value for name in ("channel0", "first_speaker") if (value := _one_of(query, name, roles)) is not None
    }
    direction = _one_of(query, "direction", [d.value for d in Direction])
    if (query.get("parts") or "").strip() not in ("", "1", "2"):
        why = "Must be 1 or 2: how many files (one per channel) make up the call's transcript."
        raise ValidationError({"parts": [why]})
    return TranscriptOptions(
        channel_slot=channel,
        side_overrides=overrides,
        direction=Direction(direction) if direction else None,
    )


def call_reference(
    sources: Sources, query: Mapping[str, str], payload_reference: CallReference, unnamed_ok: bool = False
) -> CallReference:
    """The call named by the URL and/or the vendor's metadata; they must agree (contract §3.3)."""
    url = CallReference(
        pbx=query.get("pbx") or None,
        pbx_call_id=query.get("call") or None,
        b24_call_id=query.get("b24_call_id") or None,
    )
    errors: dict[str, list[str]] = {}
    for attribute, name in (("pbx", "pbx"), ("pbx_call_id", "call"), ("b24_call_id", "b24_call_id")):
        from_url, from_payload = getattr(url, attribute), getattr(payload_reference, attribute)
        if from_url and from_payload and from_url != from_payload:
            errors[name] = [f"the URL says {from_url!r} but the payload says {from_payload!r}"]
    if errors:
        raise ValidationError(errors)
    check_reference(url)  # the payload's own reference was checked with the vendor's result
    merged = CallReference(
        pbx=url.pbx or payload_reference.pbx,
        pbx_call_id=url.pbx_call_id or payload_reference.pbx_call_id,
        b24_call_id=url.b24_call_id or payload_reference.b24_call_id,
        # the URL's ?portal= wins (it may name the portal by its domain or member_id)
        portal=None if query.get("portal") else payload_reference.portal,
    )
    if merged.pbx is not None:
        pbx = sources.pbx.get(merged.pbx)
        if pbx is None:
            # accepted, its transcript would wait for a call no hook can ever report
            raise ValidationError(
                {"pbx": [f"must be one of: {', '.join(sources.pbx)} (the PBX hook that reports the call)"]}
            )
        if pbx.form and merged.pbx_call_id is not None:
            # a form PBX's hook strips its values, so its call " x " is "x": name it the same way
            merged = replace(merged, pbx_call_id=merged.pbx_call_id.strip() or None)
    if merged.b24_call_id is None:
        if merged.pbx_call_id is None and merged.pbx is None and unnamed_ok:
            return merged  # the vendor's fetch names the call (b24scribe.delivery.fetches places it)
        if merged.pbx_call_id is None:
            raise ValidationError(
                {"call": ["name the call: add ?pbx=<pbx>&call=<pbx call id> or ?b24_call_id=<CALL_ID> to the URL"]}
            )
        if merged.pbx is None:
            raise ValidationError({"pbx": ["name the PBX the call id belongs to, e.g. ?pbx=asterisk"]})
    return merged


# the call b24scribe submitted to `vendor` as its job `job_id`, as the query naming it (pbx, call and,
# unless it is the settings' own, portal); None: no such submission
SubmittedCall = Callable[[str, str], dict[str, str] | None]


def parse_transcript(
    sources: Sources,
    vendor: str,
    body: bytes,
    query: Mapping[str, str],
    submitted: SubmittedCall | None = None,
) -> ParsedTranscript:
    """Read a transcript callback of a registered vendor (KeyError for an unknown one).

    A callback that names no call, neither in its URL nor in the vendor's metadata, but carries the
    id of a job b24scribe submitted (contract §10), names that job's call: `submitted` looks it up,
    and `ParsedTranscript.named_by_job` is what the stored event's query must add."""
    adapter = sources.stt[vendor]
    options = transcript_options(query)
    result = adapter.parse(body, query)
    named_by_job: dict[str, str] | None = None
    if submitted is not None and result.vendor_job_id and _names_no_call(query, result.reference):
        named_by_job = submitted(vendor, result.vendor_job_id)
        if named_by_job:
            query = {**query, **named_by_job}
    # a job's result or failure that only the vendor's job can place (its tags, its properties)
    unnamed_ok = adapter.fetch_names_call and result.status in ("fetch", "failed")
    reference = call_reference(sources, query, result.reference, unnamed_ok)
    if result.status == "completed" and result.transcript is not None:
        check_attributable(result.transcript)
    return ParsedTranscript(result, reference, options, named_by_job)


def _names_no_call(query: Mapping[str, str], reference: CallReference) -> bool:
    return not (query.get("call") or query.get("b24_call_id") or query.get("pbx")) and reference.is_empty()


# The hooks refuse larger forms before parsing; this bounds the replay path too.
MAX_FORM_FIELDS = 200


def parse_form(body: bytes) -> dict[str, str]:
    """A form-encoded body; the first value of a repeated field wins."""
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    except UnicodeDecodeError:
        raise ValidationError({"_body": ["the form body is not UTF-8"]}) from None
    except ValueError:  # parse_qsl: more than max_num_fields
        raise ValidationError({"_body": [f"the form has more than {MAX_FORM_FIELDS} fields"]}) from None
    form: dict[str, str] = {}
    for key, value in pairs:
        form.setdefault(key, value)
    return form


def parse_call_event(sources: Sources, pbx: str, body: bytes, query: Mapping[str, str]) -> CallEvent:
    """Read a PBX's call event (KeyError for an unknown PBX)."""
    return sources.pbx[pbx].parse(body, query)


def form_fields(body: bytes, query: Mapping[str, str]) -> dict[str, str]:
    """A form PBX's fields: its form body, or (with no body) the query, without `token`."""
    form: Mapping[str, str] = parse_form(body) if body else query
    return {key: value for key, value in form.items() if key != "token"}


def resolve_portal(settings: Settings, query: Mapping[str, str]) -> str:
    """The portal a hook URL delivers to: `?portal=<name>`, else the default one."""
    name = query.get("portal")
    if name is None or name == settings.portal:
        return settings.portal
    known = settings.portal_urls()
    if settings.app_mode and name not in known:
        # an installed portal's name, as the hook stored it after resolving it (contract §8)
        if (problem := id_problem(name, MAX_PORTAL_LENGTH)) is not None:
            raise ValidationError({"portal": [problem]})
        return name
    if not known:
        if (problem := id_problem(name, MAX_PORTAL_LENGTH)) is not None:
            raise ValidationError({"portal": [problem]})
        return name  # dry-run: any printable label that fits the column is fine, nothing is sent
    if name not in known:
        raise ValidationError({"portal": [f"must be one of: {', '.join(sorted(known))}"]})
    return name
