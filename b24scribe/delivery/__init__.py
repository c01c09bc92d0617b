"""Executing outbox jobs: register → finish → attachTranscription per call, and vendor fetches.

The package is split along its seams:

- `params`: the Bitrix24 request parameters, pure functions of a call and its transcript;
- `sender`: the portal sender, the one way a request reaches Bitrix24 (clients, pacing, dry run,
  lease fencing, the error → outbox policy; OAuth token refresh goes there too);
- `steps`: the register/finish/attach steps (already done? → send → record), with typed outcomes;
- `outcomes`: those typed outcomes (small frozen dataclasses) and the rows each one writes;
- `fetches`: the vendor fetch step (an STT vendor's API, with a timeout of its own);
- `recording`: outcomes gathered per thread and written, leases checked, in group commits;
- `deliverer`: `Deliverer`, which runs a claimed batch through the steps.

The names the rest of the code imports are kept here.
"""

from __future__ import annotations

from b24scribe.delivery.deliverer import Deliverer
from b24scribe.delivery.params import (
    PHONE_CHARACTERS,
    STATUS_CODES,
    TYPE_INBOUND,
    TYPE_OUTBOUND,
    UNKNOWN_NUMBER,
    build_attach,
    current_parts,
    external_call_id,
    finish_params,
    phone_for_bitrix24,
    register_params,
    side_rules,
    transcript_digest,
    user_params,
)
from b24scribe.delivery.recording import MAX_REASON, GroupCommit, database_unavailable
from b24scribe.delivery.sender import LeaseLost, PortalSender, pace_from

__all__ = [
    "MAX_REASON",
    "PHONE_CHARACTERS",
    "STATUS_CODES",
    "TYPE_INBOUND",
    "TYPE_OUTBOUND",
    "UNKNOWN_NUMBER",
    "Deliverer",
    "GroupCommit",
    "LeaseLost",
    "PortalSender",
    "build_attach",
    "current_parts",
    "database_unavailable",
    "external_call_id",
    "finish_params",
    "pace_from",
    "phone_for_bitrix24",
    "register_params",
    "side_rules",
    "transcript_digest",
    "user_params",
]
