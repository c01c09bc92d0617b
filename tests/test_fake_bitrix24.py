"""The fake Bitrix24 behaves like the real one towards incoming webhooks, over real HTTP."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from fake_bitrix24 import (
    CALL_NOT_REGISTERED,
    USER_INACTIVE,
    USER_NOT_SET,
    FakeBitrix24,
    parse_php_form,
    php_int,
)

pytest_plugins = ["tests.fake_bitrix24"]

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 5.0


# --- helpers -------------------------------------------------------------------------------


def call(
    fake: FakeBitrix24, method: str, params: dict[str, Any] | None = None, *, url: str | None = None
) -> requests.Response:
    """POST a JSON body to a webhook method (default: the default portal's webhook)."""
    return requests.post((url or fake.webhook_url) + method, json=params or {}, timeout=TIMEOUT)


def error_of(response: requests.Response) -> tuple[int, str, str]:
    body = response.json()
    return response.status_code, body["error"], body["error_description"]


def register(fake: FakeBitrix24, url: str | None = None, **params: Any) -> str:
    payload = {"USER_PHONE_INNER": "101", "PHONE_NUMBER": "+15551234567", "TYPE": 2, **params}
    response = call(fake, "telephony.externalCall.register", payload, url=url)
    assert response.status_code == 200, response.text
    return str(response.json()["result"]["CALL_ID"])


def finish(fake: FakeBitrix24, call_id: object, url: str | None = None, **params: Any) -> requests.Response:
    return call(fake, "telephony.externalCall.finish", {"CALL_ID": call_id, "USER_ID": 1, **params}, url=url)


def finished_call(fake: FakeBitrix24, url: str | None = None, **params: Any) -> str:
    call_id = register(fake, url=url, **params)
    assert finish(fake, call_id, url=url, DURATION=30).status_code == 200
    return call_id


def message(**overrides: Any) -> dict[str, Any]:
    return {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good afternoon", **overrides}


def attach(fake: FakeBitrix24, call_id: object, messages: object, url: str | None = None) -> requests.Response:
    return call(fake, "telephony.call.attachTranscription", {"CALL_ID": call_id, "MESSAGES": messages}, url=url)


# --- transport -----------------------------------------------------------------------------


def test_success_carries_result_and_the_full_time_block(fake_bitrix24: FakeBitrix24) -> None:
    response = call(fake_bitrix24, "scope")

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    body = response.json()
    assert body["result"] == ["telephony", "user"]
    assert set(body["time"]) == {
        "start",
        "finish",
        "duration",
        "processing",
        "date_start",
        "date_finish",
        "operating_reset_at",
        "operating",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", body["time"]["date_start"])


def test_operating_fields_can_be_left_out_of_time(fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.configure(operating_in_time=False)

    time_block = call(fake_bitrix24, "scope").json()["time"]

    assert "operating" not in time_block
    assert "operating_reset_at" not in time_block


@pytest.mark.parametrize("method", ["user.current", "USER.CURRENT", "user.current.json", "User.Current.JSON"])
def test_method_names_are_case_insensitive_with_optional_json_suffix(fake_bitrix24: FakeBitrix24, method: str) -> None:
    response = call(fake_bitrix24, method)

    assert response.status_code == 200
    assert response.json()["result"]["ID"] == "1"
    assert fake_bitrix24.requests[-1].method == "user.current"


def test_get_with_query_string_works(fake_bitrix24: FakeBitrix24) -> None:
    response = requests.get(
        fake_bitrix24.webhook_url + "telephony.externalCall.register",
        params={"USER_ID": "1", "PHONE_NUMBER": "555", "TYPE": "1"},
        timeout=TIMEOUT,
    )

    assert response.status_code == 200
    assert fake_bitrix24.requests[-1].http_method == "GET"


def test_unknown_method_is_404(fake_bitrix24: FakeBitrix24) -> None:
    assert error_of(call(fake_bitrix24, "crm.lead.nothing")) == (404, "ERROR_METHOD_NOT_FOUND", "Method not found!")


def test_unknown_webhook_code_is_invalid_credentials(fake_bitrix24: FakeBitrix24) -> None:
    response = call(fake_bitrix24, "scope", url=f"{fake_bitrix24.base_url}/rest/1/wrongcode/")

    assert error_of(response) == (401, "INVALID_CREDENTIALS", "Invalid request credentials")


def test_webhook_without_telephony_scope_is_insufficient_scope(fake_bitrix24: FakeBitrix24) -> None:
    url = fake_bitrix24.add_webhook(scopes=["crm"])

    status, code, _ = error_of(call(fake_bitrix24, "telephony.externalCall.register", {}, url=url))

    assert (status, code) == (401, "insufficient_scope")
    assert call(fake_bitrix24, "scope", url=url).json()["result"] == ["crm"]


def test_oauth_style_path_without_credentials_is_no_auth_found(fake_bitrix24: FakeBitrix24) -> None:
    response = call(fake_bitrix24, "scope", url=f"{fake_bitrix24.base_url}/rest/")

    assert error_of(response) == (401, "NO_AUTH_FOUND", "Wrong authorization data")


def test_webhook_can_be_refused_for_register_and_finish(fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.configure(deny_webhook_app_methods=True)
    expected = (403, "WRONG_AUTH_TYPE", "Current authorization type is denied for this method")

    assert error_of(call(fake_bitrix24, "telephony.externalCall.register", {})) == expected
    assert error_of(call(fake_bitrix24, "telephony.externalCall.finish", {})) == expected
    assert call(fake_bitrix24, "telephony.call.attachTranscription", {}).status_code == 400


def test_form_encoded_bracket_body_is_decoded_like_php(fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24)
    form = {
        "CALL_ID": call_id,
        "MESSAGES[0][SIDE]": "User",
        "MESSAGES[0][START_TIME]": "0",
        "MESSAGES[0][STOP_TIME]": "2",
        "MESSAGES[0][MESSAGE]": "Hello",
        "MESSAGES[1][SIDE]": "Client",
        "MESSAGES[1][START_TIME]": "2.7",
        "MESSAGES[1][STOP_TIME]": "4",
        "MESSAGES[1][MESSAGE]": "Hi",
        "COST": "0.12",
        "COST_CURRENCY": "USD",
    }

    response = requests.post(
        fake_bitrix24.webhook_url + "telephony.call.attachTranscription", data=form, timeout=TIMEOUT
    )

    assert response.status_code == 200, response.text
    transcript = fake_bitrix24.transcripts[response.json()["result"]["TRANSCRIPT_ID"]]
    assert transcript["messages"][1] == {"SIDE": "Client", "START_TIME": "2.7", "STOP_TIME": "4", "MESSAGE": "Hi"}
    assert (transcript["cost"], transcript["cost_currency"]) == (0.12, "USD")
    assert fake_bitrix24.requests[-1].params["MESSAGES"][0]["SIDE"] == "User"


def test_php_form_decoding_rules() -> None:
    pairs = [("A[]", "x"), ("A[]", "y"), ("B[5][K]", "v"), ("C.D", "1"), ("E[x][0]", "z")]

    assert parse_php_form(pairs) == {"A": ["x", "y"], "B": {"5": {"K": "v"}}, "C_D": "1", "E": {"x": ["z"]}}


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.8, 0), (1.9, 1), ("1.9", 1), ("0.8", 0), ("12abc", 12), ("abc", 0), (None, 0), (True, 1), ("1e3", 1000)],
)
def test_php_int_semantics(value: object, expected: int) -> None:
    assert php_int(value) == expected


# --- register ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "description"),
    [
        ({"PHONE_NUMBER": "555", "TYPE": 2}, USER_NOT_SET),
        ({"USER_PHONE_INNER": "999", "PHONE_NUMBER": "555", "TYPE": 2}, USER_NOT_SET),
        ({"USER_PHONE_INNER": "102", "PHONE_NUMBER": "555", "TYPE": 2}, USER_NOT_SET),  # inactive: lookup misses
        ({"PHONE_NUMBER": "anonymous", "TYPE": 9}, USER_NOT_SET),  # user is checked first
        ({"USER_ID": 1, "PHONE_NUMBER": "555", "TYPE": 9}, "Unknown TYPE"),
        ({"USER_ID": 1, "PHONE_NUMBER": "555"}, "Unknown TYPE"),
        ({"USER_ID": 1, "PHONE_NUMBER": "555", "TYPE": "2abc"}, "Unknown TYPE"),
        (
            {"USER_ID": 1, "PHONE_NUMBER": "x", "TYPE": 2, "CALL_START_DATE": "yesterday"},
            "CALL_START_DATE should be in the ISO-8601 format",
        ),
        ({"USER_ID": 1, "PHONE_NUMBER": "anonymous", "TYPE": 2}, "Unsupported phone number format"),
        ({"USER_ID": 1, "TYPE": 2}, "Unsupported phone number format"),
        ({"USER_ID": 2, "PHONE_NUMBER": "555", "TYPE": 2}, USER_INACTIVE),
        ({"USER_ID": 99, "PHONE_NUMBER": "555", "TYPE": 2}, USER_INACTIVE),
    ],
)
def test_register_validation_errors_in_bitrix24_order(
    fake_bitrix24: FakeBitrix24, params: dict[str, Any], description: str
) -> None:
    response = call(fake_bitrix24, "telephony.externalCall.register", params)

    assert error_of(response) == (400, "", description)
    assert fake_bitrix24.active_calls == {}


def test_validation_error_code_can_be_error_core(fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.configure(error_code="ERROR_CORE")

    response = call(fake_bitrix24, "telephony.externalCall.register", {"PHONE_NUMBER": "555", "TYPE": 2})

    assert error_of(response) == (400, "ERROR_CORE", USER_NOT_SET)


def test_register_accepts_loose_type_and_strips_the_phone(fake_bitrix24: FakeBitrix24) -> None:
    call_id = register(
        fake_bitrix24, TYPE="3", PHONE_NUMBER="+1 (555) 123-45#6", CALL_START_DATE="2026-03-07T10:20:30+03:00"
    )

    assert re.fullmatch(r"externalCall\.[0-9a-f]{32}\.\d+", call_id)
    active = fake_bitrix24.active_calls[call_id]
    assert (active.phone, active.call_type, active.user_id) == ("+155512345#6", 3, 1)
    assert active.start_date == "2026-03-07T10:20:30+03:00"


def test_register_echoes_crm_entity_only_when_both_are_given(fake_bitrix24: FakeBitrix24) -> None:
    response = call(
        fake_bitrix24,
        "telephony.externalCall.register",
        {"USER_ID": 1, "PHONE_NUMBER": "555", "TYPE": 2, "CRM_ENTITY_TYPE": "CONTACT", "CRM_ENTITY_ID": "797"},
    )

    result = response.json()["result"]
    assert result["CRM_CREATED_LEAD"] is None
    assert result["CRM_CREATED_ENTITIES"] == []
    assert (result["CRM_ENTITY_TYPE"], result["CRM_ENTITY_ID"]) == ("CONTACT", 797)


def test_register_without_external_id_returns_the_same_active_call(fake_bitrix24: FakeBitrix24) -> None:
    first = register(fake_bitrix24)
    second = register(fake_bitrix24, PHONE_NUMBER="+1 555 123 4567", CALL_START_DATE="2026-01-01T00:00:00+00:00")

    assert first == second
    assert len(fake_bitrix24.active_calls) == 1


def test_register_with_distinct_external_ids_creates_distinct_calls(fake_bitrix24: FakeBitrix24) -> None:
    first = register(fake_bitrix24, EXTERNAL_CALL_ID="pbx-1")
    second = register(fake_bitrix24, EXTERNAL_CALL_ID="pbx-2")
    again = register(fake_bitrix24, EXTERNAL_CALL_ID="pbx-1")
    unlabelled = register(fake_bitrix24)

    assert first != second
    assert again == first
    assert unlabelled == first  # without EXTERNAL_CALL_ID the filter ignores it


def test_register_dedup_considers_line_type_and_user(fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.add_user(3, "103")
    base = register(fake_bitrix24, LINE_NUMBER="line-a")

    assert register(fake_bitrix24, LINE_NUMBER="line-b") != base
    assert register(fake_bitrix24, LINE_NUMBER="line-a", TYPE=1) != base
    assert register(fake_bitrix24, LINE_NUMBER="line-a", USER_PHONE_INNER="103") != base


def test_register_dedup_window_is_thirty_minutes(fake_bitrix24: FakeBitrix24) -> None:
    first = register(fake_bitrix24)
    fake_bitrix24.advance_clock(29 * 60)
    assert register(fake_bitrix24) == first

    fake_bitrix24.advance_clock(2 * 60)

    assert register(fake_bitrix24) != first


def test_register_after_finish_creates_a_new_call(fake_bitrix24: FakeBitrix24) -> None:
    first = finished_call(fake_bitrix24)

    assert register(fake_bitrix24) != first


# --- finish --------------------------------------------------------------------------------


def test_finish_moves_the_call_to_statistics(fake_bitrix24: FakeBitrix24) -> None:
    call_id = register(fake_bitrix24, EXTERNAL_CALL_ID="pbx-7", LINE_NUMBER="+15550000000")

    response = finish(
        fake_bitrix24,
        call_id,
        DURATION=73,
        RECORD_URL="https://pbx.example/rec.wav",
        COST="1.5",
        COST_CURRENCY="USD",
        VOTE=5,
    )

    assert response.status_code == 200
    result = response.json()["result"]
    assert result["ID"] == 1
    assert result["CALL_START_DATE"] == {}
    assert (result["INCOMING"], result["CALL_STATUS"], result["REST_APP_NAME"]) == ("2", 1, False)
    row = fake_bitrix24.statistics[call_id]
    assert row["CALL_DURATION"] == 73
    assert row["CALL_FAILED_CODE"] == "200"
    assert row["CALL_RECORD_URL"] == "https://pbx.example/rec.wav"
    assert (row["COST"], row["COST_CURRENCY"], row["CALL_VOTE"]) == (1.5, "USD", 5)
    assert (row["EXTERNAL_CALL_ID"], row["PORTAL_NUMBER"]) == ("pbx-7", "+15550000000")
    assert (row["TRANSCRIPT_ID"], row["TRANSCRIPT_PENDING"]) == (None, "N")
    assert call_id not in fake_bitrix24.active_calls


@pytest.mark.parametrize(("duration", "status_code"), [(0, "304"), (5, "200")])
def test_finish_default_status_code_follows_duration(
    fake_bitrix24: FakeBitrix24, duration: int, status_code: str
) -> None:
    call_id = register(fake_bitrix24)

    finish(fake_bitrix24, call_id, DURATION=duration)

    assert fake_bitrix24.statistics[call_id]["CALL_FAILED_CODE"] == status_code


def test_finish_keeps_an_explicit_status_code(fake_bitrix24: FakeBitrix24) -> None:
    call_id = register(fake_bitrix24)

    finish(fake_bitrix24, call_id, DURATION=0, STATUS_CODE="486", FAILED_REASON="busy")

    assert fake_bitrix24.statistics[call_id]["CALL_FAILED_CODE"] == "486"
    assert fake_bitrix24.statistics[call_id]["CALL_FAILED_REASON"] == "busy"


def test_finish_validation_errors_in_bitrix24_order(fake_bitrix24: FakeBitrix24) -> None:
    call_id = register(fake_bitrix24)
    finish_method = "telephony.externalCall.finish"

    assert error_of(call(fake_bitrix24, finish_method, {"CALL_ID": 5})) == (400, "", USER_NOT_SET)
    assert error_of(finish(fake_bitrix24, 5)) == (400, "INVALID_ARGUMENT", "CALL_ID must be a string")
    assert error_of(finish(fake_bitrix24, None)) == (400, "INVALID_ARGUMENT", "CALL_ID must be a string")
    assert error_of(finish(fake_bitrix24, "externalCall.nope.1")) == (400, "", CALL_NOT_REGISTERED)
    assert error_of(finish(fake_bitrix24, call_id, USER_ID=2)) == (400, "", USER_INACTIVE)
    assert call_id in fake_bitrix24.active_calls


def test_finish_twice_says_call_is_not_found_without_closing_parenthesis(fake_bitrix24: FakeBitrix24) -> None:
    call_id = register(fake_bitrix24)
    assert finish(fake_bitrix24, call_id, DURATION=10).status_code == 200

    status, code, description = error_of(finish(fake_bitrix24, call_id, DURATION=10))

    assert (status, code) == (400, "")
    assert description == "Call is not found (call should be registered prior to finishing"
    assert len(fake_bitrix24.statistics) == 1


def test_finish_by_inner_phone(fake_bitrix24: FakeBitrix24) -> None:
    call_id = register(fake_bitrix24)

    response = call(
        fake_bitrix24, "telephony.externalCall.finish", {"CALL_ID": call_id, "USER_PHONE_INNER": "101", "DURATION": 1}
    )

    assert response.status_code == 200
    assert fake_bitrix24.statistics[call_id]["PORTAL_USER_ID"] == 1


# --- attachTranscription -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "description"),
    [
        ({"MESSAGES": [message()]}, "CALL_ID should be set"),
        ({"CALL_ID": None, "MESSAGES": [message()]}, "CALL_ID should be set"),
        ({"CALL_ID": "x"}, "MESSAGES should be an array"),
        ({"CALL_ID": "x", "MESSAGES": "hello"}, "MESSAGES should be an array"),
        ({"CALL_ID": "x", "MESSAGES": [message(SIDE="user")]}, "MESSAGES[0][SIDE] should be either Client or User"),
        (
            {"CALL_ID": "x", "MESSAGES": [message(), message(SIDE="Agent")]},
            "MESSAGES[1][SIDE] should be either Client or User",
        ),
        (
            {"CALL_ID": "x", "MESSAGES": [message(START_TIME=-1)]},
            "MESSAGES[0][START_TIME] should be greater or equal to zero",
        ),
        ({"CALL_ID": "x", "MESSAGES": [message(STOP_TIME=0.8)]}, "MESSAGES[0][STOP_TIME] should be greater than zero"),
        (
            {"CALL_ID": "x", "MESSAGES": [message(STOP_TIME="0.8")]},
            "MESSAGES[0][STOP_TIME] should be greater than zero",
        ),
        ({"CALL_ID": "x", "MESSAGES": [message(STOP_TIME=None)]}, "MESSAGES[0][STOP_TIME] should be greater than zero"),
        ({"CALL_ID": "x", "MESSAGES": [message(MESSAGE="")]}, "MESSAGES[0][MESSAGE] is empty"),
        ({"CALL_ID": "x", "MESSAGES": [message(MESSAGE=None)]}, "MESSAGES[0][MESSAGE] is empty"),
        ({"CALL_ID": "x", "MESSAGES": {"a": message(SIDE="")}}, "MESSAGES[a][SIDE] should be either Client or User"),
        ({"CALL_ID": "x", "MESSAGES": [message(STOP_TIME=1.9)]}, "Call x is not found. Is it finished?"),
        ({"CALL_ID": "x", "MESSAGES": []}, "Call x is not found. Is it finished?"),
    ],
)
def test_attach_validation_errors_in_bitrix24_order(
    fake_bitrix24: FakeBitrix24, params: dict[str, Any], description: str
) -> None:
    response = call(fake_bitrix24, "telephony.call.attachTranscription", params)

    assert error_of(response) == (400, "", description)


def test_attach_checks_every_message_field_before_the_next_message(fake_bitrix24: FakeBitrix24) -> None:
    messages = [message(START_TIME=-1), message(SIDE="nobody")]

    _, _, description = error_of(attach(fake_bitrix24, "x", messages))

    assert description == "MESSAGES[0][START_TIME] should be greater or equal to zero"


def test_attach_before_finish_asks_whether_the_call_is_finished(fake_bitrix24: FakeBitrix24) -> None:
    call_id = register(fake_bitrix24)

    response = attach(fake_bitrix24, call_id, [message()])

    assert error_of(response) == (400, "", f"Call {call_id} is not found. Is it finished?")
    finish(fake_bitrix24, call_id, DURATION=3)
    assert attach(fake_bitrix24, call_id, [message()]).status_code == 200


def test_attach_twice_creates_a_new_transcript_and_statistics_points_to_it(fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24)

    first = attach(fake_bitrix24, call_id, [message(MESSAGE="one")]).json()["result"]["TRANSCRIPT_ID"]
    second = attach(fake_bitrix24, call_id, [message(MESSAGE="two")]).json()["result"]["TRANSCRIPT_ID"]

    assert (first, second) == (1, 2)
    assert fake_bitrix24.statistics[call_id]["TRANSCRIPT_ID"] == 2
    assert fake_bitrix24.attachments_by_call() == {call_id: [1, 2]}
    assert fake_bitrix24.transcripts[1]["messages"][0]["MESSAGE"] == "one"
    assert fake_bitrix24.transcripts[2]["call_id"] == call_id


def test_attach_accepts_messages_php_considers_non_empty(fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24)

    response = attach(
        fake_bitrix24, call_id, [message(MESSAGE="0", STOP_TIME=1.9), message(MESSAGE=" ", SIDE="Client")]
    )

    assert response.status_code == 200


def test_attach_stores_cost_only_when_truthy(fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24)
    params = {"CALL_ID": call_id, "MESSAGES": [message()], "COST": "0", "COST_CURRENCY": "USD"}

    transcript_id = call(fake_bitrix24, "telephony.call.attachTranscription", params).json()["result"]["TRANSCRIPT_ID"]

    assert fake_bitrix24.transcripts[transcript_id]["cost"] is None
    assert fake_bitrix24.transcripts[transcript_id]["cost_currency"] is None


def test_strict_mode_rejects_extra_message_keys(fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24)

    status, code, description = error_of(attach(fake_bitrix24, call_id, [message(CONFIDENCE=0.9)]))

    assert (status, code) == (400, "ERROR_ARGUMENT")
    assert "CONFIDENCE" in description
    assert fake_bitrix24.transcripts == {}
    fake_bitrix24.configure(strict_messages=False)
    assert attach(fake_bitrix24, call_id, [message(CONFIDENCE=0.9)]).status_code == 200


def test_non_object_message_is_a_server_error(fake_bitrix24: FakeBitrix24) -> None:
    assert attach(fake_bitrix24, "x", ["just text"]).status_code == 500


# --- statistics, show/hide, user -----------------------------------------------------------


def test_statistic_get_filters_by_call_id_and_external_call_id(fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24, EXTERNAL_CALL_ID="pbx-42")
    finished_call(fake_bitrix24, EXTERNAL_CALL_ID="pbx-43")
    attach(fake_bitrix24, call_id, [message()])

    by_json = call(fake_bitrix24, "voximplant.statistic.get", {"FILTER": {"CALL_ID": call_id}}).json()
    by_form = requests.post(
        fake_bitrix24.webhook_url + "voximplant.statistic.get",
        data={"FILTER[EXTERNAL_CALL_ID]": "pbx-42"},
        timeout=TIMEOUT,
    ).json()

    assert by_json["result"] == by_form["result"]
    assert by_json["total"] == 1
    row = by_json["result"][0]
    assert (row["CALL_ID"], row["TRANSCRIPT_ID"], row["TRANSCRIPT_PENDING"]) == (call_id, "1", "N")
    assert row["CALL_DURATION"] == "30"  # printed like database rows: numbers as strings


def test_statistic_get_without_filter_pages_by_fifty(fake_bitrix24: FakeBitrix24) -> None:
    for number in range(55):
        finished_call(fake_bitrix24, EXTERNAL_CALL_ID=f"pbx-{number}")

    first = call(fake_bitrix24, "voximplant.statistic.get", {}).json()
    second = call(fake_bitrix24, "voximplant.statistic.get", {"start": first["next"]}).json()

    assert (len(first["result"]), first["total"], first["next"]) == (50, 55, 50)
    assert len(second["result"]) == 5
    assert "next" not in second


def test_statistic_get_for_an_unknown_call_is_empty(fake_bitrix24: FakeBitrix24) -> None:
    body = call(fake_bitrix24, "voximplant.statistic.get", {"FILTER": {"CALL_ID": "nope"}}).json()

    assert (body["result"], body["total"]) == ([], 0)


def test_statistic_get_can_be_denied(fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.configure(deny_statistics=True)

    response = call(fake_bitrix24, "voximplant.statistic.get", {"FILTER": {"CALL_ID": "x"}})

    assert error_of(response) == (403, "ACCESS_DENIED", "Access denied!")


def test_show_and_hide_answer_whether_the_call_is_active(fake_bitrix24: FakeBitrix24) -> None:
    call_id = register(fake_bitrix24)

    assert call(fake_bitrix24, "telephony.externalCall.show", {"CALL_ID": call_id}).json()["result"] is True
    assert call(fake_bitrix24, "telephony.externalCall.hide", {"CALL_ID": "other"}).json()["result"] is False


def test_user_current_describes_the_webhook_user(fake_bitrix24: FakeBitrix24) -> None:
    result = call(fake_bitrix24, "user.current").json()["result"]

    assert (result["ID"], result["ACTIVE"], result["UF_PHONE_INNER"]) == ("1", True, "101")


# --- limits --------------------------------------------------------------------------------


def test_rate_limit_is_off_by_default(fake_bitrix24: FakeBitrix24) -> None:
    session = requests.Session()
    statuses = {session.post(fake_bitrix24.webhook_url + "scope", timeout=TIMEOUT).status_code for _ in range(80)}

    assert statuses == {200}


def test_leaky_bucket_answers_503_after_the_burst_and_recovers(fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.set_rate_limit(burst=5, rate=1.0)

    statuses = [call(fake_bitrix24, "scope").status_code for _ in range(8)]

    assert statuses == [200] * 5 + [503] * 3
    assert error_of(call(fake_bitrix24, "scope")) == (503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
    assert fake_bitrix24.count_503 == 4
    fake_bitrix24.advance_clock(2.0)  # drains two requests; the rejected ones did not add any
    assert [call(fake_bitrix24, "scope").status_code for _ in range(3)] == [200, 200, 503]


def test_leaky_bucket_counts_requests_before_auth(fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.set_rate_limit(burst=2, rate=0.5)
    bad_url = f"{fake_bitrix24.base_url}/rest/1/wrong/"

    assert call(fake_bitrix24, "scope", url=bad_url).status_code == 401
    assert call(fake_bitrix24, "scope", url=bad_url).status_code == 401

    assert call(fake_bitrix24, "scope").status_code == 503


def test_rate_limited_register_is_not_performed(fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.set_rate_limit(burst=1, rate=0.1)
    register(fake_bitrix24, EXTERNAL_CALL_ID="a")

    response = call(
        fake_bitrix24,
        "telephony.externalCall.register",
        {"USER_ID": 1, "PHONE_NUMBER": "555", "TYPE": 2, "EXTERNAL_CALL_ID": "b"},
    )

    assert response.status_code == 503
    assert len(fake_bitrix24.active_calls) == 1


def test_operating_limit_answers_429_with_reset_time(fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.set_operating_limit(limit=3.0, cost=1.0)

    statuses = [call(fake_bitrix24, "scope").status_code for _ in range(3)]
    blocked = call(fake_bitrix24, "scope")

    assert statuses == [200, 200, 200]
    assert blocked.status_code == 429
    assert blocked.json()["error"] == "OPERATION_TIME_LIMIT"
    assert blocked.json()["time"]["operating_reset_at"] > time.time()
    assert call(fake_bitrix24, "user.current").status_code == 200  # other methods keep working
    fake_bitrix24.advance_clock(11 * 60)
    assert call(fake_bitrix24, "scope").status_code == 200


# --- fault injection -----------------------------------------------------------------------


def test_injected_answers_replace_the_next_calls_without_performing_them(fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.inject("telephony.externalCall.register", 503, times=2)
    params = {"USER_ID": 1, "PHONE_NUMBER": "555", "TYPE": 2}

    responses = [call(fake_bitrix24, "telephony.externalCall.register", params) for _ in range(3)]

    assert [r.status_code for r in responses] == [503, 503, 200]
    assert responses[0].json() == {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"}
    assert len(fake_bitrix24.active_calls) == 1
    assert [r.fault for r in fake_bitrix24.calls_to("telephony.externalCall.register")] == ["injected", "injected", ""]
    assert fake_bitrix24.count_503 == 2


def test_injected_custom_body_and_wildcard(fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.inject("*", 400, {"error": "", "error_description": "Unexpected database error"})

    response = call(fake_bitrix24, "user.current")

    assert error_of(response) == (400, "", "Unexpected database error")
    assert call(fake_bitrix24, "user.current").status_code == 200


def test_injected_html_502(fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.inject("scope", 502, "<html><body>Bad Gateway</body></html>")

    response = call(fake_bitrix24, "scope")

    assert response.status_code == 502
    assert response.headers["Content-Type"].startswith("text/html")
    assert "Bad Gateway" in response.text


def test_injected_operating_limit_carries_operating_reset_at(fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.inject_operating_limit("telephony.call.attachTranscription", reset_in=2.0)

    response = attach(fake_bitrix24, "x", [message()])

    assert response.status_code == 429
    assert 0 < response.json()["time"]["operating_reset_at"] - time.time() <= 3


def test_dropped_connection_gets_no_answer_and_no_action(fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.inject_drop("telephony.externalCall.register")

    with pytest.raises(requests.ConnectionError):
        call(fake_bitrix24, "telephony.externalCall.register", {"USER_ID": 1, "PHONE_NUMBER": "555", "TYPE": 2})

    assert fake_bitrix24.active_calls == {}
    assert fake_bitrix24.requests[-1].status == 0
    assert fake_bitrix24.requests[-1].fault == "drop"


def test_random_errors_answer_500_without_performing_the_action(fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.set_faults(error_rate=1.0, seed=1)

    response = call(fake_bitrix24, "telephony.externalCall.register", {"USER_ID": 1, "PHONE_NUMBER": "555", "TYPE": 2})

    assert response.status_code == 500
    assert fake_bitrix24.active_calls == {}


def test_slow_answer_performs_the_action_before_the_client_times_out(fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24)
    fake_bitrix24.set_faults(slow_rate=1.0, slow_seconds=1.0, seed=1)

    with pytest.raises(requests.Timeout):
        requests.post(
            fake_bitrix24.webhook_url + "telephony.call.attachTranscription",
            json={"CALL_ID": call_id, "MESSAGES": [message()]},
            timeout=0.3,
        )

    assert fake_bitrix24.attachments_by_call() == {call_id: [1]}
    assert fake_bitrix24.calls_to("telephony.call.attachTranscription")[0].fault == "slow"


def test_injected_slow_answer_arrives_late_but_complete(fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.inject_slow("scope", seconds=0.3)

    started = time.monotonic()
    response = call(fake_bitrix24, "scope")

    assert response.status_code == 200
    assert time.monotonic() - started >= 0.3


def test_random_faults_are_reproducible_with_a_seed(fake_bitrix24: FakeBitrix24) -> None:
    def statuses() -> list[int]:
        return [call(fake_bitrix24, "scope").status_code for _ in range(30)]

    fake_bitrix24.set_faults(error_rate=0.5, seed=7)
    first = statuses()
    fake_bitrix24.set_faults(error_rate=0.5, seed=7)

    assert statuses() == first
    assert set(first) == {200, 500}


def test_fixed_latency_delays_every_answer(fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.set_latency(0.2)

    started = time.monotonic()
    call(fake_bitrix24, "scope")

    assert time.monotonic() - started >= 0.2


# --- portals, recording, reset -------------------------------------------------------------


def test_portals_have_independent_state_and_buckets(fake_bitrix24: FakeBitrix24) -> None:
    other = fake_bitrix24.add_webhook(portal="other")
    fake_bitrix24.set_rate_limit(burst=3, rate=0.1)

    ours = finished_call(fake_bitrix24, EXTERNAL_CALL_ID="same")
    theirs = register(fake_bitrix24, url=other, EXTERNAL_CALL_ID="same")

    assert ours != theirs
    assert [call(fake_bitrix24, "scope").status_code for _ in range(2)] == [200, 503]  # default used its 3
    assert finish(fake_bitrix24, theirs, url=other, DURATION=1).json()["result"]["ID"] == 1
    assert attach(fake_bitrix24, theirs, [message()], url=other).json()["result"]["TRANSCRIPT_ID"] == 1
    assert fake_bitrix24.attachments_by_call() == {}
    assert fake_bitrix24.attachments_by_call("other") == {theirs: [1]}
    assert list(fake_bitrix24.portal_state("other").statistics) == [theirs]
    assert fake_bitrix24.portal_state("other").count_503 == 0
    assert fake_bitrix24.requests[-1].portal == "other"


def test_requests_are_recorded_with_auth_params_and_answer(fake_bitrix24: FakeBitrix24) -> None:
    call_id = register(fake_bitrix24, EXTERNAL_CALL_ID="pbx-1")

    recorded = fake_bitrix24.calls_to("telephony.externalCall.register")

    assert len(recorded) == 1
    entry = recorded[0]
    assert entry.method == "telephony.externalcall.register"
    assert entry.params["EXTERNAL_CALL_ID"] == "pbx-1"
    assert (entry.user_id, entry.portal, entry.status) == (1, "default", 200)
    assert entry.code is not None
    assert fake_bitrix24.webhook_url.endswith(f"/rest/1/{entry.code}/")
    assert isinstance(entry.response, dict)
    assert entry.response["result"]["CALL_ID"] == call_id
    assert entry.timestamp <= time.time()


def test_reset_clears_state_but_keeps_webhooks(fake_bitrix24: FakeBitrix24) -> None:
    finished_call(fake_bitrix24)
    fake_bitrix24.inject("scope", 500)

    fake_bitrix24.reset()

    assert (fake_bitrix24.requests, fake_bitrix24.statistics, fake_bitrix24.count_503) == ([], {}, 0)
    assert call(fake_bitrix24, "scope").status_code == 200
    assert finished_call(fake_bitrix24)


def test_control_endpoints_in_process(fake_bitrix24: FakeBitrix24) -> None:
    control = fake_bitrix24.control_url

    bad = requests.post(control + "config", json={"nope": 1}, timeout=TIMEOUT)
    changed = requests.post(control + "config", json={"error_code": "ERROR_CORE"}, timeout=TIMEOUT)
    injected = requests.post(control + "inject", json={"method": "scope", "status": 503}, timeout=TIMEOUT)

    assert bad.status_code == 400
    assert changed.json()["error_code"] == "ERROR_CORE"
    assert injected.status_code == 200
    assert call(fake_bitrix24, "scope").status_code == 503


# --- out of process ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_subprocess_mode_serves_and_reports_state() -> None:
    command = [sys.executable, "-m", "fake_bitrix24", "--port", "0", "--burst", "3", "--rate", "0.01"]
    process = subprocess.Popen([*command, "--portals", "2"], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        info = json.loads(process.stdout.readline())
        url, other = info["webhook_urls"]
        control = info["control_url"]

        statuses = [requests.post(url + "scope", timeout=TIMEOUT).status_code for _ in range(4)]
        register_response = requests.post(
            other + "telephony.externalCall.register",
            json={"USER_ID": 1, "PHONE_NUMBER": "555", "TYPE": 2},
            timeout=TIMEOUT,
        )
        call_id = register_response.json()["result"]["CALL_ID"]
        requests.post(other + "telephony.externalCall.finish", json={"CALL_ID": call_id, "USER_ID": 1}, timeout=TIMEOUT)
        requests.post(
            other + "telephony.call.attachTranscription",
            json={"CALL_ID": call_id, "MESSAGES": [message()]},
            timeout=TIMEOUT,
        )
        state = requests.get(control + "state", timeout=TIMEOUT).json()

        assert statuses == [200, 200, 200, 503]
        assert state["requests"]["scope"] == 4
        assert state["count_503"] == 1
        assert state["statistics"] == 1
        assert state["attachments_by_call"] == {call_id: [1]}
        assert state["portals"]["portal2"]["transcripts"] == 1

        requests.post(control + "config", json={"burst": None}, timeout=TIMEOUT)
        assert requests.post(url + "scope", timeout=TIMEOUT).status_code == 200
        requests.post(control + "reset", timeout=TIMEOUT)
        assert requests.get(control + "state", timeout=TIMEOUT).json()["requests_total"] == 0
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
