"""The fake Bitrix24 attaches call recordings like the real one: attachRecord and its upload URL."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import socket
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from requests_toolbelt import MultipartEncoder

from fake_bitrix24 import (
    CALL_NOT_IN_STATISTICS,
    FILE_CONTENT_EMPTY,
    FILE_CONTENT_NOT_BASE64,
    FILE_NAME_EMPTY,
    RECORD_PARAMETERS_MISSING,
    UPLOAD_FILE_MISSING,
    WRONG_FILE_EXTENSION,
    FakeBitrix24,
    RecordAttachment,
)
from fake_bitrix24.multipart import BodyError, BodyReader, MultipartError, receive_file

pytest_plugins = ["tests.fake_bitrix24"]

TIMEOUT = 10.0
ATTACH = "telephony.externalCall.attachRecord"
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 4  # stands in for a recording
BOUNDARY = "fakeBitrix24TestBoundary"


# --- helpers -------------------------------------------------------------------------------


def call(
    fake: FakeBitrix24, method: str, params: dict[str, Any] | None = None, *, url: str | None = None
) -> requests.Response:
    """POST a JSON body to a webhook method (default: the default portal's webhook)."""
    return requests.post((url or fake.webhook_url) + method, json=params or {}, timeout=TIMEOUT)


def error_of(response: requests.Response) -> tuple[int, str, str]:
    body = response.json()
    return response.status_code, body["error"], body["error_description"]


def registered_call(fake: FakeBitrix24, url: str | None = None) -> str:
    payload = {"USER_PHONE_INNER": "101", "PHONE_NUMBER": "+15551234567", "TYPE": 2}
    response = call(fake, "telephony.externalCall.register", payload, url=url)
    assert response.status_code == 200, response.text
    return str(response.json()["result"]["CALL_ID"])


def finished_call(fake: FakeBitrix24, url: str | None = None) -> str:
    call_id = registered_call(fake, url)
    finish = call(fake, "telephony.externalCall.finish", {"CALL_ID": call_id, "USER_ID": 1, "DURATION": 30}, url=url)
    assert finish.status_code == 200, finish.text
    return call_id


def attach(fake: FakeBitrix24, params: dict[str, Any], url: str | None = None) -> requests.Response:
    return call(fake, ATTACH, params, url=url)


def content(data: bytes = WAV) -> str:
    return base64.b64encode(data).decode("ascii")


def upload_url(fake: FakeBitrix24, call_id: str, url: str | None = None) -> str:
    response = attach(fake, {"CALL_ID": call_id, "FILENAME": "call.wav"}, url=url)
    assert response.status_code == 200, response.text
    result = response.json()["result"]
    assert result["fieldName"] == "file"
    return str(result["uploadUrl"])


def post_file(
    url: str, data: bytes = WAV, filename: str = "call.wav", field: str = "file", session: Any = requests
) -> requests.Response:
    """The service's way: a streamed multipart/form-data POST (requests_toolbelt)."""
    encoder = MultipartEncoder(fields={"note": "first a plain field", field: (filename, io.BytesIO(data), "audio/wav")})
    headers = {"Content-Type": encoder.content_type}
    response: requests.Response = session.post(url, data=encoder, headers=headers, timeout=TIMEOUT)
    return response


def statistic_row(fake: FakeBitrix24, call_id: str) -> dict[str, Any]:
    response = call(fake, "voximplant.statistic.get", {"FILTER": {"CALL_ID": call_id}})
    rows: list[dict[str, Any]] = response.json()["result"]
    assert len(rows) == 1
    return rows[0]


class StreamedUpload:
    """A multipart body produced piece by piece, never whole in memory.

    With ``sized`` it has a length, so requests sends Content-Length; without, it is sent with
    chunked transfer coding. The data repeats a block that holds a near-boundary, so a scanner
    that matches a boundary prefix too eagerly would cut the file short.
    """

    BLOCK = (b"\r\n--" + BOUNDARY[:-1].encode() + bytes(range(256)) * 8)[:2048] * 32

    def __init__(self, size: int, filename: str = "long-call.wav", sized: bool = True) -> None:
        self.size = size
        self.sized = sized
        self.head = (
            f"--{BOUNDARY}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        self.tail = f"\r\n--{BOUNDARY}--\r\n".encode()
        self.content_type = f"multipart/form-data; boundary={BOUNDARY}"

    def file_pieces(self) -> Iterator[bytes]:
        sent = 0
        while sent < self.size:
            piece = self.BLOCK[: self.size - sent]
            sent += len(piece)
            yield piece

    def expected_sha256(self) -> str:
        digest = hashlib.sha256()
        for piece in self.file_pieces():
            digest.update(piece)
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.head) + self.size + len(self.tail)

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        yield from self.file_pieces()
        yield self.tail

    def body(self) -> Any:
        """What to hand requests as ``data``."""
        return self if self.sized else iter(self)


# --- attachRecord: errors in Bitrix24's order ---------------------------------------------


def test_neither_url_nor_filename_is_refused_before_the_call_is_looked_up(fake_bitrix24: FakeBitrix24) -> None:
    expected = (400, "", RECORD_PARAMETERS_MISSING)

    assert error_of(attach(fake_bitrix24, {"CALL_ID": "no-such-call"})) == expected
    assert error_of(attach(fake_bitrix24, {"CALL_ID": "x", "FILE_CONTENT": content(), "RECORD_URL": None})) == expected


@pytest.mark.parametrize(
    "params",
    [
        {"FILENAME": "call.wav", "FILE_CONTENT": content()},
        {"FILENAME": "call.wav"},
        {"RECORD_URL": "https://pbx.example/rec/call.mp3"},
    ],
    ids=["content", "upload", "url"],
)
def test_a_call_not_finished_yet_is_refused_in_every_mode(fake_bitrix24: FakeBitrix24, params: dict[str, Any]) -> None:
    call_id = registered_call(fake_bitrix24)

    assert error_of(attach(fake_bitrix24, {"CALL_ID": call_id, **params})) == (400, "", CALL_NOT_IN_STATISTICS)
    assert error_of(attach(fake_bitrix24, {"CALL_ID": "unknown", **params})) == (400, "", CALL_NOT_IN_STATISTICS)
    assert fake_bitrix24.records_by_call() == {}


@pytest.mark.parametrize(
    ("params", "description"),
    [
        ({"FILENAME": "", "FILE_CONTENT": content()}, FILE_NAME_EMPTY),
        ({"FILENAME": "call.ogg", "FILE_CONTENT": content()}, WRONG_FILE_EXTENSION),
        ({"FILENAME": "CALL.WAV", "FILE_CONTENT": content()}, WRONG_FILE_EXTENSION),  # PHP compares case
        ({"FILENAME": "call", "FILE_CONTENT": content()}, WRONG_FILE_EXTENSION),
        ({"FILENAME": "call.ogg", "FILE_CONTENT": ""}, WRONG_FILE_EXTENSION),  # the name before the content
        ({"FILENAME": "call.wav", "FILE_CONTENT": ""}, FILE_CONTENT_EMPTY),
        ({"FILENAME": "call.wav", "FILE_CONTENT": "false"}, FILE_CONTENT_EMPTY),
        ({"FILENAME": "call.wav", "FILE_CONTENT": "not base64!"}, FILE_CONTENT_NOT_BASE64),
        ({"FILENAME": "call.wav", "FILE_CONTENT": "UklGRg"}, FILE_CONTENT_NOT_BASE64),  # unpadded
        ({"FILENAME": "call.wav", "FILE_CONTENT": "UklG Rg=="}, FILE_CONTENT_NOT_BASE64),  # a form's "+" gone astray
    ],
)
def test_file_mode_errors(fake_bitrix24: FakeBitrix24, params: dict[str, Any], description: str) -> None:
    call_id = finished_call(fake_bitrix24)

    assert error_of(attach(fake_bitrix24, {"CALL_ID": call_id, **params})) == (400, "", description)
    assert fake_bitrix24.records_by_call() == {}
    assert statistic_row(fake_bitrix24, call_id)["RECORD_FILE_ID"] is None


def test_errors_can_carry_the_documented_error_core_code(fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.configure(error_code="ERROR_CORE")

    assert error_of(attach(fake_bitrix24, {"CALL_ID": "x"})) == (400, "ERROR_CORE", RECORD_PARAMETERS_MISSING)


def test_without_file_content_an_upload_url_comes_before_the_name_is_looked_at(fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24)

    result = attach(fake_bitrix24, {"CALL_ID": call_id, "FILENAME": ""}).json()["result"]

    assert result["uploadUrl"].startswith(f"{fake_bitrix24.base_url}/upload/")
    assert result["fieldName"] == "file"


# --- attachRecord: content and URL modes ----------------------------------------------------


def test_file_content_is_decoded_and_only_its_size_and_hash_are_kept(fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24)

    response = attach(fake_bitrix24, {"CALL_ID": call_id, "FILENAME": "call.wav", "FILE_CONTENT": content()})

    assert response.status_code == 200, response.text
    assert response.json()["result"] == {"FILE_ID": 1}
    [record] = fake_bitrix24.records_by_call()[call_id]
    assert (record.via, record.filename, record.url) == ("content", "call.wav", None)
    assert (record.size, record.sha256, record.file_id) == (len(WAV), hashlib.sha256(WAV).hexdigest(), 1)
    assert statistic_row(fake_bitrix24, call_id)["RECORD_FILE_ID"] == "1"


def test_form_encoded_content_with_plus_and_slash_survives(fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24)
    data = bytes([0xFB, 0xEF, 0xFF]) * 100  # base64 "++//" all the way
    form = {"CALL_ID": call_id, "FILENAME": "call.mp3", "FILE_CONTENT": content(data)}

    response = requests.post(fake_bitrix24.webhook_url + ATTACH, data=form, timeout=TIMEOUT)

    assert response.status_code == 200, response.text
    assert fake_bitrix24.records_by_call()[call_id][0].sha256 == hashlib.sha256(data).hexdigest()


def test_record_url_is_stored_and_never_fetched(fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24)
    with socket.create_server(("127.0.0.1", 0)) as pbx:
        url = f"http://127.0.0.1:{pbx.getsockname()[1]}/records/2024/call-17.mp3?sig=abc"

        response = attach(fake_bitrix24, {"CALL_ID": call_id, "RECORD_URL": url})

        pbx.settimeout(0.3)
        with pytest.raises(TimeoutError):
            pbx.accept()
    assert response.status_code == 200, response.text
    assert response.json()["result"] == {"FILE_ID": 1}
    [record] = fake_bitrix24.records_by_call()[call_id]
    assert (record.via, record.url, record.filename, record.size, record.sha256) == (
        "url",
        url,
        "call-17.mp3",
        None,
        None,
    )
    row = statistic_row(fake_bitrix24, call_id)
    assert (row["CALL_RECORD_URL"], row["RECORD_FILE_ID"]) == (url, "1")


def test_record_url_wins_over_filename_and_names_the_file(fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24)
    params = {"CALL_ID": call_id, "RECORD_URL": "https://pbx.example/x", "FILENAME": "mine.wav", "FILE_CONTENT": "?"}

    assert attach(fake_bitrix24, params).status_code == 200

    [record] = fake_bitrix24.records_by_call()[call_id]
    assert (record.via, record.filename) == ("url", "mine.wav")


# --- the upload URL -------------------------------------------------------------------------


def test_upload_url_takes_a_multipart_post_and_answers_the_file_id(fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24)
    url = upload_url(fake_bitrix24, call_id)

    response = post_file(url, filename="call-17.wav")

    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert response.json() == {"result": {"FILE_ID": 1}}
    [record] = fake_bitrix24.records_by_call()[call_id]
    expected = RecordAttachment("upload", "call-17.wav", None, len(WAV), hashlib.sha256(WAV).hexdigest(), 1, 0.0)
    assert dataclasses.replace(record, at=0.0) == expected
    assert abs(record.at - time.time()) < 60
    [logged] = fake_bitrix24.calls_to("upload")
    assert (logged.status, logged.http_method, logged.portal, logged.user_id) == (200, "POST", "default", 1)
    assert logged.params["CALL_ID"] == call_id
    assert statistic_row(fake_bitrix24, call_id)["RECORD_FILE_ID"] == "1"


def test_an_upload_url_is_single_use(fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24)
    url = upload_url(fake_bitrix24, call_id)
    assert post_file(url).status_code == 200

    again = post_file(url)

    assert error_of(again) == (404, "NOT_FOUND", "Unknown or already used upload URL")
    assert len(fake_bitrix24.records_by_call()[call_id]) == 1
    assert [request.status for request in fake_bitrix24.calls_to("upload")] == [200, 404]


def test_unknown_token_is_404_and_get_is_405(fake_bitrix24: FakeBitrix24) -> None:
    assert error_of(post_file(f"{fake_bitrix24.base_url}/upload/made-up/"))[:2] == (404, "NOT_FOUND")
    assert requests.get(f"{fake_bitrix24.base_url}/upload/made-up/", timeout=TIMEOUT).status_code == 405


def test_an_upload_without_the_file_field_is_refused_and_the_url_stays_usable(fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24)
    url = upload_url(fake_bitrix24, call_id)

    assert error_of(post_file(url, field="recording")) == (400, "", UPLOAD_FILE_MISSING)
    plain = requests.post(url, data={"file": "not a file part: no filename"}, timeout=TIMEOUT)
    assert error_of(plain) == (400, "", UPLOAD_FILE_MISSING)
    assert "multipart/form-data" in plain.json()["fake_detail"]
    assert fake_bitrix24.records_by_call() == {}

    assert post_file(url).status_code == 200


@pytest.mark.parametrize("filename", ["call.ogg", "CALL.WAV", ""])
def test_an_uploaded_file_must_be_wav_or_mp3(fake_bitrix24: FakeBitrix24, filename: str) -> None:
    url = upload_url(fake_bitrix24, finished_call(fake_bitrix24))

    assert error_of(post_file(url, filename=filename)) == (400, "", WRONG_FILE_EXTENSION)
    assert fake_bitrix24.records_by_call() == {}


def test_the_uploaded_name_loses_its_directories(fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24)

    assert post_file(upload_url(fake_bitrix24, call_id), filename="C:\\recordings\\call.mp3").status_code == 200

    assert fake_bitrix24.records_by_call()[call_id][0].filename == "call.mp3"


def test_an_injected_failure_hits_the_upload_and_a_retry_with_the_same_url_succeeds(
    fake_bitrix24: FakeBitrix24,
) -> None:
    call_id = finished_call(fake_bitrix24)
    url = upload_url(fake_bitrix24, call_id)
    fake_bitrix24.inject("upload", 500)

    failed = post_file(url)

    assert error_of(failed) == (500, "INTERNAL_SERVER_ERROR", "Internal server error")
    assert fake_bitrix24.records_by_call() == {}
    assert post_file(url).status_code == 200
    assert [(r.status, r.fault) for r in fake_bitrix24.calls_to("upload")] == [(500, "injected"), (200, "")]


def test_a_dropped_upload_stores_nothing(fake_bitrix24: FakeBitrix24) -> None:
    url = upload_url(fake_bitrix24, finished_call(fake_bitrix24))
    fake_bitrix24.inject_drop("upload")

    with pytest.raises(requests.ConnectionError):
        post_file(url)

    assert fake_bitrix24.records_by_call() == {}
    assert fake_bitrix24.calls_to("upload")[0].fault == "drop"


def test_uploads_count_against_the_portal_rate_limit(fake_bitrix24: FakeBitrix24) -> None:
    url = upload_url(fake_bitrix24, finished_call(fake_bitrix24))
    fake_bitrix24.set_rate_limit(burst=1, rate=0.001)
    assert call(fake_bitrix24, "scope").status_code == 200

    assert error_of(post_file(url)) == (503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
    assert fake_bitrix24.count_503 == 1


def test_the_connection_is_reused_after_uploads_even_refused_ones(fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24)
    with requests.Session() as session:
        assert post_file(f"{fake_bitrix24.base_url}/upload/unknown/", data=WAV * 64, session=session).status_code == 404
        assert post_file(upload_url(fake_bitrix24, call_id), session=session).status_code == 200
        scope = session.post(fake_bitrix24.webhook_url + "scope", json={}, timeout=TIMEOUT)

    assert scope.json()["result"] == ["telephony", "user"]


@pytest.mark.parametrize(("size", "sized"), [(64 * 2**20, True), (8 * 2**20 + 7, False)], ids=["length", "chunked"])
def test_a_large_upload_streams_through_in_bounded_memory(fake_bitrix24: FakeBitrix24, size: int, sized: bool) -> None:
    call_id = finished_call(fake_bitrix24)
    url = upload_url(fake_bitrix24, call_id)
    upload = StreamedUpload(size, sized=sized)
    expected = upload.expected_sha256()

    tracemalloc.start()
    try:
        response = requests.post(url, data=upload.body(), headers={"Content-Type": upload.content_type}, timeout=60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert response.status_code == 200, response.text
    [record] = fake_bitrix24.records_by_call()[call_id]
    assert (record.size, record.sha256, record.filename) == (size, expected, "long-call.wav")
    assert peak < 4 * 2**20, f"peak {peak} bytes while uploading {size}"


# --- history, inspection, auth types --------------------------------------------------------


def test_each_attachment_replaces_the_record_and_the_history_keeps_them_all(fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24)
    url = "https://pbx.example/call.mp3"

    attach(fake_bitrix24, {"CALL_ID": call_id, "FILENAME": "first.wav", "FILE_CONTENT": content(b"one")})
    attach(fake_bitrix24, {"CALL_ID": call_id, "RECORD_URL": url})
    post_file(upload_url(fake_bitrix24, call_id), data=b"three", filename="third.mp3")

    history = fake_bitrix24.records_by_call()[call_id]
    assert [(r.via, r.filename, r.size, r.file_id) for r in history] == [
        ("content", "first.wav", 3, 1),
        ("url", "call.mp3", None, 2),
        ("upload", "third.mp3", 5, 3),
    ]
    assert history[0].at <= history[1].at <= history[2].at
    row = statistic_row(fake_bitrix24, call_id)
    assert (row["RECORD_FILE_ID"], row["CALL_RECORD_URL"]) == ("3", None)


def test_records_over_http_and_in_state(fake_bitrix24: FakeBitrix24) -> None:
    first, second = finished_call(fake_bitrix24), finished_call(fake_bitrix24)
    attach(fake_bitrix24, {"CALL_ID": first, "FILENAME": "a.wav", "FILE_CONTENT": content(b"abc")})
    attach(fake_bitrix24, {"CALL_ID": first, "RECORD_URL": "https://pbx.example/a.wav"})
    attach(fake_bitrix24, {"CALL_ID": second, "RECORD_URL": "https://pbx.example/b.wav"})

    records = requests.get(fake_bitrix24.control_url + "records", timeout=TIMEOUT).json()["records"]
    state = requests.get(fake_bitrix24.control_url + "state", timeout=TIMEOUT).json()

    assert [item["via"] for item in records[first]] == ["content", "url"]
    assert records[first][0] == {
        "via": "content",
        "filename": "a.wav",
        "url": None,
        "size": 3,
        "sha256": hashlib.sha256(b"abc").hexdigest(),
        "file_id": 1,
        "at": fake_bitrix24.records_by_call()[first][0].at,
    }
    assert records[second][0]["url"] == "https://pbx.example/b.wav"
    assert state["records"] == 3
    assert state["portals"]["default"]["records"] == 3


def test_records_are_kept_per_portal(fake_bitrix24: FakeBitrix24) -> None:
    other = fake_bitrix24.add_webhook(portal="other")
    mine, theirs = finished_call(fake_bitrix24), finished_call(fake_bitrix24, url=other)
    assert error_of(attach(fake_bitrix24, {"CALL_ID": theirs, "RECORD_URL": "https://x/y.wav"}))[2] == (
        CALL_NOT_IN_STATISTICS
    )
    attach(fake_bitrix24, {"CALL_ID": mine, "RECORD_URL": "https://x/mine.wav"})
    attach(fake_bitrix24, {"CALL_ID": theirs, "RECORD_URL": "https://x/theirs.wav"}, url=other)

    assert list(fake_bitrix24.records_by_call()) == [mine]
    assert list(fake_bitrix24.records_by_call("other")) == [theirs]
    assert set(fake_bitrix24.records_by_call(None)) == {mine, theirs}
    assert fake_bitrix24.records_by_call("other")[theirs][0].file_id == 1  # file ids count per portal


def test_reset_forgets_records_and_upload_urls(fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24)
    attach(fake_bitrix24, {"CALL_ID": call_id, "RECORD_URL": "https://pbx.example/a.wav"})
    url = upload_url(fake_bitrix24, call_id)

    fake_bitrix24.reset()

    assert fake_bitrix24.records_by_call() == {}
    assert post_file(url).status_code == 404


def test_webhooks_may_attach_records_even_where_register_is_application_only(fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24)
    fake_bitrix24.configure(deny_webhook_app_methods=True)

    response = attach(fake_bitrix24, {"CALL_ID": call_id, "FILENAME": "call.wav", "FILE_CONTENT": content()})

    assert response.status_code == 200, response.text


def test_applications_attach_records_and_upload_through_their_endpoint(fake_bitrix24: FakeBitrix24) -> None:
    installation = fake_bitrix24.install("portal-a.bitrix24.test")

    def rest(method: str, params: dict[str, Any]) -> requests.Response:
        body = {"auth": installation.access_token, **params}
        return requests.post(f"{installation.client_endpoint}{method}.json", json=body, timeout=TIMEOUT)

    register = rest("telephony.externalCall.register", {"USER_ID": 1, "PHONE_NUMBER": "+15550001", "TYPE": 2})
    call_id = register.json()["result"]["CALL_ID"]
    assert rest("telephony.externalCall.finish", {"CALL_ID": call_id, "USER_ID": 1}).status_code == 200
    answer = rest(ATTACH, {"CALL_ID": call_id, "FILENAME": "call.wav"})

    assert answer.status_code == 200, answer.text
    assert post_file(answer.json()["result"]["uploadUrl"]).status_code == 200
    assert [r.via for r in fake_bitrix24.records_by_call(installation.domain)[call_id]] == ["upload"]
    logged = fake_bitrix24.calls_to("upload")[0]
    assert (logged.member_id, logged.client_id, logged.portal) == (
        installation.member_id,
        installation.client_id,
        installation.domain,
    )


# --- the streaming multipart reader ---------------------------------------------------------


def multipart(*parts: tuple[str, str | None, bytes], preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    body = preamble
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode() + epilogue


def read(body: bytes, read_size: int = 7, chunked: bool = False) -> Any:
    reader = BodyReader(io.BytesIO(body), len(body), chunked=chunked, read_size=read_size)
    found = receive_file(reader, f'multipart/form-data; boundary="{BOUNDARY}"', "file")
    assert reader.exhausted
    return found


def test_reader_finds_the_file_across_tiny_reads_preamble_and_epilogue() -> None:
    data = b"\r\n--" + BOUNDARY[:-1].encode() + b"x\r\n" + WAV  # a near-boundary inside the file
    body = multipart(("a", None, b"plain"), ("file", "r.wav", data), preamble=b"ignored\r\n", epilogue=b"also ignored")

    found = read(body)

    assert (found.filename, found.size, found.sha256) == ("r.wav", len(data), hashlib.sha256(data).hexdigest())


def test_reader_takes_the_last_file_part_and_skips_a_field_without_filename() -> None:
    body = multipart(("file", "one.wav", b"1"), ("file", None, b"not a file"), ("file", "two.mp3", b"22"))

    found = read(body, read_size=64 * 1024)

    assert (found.filename, found.size) == ("two.mp3", 2)
    assert read(multipart(("other", "x.wav", b"1"))) is None


def test_reader_decodes_chunked_transfer_coding() -> None:
    body = multipart(("file", "r.wav", WAV))
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 100]), body[i : i + 100]) for i in range(0, len(body), 100))
    reader = BodyReader(io.BytesIO(chunked + b"0\r\nX-Trailer: 1\r\n\r\n"), chunked=True, read_size=33)

    found = receive_file(reader, f"multipart/form-data; boundary={BOUNDARY}", "file")

    assert found is not None and found.sha256 == hashlib.sha256(WAV).hexdigest()
    assert reader.exhausted


@pytest.mark.parametrize(
    ("body", "content_type", "error"),
    [
        (multipart(("file", "r.wav", WAV))[:-12], f"multipart/form-data; boundary={BOUNDARY}", MultipartError),
        (b"--other\r\n\r\nx\r\n--other--\r\n", f"multipart/form-data; boundary={BOUNDARY}", MultipartError),
        (b"file=x", "application/x-www-form-urlencoded", MultipartError),
        (b"x", "multipart/form-data", MultipartError),
    ],
    ids=["no-closing-boundary", "other-boundary", "not-multipart", "no-boundary"],
)
def test_reader_refuses_malformed_bodies(body: bytes, content_type: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        receive_file(BodyReader(io.BytesIO(body), len(body)), content_type, "file")


def test_reader_notices_a_body_shorter_than_declared() -> None:
    body = multipart(("file", "r.wav", WAV))
    reader = BodyReader(io.BytesIO(body[:100]), len(body))

    with pytest.raises(BodyError):
        receive_file(reader, f"multipart/form-data; boundary={BOUNDARY}", "file")
    assert not reader.exhausted
