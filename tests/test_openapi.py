"""The OpenAPI document: served at /openapi.json, committed as openapi.json, and it covers every endpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from openapi_spec_validator import validate

from schemas.registry import SOURCES

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "openapi.json"
REGENERATE = "flask --app app openapi write openapi.json"
NOT_IN_THE_API = {"static", "api-docs.openapi_json"}  # Flask's static files and the document itself


@pytest.fixture
def document(client: FlaskClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.content_type == "application/json"
    spec: dict[str, Any] = response.get_json()
    return spec


def test_the_committed_openapi_json_is_current(document: dict[str, Any]) -> None:
    committed = json.loads(COMMITTED.read_text())

    assert committed == document, f"openapi.json is out of date: run `{REGENERATE}` and commit it"


def test_the_export_command_writes_the_same_document(app: Flask, tmp_path: Path, document: dict[str, Any]) -> None:
    target = tmp_path / "openapi.json"

    result = app.test_cli_runner().invoke(args=["openapi", "write", str(target)])

    assert result.exit_code == 0, result.output
    assert json.loads(target.read_text()) == document


def test_the_document_is_valid_openapi_3(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"].startswith("3.")


def test_every_api_endpoint_is_documented(app: Flask, document: dict[str, Any]) -> None:
    documented = {(method.upper(), path) for path, operations in document["paths"].items() for method in operations}
    for rule in app.url_map.iter_rules():
        if rule.endpoint in NOT_IN_THE_API or rule.endpoint.startswith("status."):
            continue  # the status page is HTML for people, not part of the API
        path = re.sub(r"<(?:[a-z]+(?:\([^)]*\))?:)?(\w+)>", r"{\1}", rule.rule)  # <int(max=…):id> → {id}
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            assert (method, path) in documented, f"{method} {path} is not in the OpenAPI document"


def _content_schema(response: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = response["content"]["application/json"]["schema"]
    return schema


@pytest.mark.parametrize("path", ["/hooks/stt/{vendor}", "/hooks/pbx/{pbx}"])
def test_hooks_document_their_answers_and_credentials(document: dict[str, Any], path: str) -> None:
    operation = document["paths"][path]["post"]
    responses = operation["responses"]

    for status in ("202", "200"):
        assert _content_schema(responses[status]) == {"$ref": "#/components/schemas/EventStored"}
    for status in ("401", "403", "404", "413", "422", "503"):
        assert _content_schema(responses[status]) == {"$ref": "#/components/schemas/Error"}, status
    # the token every hook takes, then each signature scheme a source of the registry accepts
    kind = "pbx" if "{pbx}" in path else "stt"
    schemes = {
        scheme.name.split("-")[0] + "".join(part.title() for part in scheme.name.split("-")[1:])
        for source in SOURCES.of(kind).values()
        for scheme in source.signatures
    }
    assert operation["security"][:2] == [{"inboundBearer": []}, {"inboundQueryToken": []}]
    assert {name for entry in operation["security"][2:] for name in entry} == schemes
    assert "standardWebhooks" in schemes
    for name in schemes:
        assert document["components"]["securitySchemes"][name]["type"] == "apiKey"
    assert operation["requestBody"]["required"] is True


def test_hook_bodies_are_our_generic_formats_or_a_vendors_own_object(document: dict[str, Any]) -> None:
    stt = document["paths"]["/hooks/stt/{vendor}"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    pbx = document["paths"]["/hooks/pbx/{pbx}"]["post"]["requestBody"]["content"]
    schemas = document["components"]["schemas"]

    assert {"$ref": "#/components/schemas/GenericTranscript"} in stt["oneOf"]
    assert stt["oneOf"][-1]["type"] == "object"  # any other vendor's own body
    json_body = pbx["application/json"]["schema"]
    assert {"$ref": "#/components/schemas/GenericCallEvent"} in json_body.get("oneOf", [json_body])
    assert "application/x-www-form-urlencoded" in pbx
    assert schemas["GenericCallEvent"]["properties"]["event"]["enum"] == [
        "call.started",
        "call.answered",
        "call.finished",
        "recording.ready",
    ]
    assert {"segments"} <= set(schemas["GenericTranscript"]["required"])
    assert set(schemas["GenericSegment"]["properties"]) >= {"start", "end", "text", "side", "channel", "speaker"}
    assert set(schemas["EventStored"]["properties"]) == {"event_id", "duplicate"}


def test_the_error_shape_is_the_one_the_service_answers(document: dict[str, Any], client: FlaskClient) -> None:
    error = document["components"]["schemas"]["Error"]
    detail = document["components"]["schemas"]["ErrorDetail"]
    answered = client.get("/v1/jobs").get_json()

    assert error["required"] == ["error"]
    assert set(detail["properties"]) == {"code", "message", "fields"}
    assert set(answered) == {"error"} and set(answered["error"]) == set(detail["properties"])


def test_the_admin_api_documents_bearer_auth_and_its_bodies(document: dict[str, Any]) -> None:
    jobs = document["paths"]["/v1/jobs"]["get"]
    call = document["paths"]["/v1/calls/{pbx}/{pbx_call_id}"]["get"]

    assert jobs["security"] == [{"adminBearer": []}]
    assert _content_schema(jobs["responses"]["200"]) == {"$ref": "#/components/schemas/JobList"}
    assert {p["name"] for p in jobs["parameters"]} == {"state", "limit"}
    assert _content_schema(call["responses"]["200"]) == {"$ref": "#/components/schemas/Call"}
    assert set(document["components"]["schemas"]["Call"]["properties"]) >= {"b24_call_id", "transcripts", "jobs"}
    retry = document["paths"]["/v1/jobs/{job_id}/retry"]["post"]["responses"]
    assert {"202", "401", "403", "404", "409"} <= set(retry)


def test_security_schemes(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]

    assert schemes["inboundBearer"] == {**schemes["inboundBearer"], "type": "http", "scheme": "bearer"}
    assert schemes["inboundQueryToken"]["in"] == "query" and schemes["inboundQueryToken"]["name"] == "token"
    assert schemes["adminBearer"]["scheme"] == "bearer"
    assert document["paths"]["/livez"]["get"]["security"] == []
    assert "503" in document["paths"]["/readyz"]["get"]["responses"]


def test_a_documented_answer_matches_what_the_hook_answers(client: FlaskClient, document: dict[str, Any]) -> None:
    from tests.conftest import auth
    from tests.operations import FINISHED

    body = client.post("/hooks/pbx/generic", json=FINISHED, headers=auth()).get_json()

    assert set(body) == set(document["components"]["schemas"]["EventStored"]["required"])


def test_the_events_api_is_documented_with_its_outcomes(document: dict[str, Any]) -> None:
    event = document["paths"]["/v1/events/{event_id}"]["get"]
    parameter = document["paths"]["/v1/events/{event_id}"]["parameters"][0]
    schema = document["components"]["schemas"]["Event"]

    assert event["security"] == [{"adminBearer": []}]
    assert _content_schema(event["responses"]["200"]) == {"$ref": "#/components/schemas/Event"}
    assert {"200", "401", "403", "404"} <= set(event["responses"])
    assert parameter["schema"]["maximum"] == 2**63 - 1  # a larger id is a 404, as documented
    assert {"received_at", "source", "provider", "outcome", "reason", "call", "transcripts", "jobs"} <= set(
        schema["properties"]
    )
    for outcome in ("accepted", "folded", "rejected"):
        assert outcome in schema["properties"]["outcome"]["description"]


def test_metrics_and_readiness_document_the_optional_metrics_token(document: dict[str, Any]) -> None:
    assert document["components"]["securitySchemes"]["metricsBearer"]["scheme"] == "bearer"
    for path in ("/metrics", "/readyz"):
        operation = document["paths"][path]["get"]
        assert operation["security"] == [{"metricsBearer": []}, {}], path  # the token, or none when it is unset
        assert "401" in operation["responses"]
