"""The callback a vendor gets when b24scribe submits a recording itself (contract §10): its URL on
B24SCRIBE_PUBLIC_URL, naming the call, and its per-call credential.

The credential is an HMAC of the call it names (vendor, portal, PBX, PBX call id) under a key derived
from B24SCRIBE_INBOUND_TOKEN: it is checked at the door from the URL's query and the credential the
request carries, before the body is read and without a database read, and it opens that one call's
callback only. A vendor that leaks it can post a transcript for that call, nothing else; a changed
query (another call) does not match it. Where it travels depends on the vendor: in the URL (Basic
credentials, or `?token=`), or in a header the vendor sends back (AssemblyAI's
webhook_auth_header_name/value, Rev.ai's notification_config.auth_headers), which keeps it out of
the vendor's logs and dashboards, where a URL shows.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from b24scribe.settings import Settings

CREDENTIAL_USER = "b24scribe"  # the user name of the Basic credentials put in a callback URL
_KEY_LABEL = b"b24scribe transcription callback"

# where a callback carries its credential: the URL's userinfo (Basic credentials, Deepgram's way), its
# query (`?token=`), or neither (the vendor sends it back in a header of its own: `header_credential`)
CredentialPlace = Literal["userinfo", "query", "header"]


def callback_secret(settings: Settings, vendor: str, portal: str, pbx: str, pbx_call_id: str) -> str | None:
    """The credential of one call's callback (None without B24SCRIBE_INBOUND_TOKEN)."""
    if not settings.inbound_token:
        return None
    key = hmac.new(settings.inbound_token.encode(), _KEY_LABEL, hashlib.sha256).digest()
    message = "\n".join((vendor, portal, pbx, pbx_call_id)).encode("utf-8", "surrogatepass")
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:40]


def callback_query(settings: Settings, portal: str, pbx: str, pbx_call_id: str) -> dict[str, str]:
    """The query naming the call (the portal only when it is not the settings' own)."""
    query = {"pbx": pbx, "call": pbx_call_id}
    if portal != settings.portal:
        query["portal"] = portal
    return query


def credential_for(settings: Settings, vendor: str, query: dict[str, str]) -> str | None:
    """The credential a callback with this query must carry (None: the query names no call)."""
    pbx, call = query.get("pbx"), query.get("call")
    if settings.transcribe_with is None or not pbx or not call:
        return None
    return callback_secret(settings, vendor, query.get("portal") or settings.portal, pbx, call)


def callback_url(
    settings: Settings, vendor: str, portal: str, pbx: str, pbx_call_id: str, credential: CredentialPlace
) -> str:
    """The URL the vendor calls back: `/hooks/stt/<vendor>?pbx=…&call=…`, with the credential as Basic
    credentials in the URL ("userinfo", Deepgram's way), as `?token=` ("query", vendors that keep the
    URL and send nothing else back) or nowhere in it ("header": see `header_credential`)."""
    assert settings.public_url is not None, "B24SCRIBE_TRANSCRIBE_WITH needs B24SCRIBE_PUBLIC_URL (settings check)"
    secret = callback_secret(settings, vendor, portal, pbx, pbx_call_id) or ""
    query = callback_query(settings, portal, pbx, pbx_call_id)
    base = urlsplit(f"{settings.public_url}/hooks/stt/{vendor}")
    netloc = base.netloc
    if credential == "userinfo":
        netloc = f"{CREDENTIAL_USER}:{quote(secret, safe='')}@{base.netloc}"
    elif credential == "query":
        query["token"] = secret
    return urlunsplit((base.scheme, netloc, base.path, urlencode(query), ""))


def header_credential(settings: Settings, vendor: str, url: str) -> tuple[str, str | None]:
    """For a vendor that sends the credential back in a header: the callback URL with no credential
    left in it (no userinfo, no `?token=`), and the credential alone, exactly what the door expects
    of a callback to that URL (None: B24SCRIBE_INBOUND_TOKEN or B24SCRIBE_TRANSCRIBE_WITH is not set,
    or the URL names no call)."""
    parts = urlsplit(url)
    query = [(name, value) for name, value in parse_qsl(parts.query, keep_blank_values=True) if name != "token"]
    netloc = parts.netloc.rpartition("@")[2]
    bare = urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), ""))
    return bare, credential_for(settings, vendor, dict(query))
