"""Bitrix24's limits: the per-portal leaky bucket and the per-method operating time.

The leaky bucket answers 503 QUERY_LIMIT_EXCEEDED when a portal sends faster than it drains;
the operating-time limit answers 429 OPERATION_TIME_LIMIT once a method has used its seconds
in the last 10 minutes, and every successful answer reports that usage in its ``time`` block.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fake_bitrix24.protocol import ApiError, _local_iso

if TYPE_CHECKING:
    from fake_bitrix24.state import FakeConfig, PortalState

OPERATING_WINDOW_MINUTES = 10


@dataclass
class LeakyBucket:
    """Bitrix24's request-rate limiter: +1 per request, drains ``rate`` per second."""

    level: float = 0.0
    updated_at: float = 0.0

    def admit(self, now: float, burst: float, rate: float, count_rejected: bool) -> bool:
        """Take one request; False when the bucket would overflow ``burst``."""
        self.level = max(0.0, self.level - (now - self.updated_at) * rate)
        self.updated_at = now
        if self.level + 1 > burst:
            if count_rejected:
                self.level += 1
            return False
        self.level += 1
        return True


class LimitsMixin:
    """The limit checks of FakeBitrix24's request pipeline (called with its lock held)."""

    config: FakeConfig

    if TYPE_CHECKING:  # FakeBitrix24.now, the fake's clock

        def now(self) -> float: ...

    def _admit(self, portal: PortalState, now: float) -> None:
        """Failure policy: the bucket is checked before auth, so bad credentials also count."""
        burst = self.config.burst
        if burst is None:
            return
        if not portal.bucket.admit(now, burst, self.config.rate, self.config.count_rejected):
            raise ApiError(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")

    def _operating_usage(self, portal: PortalState, key: tuple[str, str], now: float) -> tuple[float, int]:
        """(seconds used in the last 10 minutes, unix time the oldest minute drops out)."""
        minutes = portal.operating.get(key, {})
        current = int(now // 60)
        for minute in [m for m in minutes if m <= current - OPERATING_WINDOW_MINUTES]:
            del minutes[minute]
        if not minutes:
            return 0.0, int(now) + OPERATING_WINDOW_MINUTES * 60
        return sum(minutes.values()), (min(minutes) + OPERATING_WINDOW_MINUTES) * 60

    def _check_operating_limit(self, portal: PortalState, key: tuple[str, str], now: float) -> None:
        limit = self.config.operating_limit
        if limit is None:
            return
        used, reset_at = self._operating_usage(portal, key, now)
        if used >= limit:
            raise _operating_limit_error(self._time_block(now, used, reset_at))

    def _charge_operating(self, portal: PortalState, key: tuple[str, str], now: float) -> None:
        minutes = portal.operating.setdefault(key, {})
        minute = int(now // 60)
        minutes[minute] = minutes.get(minute, 0.0) + self.config.operating_cost

    def _time_block(self, started: float, operating: float, reset_at: int) -> dict[str, Any]:
        finish = self.now()
        block: dict[str, Any] = {
            "start": started,
            "finish": finish,
            "duration": finish - started,
            "processing": finish - started,
            "date_start": _local_iso(started),
            "date_finish": _local_iso(finish),
        }
        if self.config.operating_in_time:
            block["operating_reset_at"] = reset_at
            block["operating"] = round(operating, 4)
        return block


def _operating_limit_error(timing: Mapping[str, Any]) -> ApiError:
    # Real 429s carry no Retry-After; the fake adds `time` so clients can read operating_reset_at.
    return ApiError(
        429,
        "OPERATION_TIME_LIMIT",
        "Method is blocked due to operation time limit.",
        {"time": dict(timing)},
    )
