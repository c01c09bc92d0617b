"""Fixtures and hypothesis profiles of the fuzz suite.

The profile is chosen with B24SCRIBE_FUZZ_PROFILE: `ci` (the default: the small sample the test
suite runs), `default` (what `scripts/fuzz` runs), `nightly` (`scripts/fuzz --nightly`: over 10,000
cases). Profiles are applied per test, never loaded globally, so the rest of the suite keeps its own
hypothesis settings.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from b24scribe.db import Database
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from tests.conftest import make_settings
from tests.fake_vendor_api import FakeVendorApi
from tests.fuzz.invariants import Fuzzer, server_errors, write_report

# examples per hypothesis test; ~25 such tests (8 vendors, 3 PBX ways, /v1, /status, health,
# schemathesis per operation), so `nightly` runs over 20,000 cases (~2,500 more in the corpus)
EXAMPLES = {"ci": 12, "default": 120, "nightly": 900}
PROFILE = os.environ.get("B24SCRIBE_FUZZ_PROFILE", "ci")
if PROFILE not in EXAMPLES:
    raise pytest.UsageError(f"B24SCRIBE_FUZZ_PROFILE must be one of {', '.join(EXAMPLES)}, not {PROFILE!r}")

for _name, _examples in EXAMPLES.items():
    hypothesis_settings.register_profile(
        f"b24scribe-fuzz-{_name}",
        max_examples=_examples,
        deadline=None,
        derandomize=_name == "ci",  # CI: the same sample every run, so a red build is reproducible
        database=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,  # one app and database per test, shared by its examples
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
        print_blob=True,
    )
FUZZ_SETTINGS = hypothesis_settings(hypothesis_settings.get_profile(f"b24scribe-fuzz-{PROFILE}"))


@pytest.fixture
def settings(database_url: str, fake_vendor_api: FakeVendorApi) -> Settings:
    """Dry-run settings (no portal: jobs run to `done` without a network), vendor fetches from the
    local fake vendor API, and the test secrets."""
    vendor = {}
    for name in ("ASSEMBLYAI", "REVAI"):
        vendor[f"{name}_API_KEY"] = "fuzz-vendor-key"
        vendor[f"{name}_API_URL"] = fake_vendor_api.url
    # a default user, as a deployment whose PBX sends no extensions sets: calls can always register
    return make_settings(database_url, "http://127.0.0.1:9/").with_overrides(
        bitrix24_webhook_url=None, vendor=vendor, default_user_id=1
    )


@pytest.fixture
def fuzz(client: FlaskClient, worker: Worker, db: Database) -> Iterator[Fuzzer]:
    """The in-process fuzzer for one test (its own database, on SQLite and PostgreSQL)."""
    with server_errors() as errors:
        fuzzer = Fuzzer(client, worker, db, errors)
        yield fuzzer
        fuzzer.settle()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    write_report()
