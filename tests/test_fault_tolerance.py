"""Nothing lost, nothing doubled, never throttled: 1,000 transcripts through a real gunicorn web
process and worker processes that are killed with SIGKILL, while the fake Bitrix24 answers 10 % of
requests with 500, 10 % too late (after doing them), and enforces its leaky bucket.

The run itself is bench/fault_run.py (`python bench/fault_run.py` prints the same figures); this
test runs it on every available backend: SQLite with 2 workers, PostgreSQL with 3."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fault_run import backend_of, config_for, describe, run_fault


@pytest.mark.timeout(400)
def test_a_thousand_transcripts_are_each_attached_exactly_once_despite_faults_and_killed_workers(
    database_url: str, tmp_path: Path
) -> None:
    backend = backend_of(database_url)
    config = config_for(backend)  # 1,000 calls, 32 posting threads, 6 SIGKILLs, leases of 2 s
    result = run_fault(database_url, config, tmp_path)
    print(describe(result))  # the figures, with -s

    assert result.posted == {"202": config.calls}, describe(result)
    assert result.finished, describe(result)
    assert result.missing == 0, describe(result)
    assert result.attached_more == 0, describe(result)
    assert result.attached_once == config.calls
    assert result.jobs == {"done": config.calls}
    assert result.kills >= 3, "the workers were really killed, mid-run"
    assert result.responses.get("500", 0) > 0 and result.retries > 0, "the faults were really injected"
    assert result.count_503 == 0, describe(result)
    assert result.possible_duplicates == 0, "the portal shows its statistics: nothing is left uncertain"
    assert result.seconds <= 180, describe(result)


@pytest.mark.timeout(200)
def test_where_the_portal_hides_its_statistics_every_resent_transcript_is_flagged_as_a_possible_duplicate(
    database_url: str, tmp_path: Path
) -> None:
    backend = backend_of(database_url)
    config = config_for(backend, calls=200, kills=2, kill_every=4.0, time_limit=90.0, deny_statistics=True)
    result = run_fault(database_url, config, tmp_path)
    print(describe(result))

    assert result.finished and result.missing == 0, describe(result)
    assert result.attached_more > 0, "slow answers were resent: the portal could not be asked"
    assert result.attached_more <= result.possible_duplicates, "every doubled call is flagged"
    assert result.count_503 == 0, describe(result)
