"""A stand-in for the AWS endpoints the `aws` vendor talks to, on 127.0.0.1 (boto3 reaches it through
`B24SCRIBE_AWS_API_URL`, its `endpoint_url`):

- Transcribe's JSON protocol: `POST /` with `X-Amz-Target: Transcribe.GetTranscriptionJob`;
- S3 GetObject, path style: `GET /<bucket>/<key>`;
- plain GETs of files (a presigned transcript URL, an SNS signing certificate, a SubscribeURL).

It also makes what SNS has: a self-signed RSA certificate and its key, to sign messages with SNS's
algorithm (`sign_sns`), served at `/SimpleNotificationService-test.pem`.
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from schemas.aws import string_to_sign

CERT_PATH = "/SimpleNotificationService-test.pem"


@dataclass
class AwsRequest:
    """What one request asked."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def _self_signed() -> tuple[rsa.RSAPrivateKey, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.test.amazonaws.com")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return key, certificate.public_bytes(serialization.Encoding.PEM)


_KEY, _CERT = _self_signed()  # one per test session: RSA key generation is slow


@dataclass
class FakeAws:
    """Jobs by name, objects and files by path; records every request."""

    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    requests: list[AwsRequest] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    key: rsa.RSAPrivateKey = _KEY
    certificate: bytes = _CERT

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def host(self) -> str:
        return self.url.removeprefix("http://")

    @property
    def cert_url(self) -> str:
        return self.url + CERT_PATH

    def add_job(self, job: dict[str, Any]) -> None:
        """Answer GetTranscriptionJob for `job["TranscriptionJobName"]` with `{"TranscriptionJob": job}`."""
        self.jobs[job["TranscriptionJobName"]] = job

    def serve(self, path: str, body: bytes, status: int = 200) -> None:
        """Answer GET `path` (with its query, if any) with `body`."""
        self.files[path] = (status, body)

    def sign_sns(self, message: dict[str, Any], version: str = "1", key: rsa.RSAPrivateKey | None = None) -> bytes:
        """The SNS message signed as SNS signs it (SignatureVersion 1: SHA1withRSA, 2: SHA256withRSA)."""
        # SNS's SignatureVersion 1 is SHA1withRSA: the test signs as SNS does
        algorithm: hashes.HashAlgorithm = hashes.SHA1() if version == "1" else hashes.SHA256()  # noqa: S303
        signed = {
            **message,
            "SignatureVersion": version,
            "SigningCertURL": message.get("SigningCertURL", self.cert_url),
        }
        signature = (key or self.key).sign(string_to_sign(signed), padding.PKCS1v15(), algorithm)
        return json.dumps({**signed, "Signature": base64.b64encode(signature).decode()}).encode()

    def targets(self) -> list[str]:
        """The Transcribe operations and the GETs asked, in order."""
        return [r.headers.get("x-amz-target") or f"{r.method} {r.path}" for r in self.requests]

    def start(self) -> FakeAws:
        fake = self
        fake.files[CERT_PATH] = (200, fake.certificate)

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, body: bytes, content_type: str = "application/x-amz-json-1.1") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _record(self) -> AwsRequest:
                length = int(self.headers.get("Content-Length") or 0)
                request = AwsRequest(
                    self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, self.rfile.read(length)
                )
                fake.requests.append(request)
                return request

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                request = self._record()
                if request.headers.get("x-amz-target") != "Transcribe.GetTranscriptionJob":
                    self._send(400, b'{"__type": "UnknownOperationException"}')
                    return
                name = json.loads(request.body).get("TranscriptionJobName")
                job = fake.jobs.get(name)
                if job is None:
                    error = {
                        "__type": "BadRequestException",
                        "Message": "The requested job couldn't be found. Check the job name and try again.",
                    }
                    self._send(400, json.dumps(error).encode())
                    return
                self._send(200, json.dumps({"TranscriptionJob": job}).encode())

            def do_GET(self) -> None:  # noqa: N802
                request = self._record()
                status, body = fake.files.get(request.path, (404, b"<Error><Code>NoSuchKey</Code></Error>"))
                self._send(status, body, "application/octet-stream")

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def fake_aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAws]:
    """A running fake AWS, with test credentials in the environment (the standard chain's first link)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKETESTKEY00001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret-access-key-for-tests")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    aws = FakeAws().start()
    yield aws
    aws.stop()
