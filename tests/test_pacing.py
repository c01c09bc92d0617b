"""Per-portal pacing at Bitrix24's real limits: three portals drained in parallel as fast as the
bucket allows, no 503, at most B24SCRIBE_PORTAL_CONCURRENCY requests in flight per portal.
bench/pacing.py runs the same with more transcripts (`python bench/pacing.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from b24scribe.settings import Settings
from bench.pacing import PacingConfig, describe, most_over_bucket, run_pacing


def test_most_over_bucket_measures_the_worst_window() -> None:
    assert most_over_bucket([0.0, 0.0, 0.0], burst=3, rate=1) == 0
    assert most_over_bucket([0.0, 0.0, 0.0, 0.5], burst=3, rate=1) == pytest.approx(0.5)
    assert most_over_bucket([0.0, 1.0, 2.0, 3.0], burst=1, rate=1) == 0


@pytest.mark.timeout(180)
def test_three_portals_at_the_real_limits_take_the_bucket_minimum_and_never_see_a_503(
    database_url: str, tmp_path: Path
) -> None:
    # Fake: burst 50, 2/s per portal (Bitrix24's cloud limits). Service: its defaults, 2/s after 45.
    config = PacingConfig(portals=3, per_portal=60, fake_burst=50, fake_rate=2, time_limit=90)
    result = run_pacing(database_url, config, tmp_path)
    print(describe(result))

    assert (result.rate, result.burst) == (2.0, 45), "the service's defaults"
    assert result.finished, describe(result)
    assert result.requests == 3 * 60, "one request per transcript"
    assert result.count_503 == 0, describe(result)
    assert result.max_over_bucket <= 0, "never above the fake's burst + rate × t in any window"
    assert 1 <= result.max_in_flight <= Settings().portal_concurrency, "at most the portal's slots in flight"
    assert result.ideal_seconds == pytest.approx((60 - 45) / 2)
    assert result.efficiency >= 0.9, describe(result)
    assert result.efficiency <= 1.05, "not faster than the bucket allows"
