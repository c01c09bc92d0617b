"""Per-portal pacing shared by every worker: a token bucket and one request in flight, in the database.

Bitrix24 counts requests per portal and source IP in a leaky bucket (2/s after a burst of 50; 5/s
and 250 on Enterprise) and answers 503 QUERY_LIMIT_EXCEEDED beyond it. Our bucket is the mirror
image with a smaller burst, so we never reach theirs. Failure policy: fails closed — a portal whose
row is locked or whose bucket is empty is simply not claimed now; nothing is sent to find out.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import and_, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement

from b24scribe.models import PortalPacing

THROTTLE_PAUSE_SECONDS = 5.0
BUSY_SECONDS = 0.05


@dataclass(frozen=True, slots=True)
class Pace:
    """The pacing all portals get: requests per second after a burst."""

    rate_per_second: float
    burst: int
    lease_seconds: float


def portal_blocked(now: float, pace: Pace) -> ColumnElement[bool]:
    """SQL condition: this portal cannot take a request now (paused, busy or out of tokens)."""
    return or_(
        PortalPacing.paused_until > now,
        and_(PortalPacing.inflight_owner.is_not(None), PortalPacing.inflight_expires_at > now),
        PortalPacing.tokens + (now - PortalPacing.refilled_at) * pace.rate_per_second < 1.0,
    )


def take_token(session: Session, portal: str, owner: str, now: float, pace: Pace, lock: bool) -> float | None:
    """Take a token and the in-flight slot for `portal`; None if granted, else seconds to wait."""
    row = _claimable_row(session, portal, now, pace, lock)
    if row is None:
        return BUSY_SECONDS  # another worker is claiming for this portal right now
    if row.paused_until > now:
        return row.paused_until - now
    if row.inflight_owner is not None and (row.inflight_expires_at or 0.0) > now:
        return BUSY_SECONDS
    tokens = min(float(pace.burst), row.tokens + (now - row.refilled_at) * pace.rate_per_second)
    if tokens < 1.0:
        row.tokens, row.refilled_at = tokens, now
        return (1.0 - tokens) / pace.rate_per_second
    row.tokens, row.refilled_at = tokens - 1.0, now
    row.inflight_owner, row.inflight_expires_at = owner, now + pace.lease_seconds
    return None


def _claimable_row(session: Session, portal: str, now: float, pace: Pace, lock: bool) -> PortalPacing | None:
    """The portal's row, created full if new; with `lock` (PostgreSQL) locked, or None when another
    claimer holds it: claimers never wait for each other's rows (no waits, so no deadlocks)."""
    query = select(PortalPacing).where(PortalPacing.portal == portal)
    if lock:
        query = query.with_for_update(skip_locked=True)
    row = session.scalars(query).one_or_none()
    if row is not None:
        return row
    if lock and session.scalar(select(PortalPacing.portal).where(PortalPacing.portal == portal)) is not None:
        return None
    # Two workers may meet a new portal at once: insert-or-nothing, then take whichever row won.
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    session.execute(
        insert(PortalPacing)
        .values(portal=portal, tokens=float(pace.burst), refilled_at=now, paused_until=0.0)
        .on_conflict_do_nothing(index_elements=["portal"])
    )
    return session.scalars(query).one_or_none()


def take_followup_token(session: Session, portal: str, now: float, pace: Pace) -> float | None:
    """A token for a further request of the job holding `portal`'s in-flight slot (the look-up
    before a resend); None if granted, else seconds to wait. Only the holder spends tokens, so
    the wait is at most one token's refill."""
    query = select(PortalPacing).where(PortalPacing.portal == portal)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    row = session.scalars(query).one_or_none()
    if row is None:
        return None
    tokens = min(float(pace.burst), row.tokens + (now - row.refilled_at) * pace.rate_per_second)
    if tokens < 1.0:
        return (1.0 - tokens) / pace.rate_per_second
    row.tokens, row.refilled_at = tokens - 1.0, now
    return None


def release(session: Session, portal: str, owner: str) -> None:
    """Give back the in-flight slot after the request finished (whatever its outcome)."""
    row = session.get(PortalPacing, portal)
    if row is not None and row.inflight_owner == owner:
        row.inflight_owner, row.inflight_expires_at = None, None


def pause(session: Session, portal: str, until: float, reason: str, now: float) -> None:
    """Stop sending to `portal` until `until` (503 QUERY_LIMIT_EXCEEDED, 429 OPERATION_TIME_LIMIT)."""
    row = session.get(PortalPacing, portal)
    if row is None:
        return
    row.paused_until = max(row.paused_until, until)
    row.pause_reason = reason
    row.tokens, row.refilled_at = 0.0, now
