"""What a source is: every PBX and STT vendor, described once as data (docs/architecture.md).

A source is one module under `schemas/` exporting its description (`SOURCE` for a PBX, `VENDOR` for
an STT vendor) and one line in `schemas/registry.py`. Everything else reads the registry: the hook
router (its routes, body limits and credentials), parsing and replay, the worker's vendor fetches,
the OpenAPI document, metrics labels and `flask check`.

The core never imports `schemas/`: the app builds a `Sources` from the registry and hands it to
whatever needs it (the hooks, the worker, replay, the commands).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from b24scribe.events import CallEvent
from b24scribe.settings import Settings
from b24scribe.transcript import VendorResult

if TYPE_CHECKING:
    from b24scribe.inbound_auth import Authenticated, HookRequest

# parse(raw_body, query) -> VendorResult; raises marshmallow.ValidationError naming each bad field.
Parser = Callable[[bytes, Mapping[str, str]], VendorResult]
# parse(raw_body, query) -> CallEvent; raises marshmallow.ValidationError naming each bad field.
CallEventParser = Callable[[bytes, Mapping[str, str]], CallEvent]
Kind = Literal["pbx", "stt"]


class SignatureScheme(Protocol):
    """A credential that signs the request (its URL, headers and raw body) with a shared secret.

    The router asks `present` first; a request that carries the scheme's headers, for a route whose
    secret is set, is checked by `before_body` (what the headers alone can refuse, such as a stale
    timestamp), then its body is read (at most the route's limit) and `verify` decides.
    """

    name: str  # as logged and in the OpenAPI document (`standard-webhooks` → `standardWebhooks`)
    signature_header: str  # the header carrying the signature (documented)
    description: str  # for the OpenAPI document: what signs, with which setting

    def configured(self, settings: Settings, source: str) -> bool:
        """Its secret is set for this source."""
        ...

    def present(self, request: HookRequest) -> bool:
        """The request carries this scheme's signature headers."""
        ...

    def before_body(self, request: HookRequest, settings: Settings, source: str) -> None:
        """Refuse (AuthFailure) what the headers alone show to be wrong."""
        ...

    def verify(self, request: HookRequest, body: bytes, settings: Settings, source: str) -> Authenticated:
        """Verify the signature over the raw bytes; AuthFailure when it does not hold."""
        ...


class FetchError(Exception):
    """A fetch that found no result: `retry` spends an attempt of the retry schedule (the vendor is
    unreachable, busy or erring), else the job is dead with `reason` (a missing key, a refusal, an
    unreadable answer)."""

    def __init__(self, reason: str, retry: bool) -> None:
        super().__init__(reason)
        self.reason, self.retry = reason, retry


@dataclass(frozen=True, slots=True)
class FetchContext:
    """What a vendor's own fetch works with (`FetchSpec.run`): the configured API base URL and key
    (`B24SCRIBE_<VENDOR>_API_URL` / `_API_KEY`), the id its callback carried, the stored callback's
    body and query, an HTTP session, the timeout (B24SCRIBE_VENDOR_TIMEOUT_SECONDS) and the settings
    (for more of the vendor's own, `settings.vendor_setting(vendor, NAME)`)."""

    vendor: str
    api_url: str
    api_key: str | None
    fetch_id: str
    callback_body: bytes
    callback_query: Mapping[str, str]
    http: Any  # requests.Session
    timeout: float
    settings: Settings

    def get(self, url: str, headers: Mapping[str, str] | None = None, what: str = "API") -> Any:
        """GET `url`; the answer (a requests.Response) when it is a 200, else FetchError: unreachable,
        5xx and 429 are retried, any other status is not."""
        import requests

        try:
            answer = self.http.get(url, headers=dict(headers or {}), timeout=self.timeout)
        except requests.RequestException as exc:
            raise FetchError(f"{self.vendor} {what} unreachable: {type(exc).__name__}", retry=True) from None
        if answer.status_code != 200:
            retry = answer.status_code >= 500 or answer.status_code == 429
            raise FetchError(f"{self.vendor} {what} answered HTTP {answer.status_code}", retry=retry)
        return answer


@dataclass(frozen=True, slots=True)
class FetchSpec:
    """How to fetch a finished transcript from a vendor whose callback carries only an id.

    The simple way, one GET: `path` is formatted with `{id}` and appended to the vendor API base URL
    (`B24SCRIBE_<VENDOR>_API_URL`, default `default_api_url`); `headers(api_key)` gives the request
    headers; `parse` turns the fetched body into a VendorResult. A vendor whose result takes more
    (a job, then its result file; pages) gives `run(context) -> VendorResult` instead, raising
    FetchError for what went wrong.
    """

    default_api_url: str
    path: str = ""
    headers: Callable[[str], dict[str, str]] | None = None
    parse: Parser | None = None
    run: Callable[[FetchContext], VendorResult] | None = None
    needs_api_key: bool = True  # B24SCRIBE_<VENDOR>_API_KEY must be set (else the job is dead, saying so)


@dataclass(frozen=True, slots=True)
class HookAnswer:
    """A source's own answer to a request that is not an event (a registration challenge, a ping, a
    subscription confirmation): sent as it is, nothing stored."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"


# answer(request, body, settings) -> HookAnswer | None: asked after authentication, before parsing.
Answerer = Callable[["HookRequest", bytes, "Settings"], HookAnswer | None]
# The credentials a PBX's recording URL needs (`requests` auth: a (user, password) pair or an
# AuthBase), from the URL and the settings; None: the URL is fetched without any.
RecordingAuth = Callable[[str, "Settings"], Any]
# A PBX whose recording event names the recording by its API (Zadarma: `pbx/record/request`): the URL
# stored on the call → the file's own URL, asked when the recording is attached or submitted. Raises
# b24scribe.delivery.download's NotReady (retried on the schedule) or Refused (the job ends).
RecordingResolver = Callable[[str, "Settings", Any], str]


@dataclass(frozen=True, slots=True)
class SttVendor:
    """One speech-to-text vendor: how its callback is authenticated, read and, if needed, fetched."""

    name: str
    parse: Parser
    fetch: FetchSpec | None = None
    # Header carrying the vendor's own shared-secret auth, compared to B24SCRIBE_INBOUND_TOKEN
    # (e.g. AssemblyAI's webhook_auth_header_name); bearer/?token=/Basic are always accepted.
    auth_header: str | None = None
    # Signatures over the request this vendor may send instead of the token (tried first).
    signatures: tuple[SignatureScheme, ...] = ()
    # Its fetch may name the call (AWS job tags, Azure customProperties): a callback that only names
    # its job is accepted without naming the call, and placed on its call once the fetch says which.
    fetch_names_call: bool = False
    # A header carrying the vendor's own delivery id, the same on each retry: the event's dedupe key.
    delivery_header: str | None = None
    answer: Answerer | None = None  # requests that are not events (challenges, pings, confirmations)
    methods: tuple[str, ...] = ("POST",)  # e.g. ("GET", "POST") for a vendor that checks its URL with a GET
    summary: str = ""  # one line for the OpenAPI document
    # The OpenAPI schema of its callback body (a marshmallow schema class), when it has one of ours.
    openapi_schema: object | None = None

    @property
    def kind(self) -> Kind:
        return "stt"


@dataclass(frozen=True, slots=True)
class PbxSource:
    """One PBX: how its call events are authenticated and read, and how it names its calls."""

    name: str
    parse: CallEventParser
    # "json": a JSON body. "form": form fields, in the body or (with no body) the query; the values
    # are stripped, so a call id named in a transcript URL is stripped the same way.
    encoding: Literal["json", "form"] = "json"
    auth_header: str | None = None
    signatures: tuple[SignatureScheme, ...] = ()
    delivery_header: str | None = None
    answer: Answerer | None = None
    methods: tuple[str, ...] = ("POST",)  # e.g. ("GET", "POST") for a PBX that checks its URL with a GET
    # the PBX posts to paths below the URL it is given (Mango: <url>/events/call): the same hook
    subpaths: bool = False
    summary: str = ""
    # The OpenAPI schema of its event (a marshmallow schema class or instance), when it has one.
    openapi_schema: object | None = None
    # Its parser itself enforces contract §12's ranges (a test holds it to it), so the registry's
    # backstop is not paid twice on the hot path.
    checks_limits: bool = False
    # Where its recordings live (its own API or storage host): downloads may go there without
    # B24SCRIBE_RECORDING_HOSTS naming it (contract §9), with these credentials.
    recording_hosts: tuple[str, ...] = ()
    recording_auth: RecordingAuth | None = None
    resolve_recording: RecordingResolver | None = None  # (url, settings, requests.Session) -> the file's URL

    @property
    def kind(self) -> Kind:
        return "pbx"

    @property
    def form(self) -> bool:
        return self.encoding == "form"


Source = SttVendor | PbxSource


@dataclass(frozen=True)
class Sources:
    """The registry: every source by kind and name (built by `schemas/registry.py`)."""

    stt: Mapping[str, SttVendor] = field(default_factory=dict)
    pbx: Mapping[str, PbxSource] = field(default_factory=dict)

    def of(self, kind: Kind) -> Mapping[str, Source]:
        """The sources of one kind, by name."""
        return self.pbx if kind == "pbx" else self.stt

    def get(self, kind: Kind, name: str) -> Source | None:
        return self.of(kind).get(name)

    def __iter__(self) -> Iterator[Source]:
        yield from self.pbx.values()
        yield from self.stt.values()

    def labels(self) -> list[tuple[str, str]]:
        """(kind, name) of every source: the bounded label values of the hooks' metrics."""
        return [(source.kind, source.name) for source in self]

    def adding(self, *sources: Source) -> Sources:
        """A registry with these sources added (or replacing ones of the same kind and name)."""
        stt, pbx = dict(self.stt), dict(self.pbx)
        for source in sources:
            if isinstance(source, PbxSource):
                pbx[source.name] = source
            else:
                stt[source.name] = source
        return Sources(stt=stt, pbx=pbx)
