"""What a source adapter is: the shape every vendor module exports as `VENDOR`."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from marshmallow import ValidationError

from b24scribe.transcript import VendorResult

# parse(raw_body, query) -> VendorResult; raises marshmallow.ValidationError naming each bad field.
Parser = Callable[[bytes, Mapping[str, str]], VendorResult]


@dataclass(frozen=True, slots=True)
class FetchSpec:
    """How to fetch a finished transcript from a vendor whose callback carries only an id.

    `path` is formatted with `{id}` and appended to the vendor API base URL
    (`B24SCRIBE_<VENDOR>_API_URL`, default `default_api_url`); `headers(api_key)` gives the
    request headers; `parse` turns the fetched body into a VendorResult.
    """

    default_api_url: str
    path: str
    headers: Callable[[str], dict[str, str]]
    parse: Parser


@dataclass(frozen=True, slots=True)
class SttVendor:
    """One speech-to-text vendor: how its callback is read and, if needed, fetched."""

    name: str
    parse: Parser
    fetch: FetchSpec | None = None
    # Header carrying the vendor's own shared-secret auth, compared to B24SCRIBE_INBOUND_TOKEN
    # (e.g. AssemblyAI's webhook_auth_header_name); bearer/?token=/Basic are always accepted.
    auth_header: str | None = None


def load_json(raw_body: bytes) -> Any:
    """The decoded JSON body; a ValidationError on `_schema` when it is not JSON (a 422, not a 500)."""
    try:
        return json.loads(raw_body)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise ValidationError({"_schema": [f"The body is not valid JSON ({type(error).__name__})."]}) from None
