"""Sources that exist only in the tests: a signed cloud PBX and an STT vendor, each added the way a real
one is (one module, one registry line), to show that nothing else in the service needs to change."""

from __future__ import annotations

from schemas.registry import PBXS, VENDORS, registry
from tests.sources import acme_pbx, echo_stt

# The registry with the test sources: what `schemas/registry.py`'s one line per source would read.
SOURCES = registry((*PBXS, acme_pbx.SOURCE), (*VENDORS, echo_stt.VENDOR))
