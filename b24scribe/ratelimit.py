"""Per-portal pacing shared by every worker: a token bucket and a few requests in flight, in the database.

Bitrix24 counts requests per portal and source IP in a leaky bucket (2/s after a burst of 50; 5/s
and 250 on Enterprise) and answers 503 QUERY_LIMIT_EXCEEDED beyond it. Our bucket is the mirror
image with a smaller burst, so we never reach theirs. A portal's in-flight slots are its leased
jobs (at most `Pace.concurrency`): a slot is taken with a claim and freed with the lease, however
the lease ends (done, retried, or taken back from a dead worker). A token is taken at the claim,
a moment before its request goes out; at most `concurrency` tokens of a portal are held that way,
so the requests themselves stay within burst + concurrency (45 + 4 < Bitrix24's 50). Failure
policy: fails closed — a portal whose row another claimer holds, whose bucket is empty or whose
slots are taken is simply not claimed now; nothing is sent to find out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import BindParameter, Float, Integer, Select, bindparam, func, or_, select, union
from sqlalchemy.orm import Session

from b24scribe.db import upsert_insert
from b24scribe.models import Job, Portal, PortalPacing, PortalState

THROTTLE_PAUSE_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Pace:
    """The pacing all portals get: requests per second after a burst, and requests in flight."""

    rate_per_second: float
    burst: int
    lease_seconds: float
    concurrency: int = 4

    def tokens_at(self, tokens: float, refilled_at: float, now: float) -> float:
        """The bucket's level at `now`, refilled since `refilled_at`, never above the burst."""
        return min(float(self.burst), tokens + max(0.0, now - refilled_at) * self.rate_per_second)

    @property
    def stall_seconds(self) -> float:
        """A request slower than this stalled its portal (two tokens' time, at least a second)."""
        return max(1.0, 2.0 / self.rate_per_second)


# The parameters of BLOCKED, given with every statement that uses it (`blocked_params`).
NOW = bindparam("b_now", type_=Float())
_RATE = bindparam("b_rate", type_=Float())
_CONCURRENCY = bindparam("b_concurrency", type_=Integer())


def _blocked() -> Select[tuple[str]]:
    paced = select(PortalPacing.portal).where(
        or_(PortalPacing.paused_until > NOW, PortalPacing.tokens + (NOW - PortalPacing.refilled_at) * _RATE < 1.0)
    )
    full = (
        select(Job.portal)
        .where(Job.state == "leased", Job.portal.is_not(None))
        .group_by(Job.portal)
        .having(func.count() >= _CONCURRENCY)
    )
    # installed portals that cannot be called (needs re-install, uninstalled): their jobs wait
    unavailable = select(Portal.name).where(Portal.state != PortalState.INSTALLED)
    return select(union(paced, full, unavailable).subquery().c[0])


BLOCKED = _blocked()
"""The portals that cannot take a request now: paused, out of tokens, or every slot taken.

One set, computed once per claim (leased jobs are few), so claiming never walks a blocked portal's
jobs to find out that each of them must wait. Built once, with its parameters bound at execution
(`blocked_params`): the claim runs it several times a second, and building and compiling it anew
each time cost more CPU than SQLite's running it.
"""


def blocked_params(now: float, pace: Pace) -> dict[str, float]:
    """The values of BLOCKED's parameters."""
    return {"b_now": now, "b_rate": pace.rate_per_second, "b_concurrency": pace.concurrency}


@dataclass(slots=True)
class Budget:
    """What one claim may still take from a portal: tokens and free slots (its row is ours)."""

    row: PortalPacing
    tokens: float
    slots: int
    taken: int = 0

    def take(self) -> bool:
        """Take a token and a slot for one request, if both are there."""
        if self.tokens < 1.0 or self.slots < 1:
            return False
        self.tokens -= 1.0
        self.slots -= 1
        self.taken += 1
        return True


_PORTALS: BindParameter[list[str]] = bindparam("b_portals", expanding=True)
_ROWS = {
    False: select(PortalPacing).where(PortalPacing.portal.in_(_PORTALS)),
    True: select(PortalPacing).where(PortalPacing.portal.in_(_PORTALS)).with_for_update(skip_locked=True),
}
_NAMES = select(PortalPacing.portal).where(PortalPacing.portal.in_(_PORTALS))
_IN_FLIGHT = (
    select(Job.portal, func.count()).where(Job.state == "leased", Job.portal.in_(_PORTALS)).group_by(Job.portal)
)


def budgets(session: Session, portals: Iterable[str], now: float, pace: Pace, lock: bool) -> dict[str, Budget]:
    """The budgets of `portals` that can take a request now; rows are created full for new portals.

    With `lock` (PostgreSQL) the rows are locked and a row another claimer holds is skipped:
    claimers never wait for each other's rows (no waits, so no deadlocks). Slots are counted after
    the lock, so two claimers never hand out the same portal's last slot.
    """
    wanted = sorted(set(portals))
    if not wanted:
        return {}
    rows = {row.portal: row for row in session.scalars(_ROWS[lock], {"b_portals": wanted})}
    missing = [portal for portal in wanted if portal not in rows]
    if missing and lock:  # locked by another claimer, or really new
        missing = sorted(set(missing) - set(session.scalars(_NAMES, {"b_portals": missing})))
    if missing:
        # Two workers may meet a new portal at once: insert-or-nothing, then take whichever row won.
        session.execute(
            upsert_insert(session)(PortalPacing)
            .values(
                [{"portal": p, "tokens": float(pace.burst), "refilled_at": now, "paused_until": 0.0} for p in missing]
            )
            .on_conflict_do_nothing(index_elements=["portal"])
        )
        rows.update({row.portal: row for row in session.scalars(_ROWS[lock], {"b_portals": missing})})
    counted = session.connection().execute(_IN_FLIGHT, {"b_portals": list(rows)})
    in_flight: dict[str | None, int] = {portal: count for portal, count in counted}
    found: dict[str, Budget] = {}
    for portal, row in rows.items():
        if row.paused_until > now:
            continue
        found[portal] = Budget(
            row, pace.tokens_at(row.tokens, row.refilled_at, now), pace.concurrency - in_flight.get(portal, 0)
        )
    return found


def spend(budget: Budget, now: float) -> None:
    """Write what a claim took back to the portal's row (in the claim's transaction)."""
    if budget.taken:
        budget.row.tokens, budget.row.refilled_at = budget.tokens, now


def take_followup_token(session: Session, portal: str, now: float, pace: Pace) -> float | None:
    """A token for a further request of a job holding one of `portal`'s slots (the look-up before a
    resend); None if granted, else seconds to wait. The holder keeps its slot meanwhile."""
    query = select(PortalPacing).where(PortalPacing.portal == portal)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    row = session.scalars(query).one_or_none()
    if row is None:
        return None
    tokens = pace.tokens_at(row.tokens, row.refilled_at, now)
    if tokens < 1.0:
        return (1.0 - tokens) / pace.rate_per_second
    row.tokens, row.refilled_at = tokens - 1.0, now
    return None


def settle(session: Session, stalled: Iterable[str], now: float, pace: Pace) -> None:
    """After requests that stalled (answered after `Pace.stall_seconds`): their portals keep at
    most `concurrency` tokens, so what the bucket gathered while their requests were stuck is
    spread at the rate, not sent as one burst when they come back."""
    portals = sorted(set(stalled))
    if not portals:
        return
    query = select(PortalPacing).where(PortalPacing.portal.in_(portals))
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    for row in session.scalars(query):
        row.tokens = min(pace.tokens_at(row.tokens, row.refilled_at, now), float(pace.concurrency))
        row.refilled_at = now


def pause(session: Session, portal: str, until: float, reason: str, now: float) -> None:
    """Stop sending to `portal` until `until` (503 QUERY_LIMIT_EXCEEDED, 429 OPERATION_TIME_LIMIT)."""
    row = session.get(PortalPacing, portal)
    if row is None:
        return
    row.paused_until = max(row.paused_until, until)
    row.pause_reason = reason
    row.tokens, row.refilled_at = 0.0, now
