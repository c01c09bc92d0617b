"""telephony.externalCall.attachRecord and its upload URL: recordings of finished calls.

Bitrix24's order (``vi_rest.php`` and ``Rest\\Helper::attachRecord``, ``attachRecordWithUrl``,
``uploadRecord``): ``RECORD_URL`` set → URL mode, else ``FILENAME`` set → file mode, else
"Required parameters are not set"; then, in both modes, the call must be in the statistics table
(finished). File mode without ``FILE_CONTENT`` answers an upload URL before looking at the name;
with it: the name, its extension (``wav``/``mp3``, case-sensitive as PHP's GetFileExtension),
then the content. A multipart POST of field ``file`` to the upload URL checks the field, the
part's file name, then the call. Every attachment replaces the call's record; the fake keeps the
history, the size and SHA-256 of each file (never its bytes), and it never downloads a
RECORD_URL, so download errors ("Server returns HTTP error code N") come only by injection.

Failure policy of the upload route: a body it cannot parse is refused (400) and nothing is
stored; the upload token is spent only by a stored file, so an injected or random failure can be
retried with the same URL.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import secrets
import threading
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from fake_bitrix24.multipart import BodyError, BodyReader, MultipartError, ReceivedFile, receive_file
from fake_bitrix24.php import php_str
from fake_bitrix24.protocol import ApiError, IncomingRequest, RecordedRequest, Reply
from fake_bitrix24.state import DEFAULT_PORTAL, MethodCall, PortalState, RecordAttachment

if TYPE_CHECKING:
    from fake_bitrix24.faults import Injection
    from fake_bitrix24.state import FakeConfig

RECORD_EXTENSIONS = ("wav", "mp3")
UPLOAD_FIELD = "file"  # attachRecord's ``fieldName``
UPLOAD_METHOD = "upload"  # upload requests in the request log, and for ``inject``
UPLOAD_PATH = "/upload/"

RECORD_PARAMETERS_MISSING = "Required parameters are not set. Request should contain or URL or FILENAME parameter"
CALL_NOT_IN_STATISTICS = "Call is not found in the statistic table. Looks like it is not finished yet."
FILE_NAME_EMPTY = "File name is empty"
WRONG_FILE_EXTENSION = "Wrong file extension. Only wav and mp3 are allowed"
FILE_CONTENT_EMPTY = "File content is empty."
FILE_CONTENT_NOT_BASE64 = "File content is not properly encoded. Base64 encoding is expected."
UPLOAD_FILE_MISSING = f"Error: required parameter {UPLOAD_FIELD} is not found"


@dataclass(frozen=True)
class UploadTicket:
    """What an upload URL's token stands for: the call and who asked for the URL."""

    portal: str
    call_id: str
    issued_at: float
    user_id: int | None
    code: str | None
    member_id: str | None
    client_id: str | None


@dataclass(frozen=True)
class _Admission:
    """The pipeline's verdict on an upload before its body is read."""

    fault: str = ""
    delay: float = 0.0
    early: Reply | None = None  # answered without storing anything


class RecordsMixin:
    """FakeBitrix24's call records: the REST method, the upload route, the inspection API."""

    config: FakeConfig
    _lock: threading.Lock
    _portals: dict[str, PortalState]
    _requests: list[RecordedRequest]
    _count_503: int

    if TYPE_CHECKING:  # provided by FakeBitrix24, TelephonyMethods, LimitsMixin and FaultsMixin

        @property
        def base_url(self) -> str: ...

        def now(self) -> float: ...

        def _core_error(self, description: str) -> ApiError: ...

        def _admit(self, portal: PortalState, now: float) -> None: ...

        def _take_injection(self, method: str) -> Injection | None: ...

        def _injected_reply(self, injection: Injection) -> Reply: ...

        def _roll_fault(self) -> str: ...

    def _init_records(self) -> None:
        self._upload_tickets: dict[str, UploadTicket] = {}

    # Inspection -----------------------------------------------------------------------------

    def records_by_call(self, portal: str | None = DEFAULT_PORTAL) -> dict[str, list[RecordAttachment]]:
        """CALL_ID → the records attached, oldest first; ``portal=None`` merges all portals."""
        with self._lock:
            return self._records_by_call(portal)

    def _records_by_call(self, portal: str | None) -> dict[str, list[RecordAttachment]]:
        names = list(self._portals) if portal is None else [portal]
        merged: dict[str, list[RecordAttachment]] = {}
        for name in names:
            for call_id, history in self._portals[name].records.items():
                merged[call_id] = list(history)
        return merged

    def _records_json(self) -> dict[str, Any]:
        """``GET /_fake/records``: every portal's records (called with the lock held)."""
        return {
            call_id: [asdict(record) for record in history] for call_id, history in self._records_by_call(None).items()
        }

    def _forget_upload_tickets(self) -> None:
        self._upload_tickets.clear()

    # telephony.externalCall.attachRecord ----------------------------------------------------

    def _attach_record(self, call: MethodCall) -> dict[str, Any]:
        params = call.params
        url, filename, content = params.get("RECORD_URL"), params.get("FILENAME"), params.get("FILE_CONTENT")
        if url is None and filename is None:  # PHP's isset: null is "not set", "" is set
            raise self._core_error(RECORD_PARAMETERS_MISSING)
        row = call.portal.statistics.get(php_str(params.get("CALL_ID")))
        if row is None:
            raise self._core_error(CALL_NOT_IN_STATISTICS)
        if url is not None:
            name = php_str(filename) or file_name(php_str(url).split("?", 1)[0].split("#", 1)[0])
            record = self._store_record(call.portal, row, "url", name or None, php_str(url), None, None, call.now)
            return {"FILE_ID": record.file_id}
        if content is None:
            return {"uploadUrl": self._issue_upload_url(call, row["CALL_ID"]), "fieldName": UPLOAD_FIELD}
        name = php_str(filename)
        if name == "":
            raise self._core_error(FILE_NAME_EMPTY)
        if file_extension(name) not in RECORD_EXTENSIONS:
            raise self._core_error(WRONG_FILE_EXTENSION)
        data = self._decode_file_content(content)
        digest = hashlib.sha256(data).hexdigest()
        record = self._store_record(call.portal, row, "content", name, None, len(data), digest, call.now)
        return {"FILE_ID": record.file_id}

    def _decode_file_content(self, content: object) -> bytes:
        """``CRestUtil::saveFile``, but strict: PHP skips characters outside the alphabet."""
        if isinstance(content, list | dict):  # the REST file form [name, base64]
            values = list(content.values()) if isinstance(content, dict) else content
            content = values[1] if len(values) > 1 else None
        text = php_str(content)
        if text in ("", "false"):
            raise self._core_error(FILE_CONTENT_EMPTY)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise self._core_error(FILE_CONTENT_NOT_BASE64) from None
        if not data:
            raise self._core_error(FILE_CONTENT_NOT_BASE64)
        return data

    def _store_record(
        self,
        portal: PortalState,
        row: dict[str, Any],
        via: str,
        filename: str | None,
        url: str | None,
        size: int | None,
        sha256: str | None,
        now: float,
    ) -> RecordAttachment:
        """A new disk file replaces the call's record (Helper::attachFile updates the row)."""
        record = RecordAttachment(via, filename, url, size, sha256, portal.next_file_id, now)
        portal.next_file_id += 1
        portal.records.setdefault(row["CALL_ID"], []).append(record)
        row["RECORD_FILE_ID"] = record.file_id
        row["CALL_RECORD_URL"] = url
        return record

    def _issue_upload_url(self, call: MethodCall, call_id: str) -> str:
        token = secrets.token_urlsafe(24)
        installation = call.installation
        self._upload_tickets[token] = UploadTicket(
            portal=call.portal.name,
            call_id=call_id,
            issued_at=call.now,
            user_id=None if installation else call.webhook.user_id,
            code=None if installation else call.webhook.code,
            member_id=installation.member_id if installation else None,
            client_id=installation.client_id if installation else None,
        )
        return f"{self.base_url}{UPLOAD_PATH}{token}/"

    # The upload route -----------------------------------------------------------------------

    def handle_upload(self, request: IncomingRequest, body: BodyReader) -> Reply:
        """Answer a POST to an upload URL: stream the multipart body, keep the file's size and hash.

        The lock is not held while the body streams in, so other requests go on meanwhile.
        """
        started = self.now()
        token = request.path.removeprefix(UPLOAD_PATH).strip("/")
        with self._lock:
            ticket = self._upload_tickets.get(token)
            admission = self._admit_upload(request, ticket, started)
        received: ReceivedFile | None = None
        early = admission.early
        if early is None:
            early, received = self._receive(request, body)
        else:
            with contextlib.suppress(BodyError):  # the client then reads the answer, not a reset
                body.drain()
        with self._lock:
            if early is not None:
                reply = early
            else:
                reply = self._store_upload(token, ticket, received, started)
                reply.delay_after = admission.delay
            self._record_upload(request, token, ticket, received, reply, admission.fault, started)
        return reply

    def _admit_upload(self, request: IncomingRequest, ticket: UploadTicket | None, started: float) -> _Admission:
        """Method, injections, token, the portal's bucket and random faults, as for REST calls."""
        if request.http_method != "POST":
            return _Admission(early=Reply(405, _error("METHOD_NOT_ALLOWED", "Upload the file with POST")))
        injection = self._take_injection(UPLOAD_METHOD)
        if injection is not None and injection.kind != "slow":
            return _Admission("injected", early=self._injected_reply(injection))
        if ticket is None:
            return _Admission(early=Reply(404, _error("NOT_FOUND", "Unknown or already used upload URL")))
        try:
            self._admit(self._portals[ticket.portal], started)
        except ApiError as error:
            return _Admission(early=Reply(error.status, error.body()))
        fault = self._roll_fault() or ("slow" if injection else "")
        if fault == "error":
            return _Admission(fault, early=Reply(500, _error("INTERNAL_SERVER_ERROR", "Internal server error")))
        if fault == "drop":
            return _Admission(fault, early=Reply(0, None, drop=True))
        if fault == "slow":
            return _Admission(fault, injection.seconds if injection else self.config.slow_seconds)
        return _Admission()

    def _receive(self, request: IncomingRequest, body: BodyReader) -> tuple[Reply | None, ReceivedFile | None]:
        """(refusal, None) or (None, the file part or None when there is none)."""
        try:
            return None, receive_file(body, request.content_type, UPLOAD_FIELD)
        except MultipartError as error:
            with contextlib.suppress(BodyError):
                body.drain()
            # Bitrix24 (PHP) finds no $_FILES entry; the fake says why in a field of its own.
            refusal = self._core_error(UPLOAD_FILE_MISSING).body()
            return Reply(400, {**refusal, "fake_detail": str(error)}), None
        except BodyError as error:
            return Reply(400, _error("INVALID_REQUEST", f"Upload body: {error}")), None

    def _store_upload(
        self, token: str, ticket: UploadTicket | None, received: ReceivedFile | None, started: float
    ) -> Reply:
        if ticket is None or self._upload_tickets.get(token) is not ticket:  # spent meanwhile
            return Reply(404, _error("NOT_FOUND", "Unknown or already used upload URL"))
        try:
            if received is None:
                raise self._core_error(UPLOAD_FILE_MISSING)
            name = file_name(received.filename)  # PHP keeps the base name of an uploaded file
            if file_extension(name) not in RECORD_EXTENSIONS:
                raise self._core_error(WRONG_FILE_EXTENSION)
            portal = self._portals[ticket.portal]
            row = portal.statistics.get(ticket.call_id)
            if row is None:
                raise self._core_error(CALL_NOT_IN_STATISTICS)
        except ApiError as error:
            return Reply(error.status, error.body())
        del self._upload_tickets[token]
        record = self._store_record(portal, row, "upload", name, None, received.size, received.sha256, started)
        return Reply(200, {"result": {"FILE_ID": record.file_id}})

    def _record_upload(
        self,
        request: IncomingRequest,
        token: str,
        ticket: UploadTicket | None,
        received: ReceivedFile | None,
        reply: Reply,
        fault: str,
        started: float,
    ) -> None:
        params: dict[str, Any] = {"token": token}
        if ticket is not None:
            params["CALL_ID"] = ticket.call_id
        if received is not None:
            params.update(filename=received.filename, size=received.size, sha256=received.sha256)
        if reply.status == 503:
            self._count_503 += 1
            if ticket is not None:
                self._portals[ticket.portal].count_503 += 1
        self._requests.append(
            RecordedRequest(
                method=UPLOAD_METHOD,
                params=params,
                http_method=request.http_method,
                user_id=ticket.user_id if ticket else None,
                code=ticket.code if ticket else None,
                portal=ticket.portal if ticket else None,
                status=reply.status,
                response=reply.payload,
                timestamp=started,
                fault="drop" if reply.drop else fault,
                member_id=ticket.member_id if ticket else None,
                client_id=ticket.client_id if ticket else None,
            )
        )


def file_name(path: str) -> str:
    """PHP's ``GetFileName``: the last path segment, trailing dots, spaces and slashes trimmed."""
    trimmed = path.replace("\\", "/").rstrip("\0.\\/+ ").rstrip("/")
    return trimmed.rsplit("/", 1)[-1]


def file_extension(path: str) -> str:
    """PHP's ``GetFileExtension``: what follows the last dot of the name, case kept."""
    name = file_name(path)
    return name.rsplit(".", 1)[1] if "." in name else ""


def _error(code: str, description: str) -> dict[str, str]:
    return {"error": code, "error_description": description}
