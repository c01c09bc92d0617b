"""schemathesis against the committed openapi.json, in-process against the WSGI app, every operation,
with its credentials: no 5xx, every answer conforms to the document (status, content type, body
schema, headers), and every accepted hook event is processed (tests/fuzz/invariants.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import schemathesis
from flask import Flask
from hypothesis import given
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.core import NotSet
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import positive_data_acceptance

from schemas.registry import PBX_SOURCES as PBX_PARSERS
from schemas.registry import STT_VENDORS
from tests.conftest import admin, auth
from tests.fuzz.conftest import FUZZ_SETTINGS
from tests.fuzz.invariants import Finding, Fuzzer, area_of, assert_clean, describe

DOCUMENT = Path(__file__).resolve().parent.parent.parent / "openapi.json"
SCHEMA = schemathesis.openapi.from_path(str(DOCUMENT))
SCHEMA.config.update(base_url="http://localhost")  # requests go to the WSGI app; this only names the host


def operations() -> dict[str, APIOperation[Any, Any, Any, Any]]:
    """Every operation of the document by its label (an operation the document gets wrong fails here)."""
    found = {}
    for result in SCHEMA.get_all_operations():
        assert isinstance(result, Ok), f"openapi.json has an operation schemathesis cannot read: {result}"
        found[result.ok().label] = result.ok()
    return found


OPERATIONS = operations()
# 5xx are counted by the fuzzer itself (with the server's traceback), so schemathesis' own check is left out
EXCLUDED_CHECKS: list[CheckFunction] = [not_a_server_error]
# A hook checks more than its body schema says (the call a transcript names, a segment's end after its
# start, …) and answers 422 naming the field, as documented: a schema-valid body may be refused.
HOOK_EXCLUDED_CHECKS: list[CheckFunction] = [*EXCLUDED_CHECKS, positive_data_acceptance]


def is_accepted_negative(failure: BaseException) -> bool:
    return "Schema-violating request accepted" in str(failure)


def is_injected(failure: BaseException) -> bool:
    """A "negative" case made valid by this test: it always adds the credentials (so a case whose
    only fault was a missing Authorization is not one), and unknown query fields are ignored by
    design (a dashboard may add its own)."""
    text = str(failure)
    if not is_accepted_negative(failure):
        return False
    invalid = text.split("Invalid component:", 1)[-1]
    components = [part.strip() for part in invalid.split(" - ") if part.strip()]
    return all(part.startswith("header:") or "additionalProperties" in part for part in components)


def credentials(label: str) -> dict[str, str]:
    """The credentials each part of the API takes (the security schemes of the document)."""
    if " /v1/" in label:
        return admin()
    if " /hooks/" in label:
        return auth()
    return {}


def test_every_operation_of_the_document_is_fuzzed() -> None:
    assert set(OPERATIONS) >= {
        "POST /hooks/stt/{vendor}",
        "POST /hooks/pbx/{pbx}",
        "GET /v1/jobs",
        "GET /livez",
        "GET /readyz",
        "GET /metrics",
    }


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_the_api_conforms_to_its_openapi_document(app: Flask, fuzz: Fuzzer, label: str) -> None:
    SCHEMA.app = app  # this test's app: schemathesis' checks that send more requests send them here too
    operation = operations()[label]
    # the document does not enumerate the hooks' names, so every generated {pbx} or {vendor} would be
    # a 404: each known name is fuzzed instead (a random one too)
    names = [{"pbx": name} for name in PBX_PARSERS] if "{pbx}" in label and "/hooks/" in label else []
    names += [{"vendor": name} for name in STT_VENDORS] if "{vendor}" in label else []
    # and a transcript names its call in the URL (contract §3.3), which the document leaves optional
    queries = [{"pbx": "generic", "call": "schemathesis-1"}, None] if "{vendor}" in label else [None]
    strategy = st.one_of(
        *[
            operation.as_strategy(generation_mode=mode, path_parameters=fixed, query=query)
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
            for fixed in [*names, None]
            for query in queries
        ]
    )
    family = f"openapi {label}"

    @FUZZ_SETTINGS
    @given(case=strategy)
    def run(case: Case[Any]) -> None:
        headers = credentials(label)
        response = case.call(app=app, headers=headers)
        query = "?" + urlencode(case.query, doseq=True, errors="surrogatepass") if case.query else ""
        body = None if isinstance(case.body, NotSet) else repr(case.body).encode()[:300]
        request = describe(case.method, case.formatted_path + query, body)
        documented = {503} if label == "GET /readyz" else ()  # not ready: no worker heartbeat in a test
        fuzz.observe(family, request, response.status_code, response.content or b"", documented)
        try:
            case.validate_response(
                response,
                excluded_checks=HOOK_EXCLUDED_CHECKS if "/hooks/" in label else EXCLUDED_CHECKS,
                headers=headers,
                transport_kwargs={"app": app},
            )
        except FailureGroup as failures:
            for failure in failures.exceptions:
                if is_injected(failure) or (is_accepted_negative(failure) and 400 <= response.status_code < 500):
                    continue  # made valid by this test, or refused with a 4xx schemathesis does not list (413)
                detail = f"{type(failure).__name__}: {' '.join(str(failure).split())[:300]}"
                fuzz.add(Finding(family, "nonconforming", request, response.status_code, detail, area_of(family, "")))
        fuzz.settle()

    run()
    assert_clean(fuzz, label)
