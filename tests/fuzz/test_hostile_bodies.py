"""The hostile corpus (tests/hostile.py) against every hook, in-process: never a 5xx, and every
accepted body is processed by the worker (contract §12)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from app import create_app
from b24scribe.db import Database
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from schemas.registry import SOURCES
from tests.conftest import auth
from tests.fake_bitrix24 import FakeBitrix24
from tests.fuzz.conftest import PROFILE
from tests.fuzz.invariants import Fuzzer, assert_clean, server_errors
from tests.hostile import Body, bodies

GROUPS: dict[str, Callable[[Body], bool]] = {
    "pbx generic": lambda body: body.path == "/hooks/pbx/generic",
    "pbx asterisk form": lambda body: body.path == "/hooks/pbx/asterisk" and bool(body.body),
    "pbx asterisk query": lambda body: body.path == "/hooks/pbx/asterisk" and not body.body,
    "stt generic": lambda body: body.path.startswith("/hooks/stt/"),
}
# CI runs every third cell of the field × value matrix and all other bodies; `scripts/fuzz` runs it all
STRIDE = 3 if PROFILE == "ci" else 1
SETTLE_EVERY = 100  # drain the worker in batches: findings are still traced to their request


def corpus(group: str) -> list[Body]:
    chosen = [body for body in bodies() if GROUPS[group](body)]
    return [body for number, body in enumerate(chosen) if not body.matrix or number % STRIDE == 0]


@pytest.mark.parametrize("group", list(GROUPS))
def test_the_hostile_corpus_gets_no_5xx_and_every_accepted_body_is_processed(fuzz: Fuzzer, group: str) -> None:
    cases = corpus(group)
    assert cases, f"the corpus has no {group} case"
    for number, case in enumerate(cases, 1):
        headers = {**auth()}
        if case.content_type:
            headers["Content-Type"] = case.content_type
        fuzz.send(f"corpus {group}", "POST", case.path, case.body, headers, list(case.query))
        if number % SETTLE_EVERY == 0:
            fuzz.settle()
    fuzz.settle()
    assert_clean(fuzz, f"hostile corpus, {group}")


def portal_can_check(body: Body) -> bool:
    """Leaves out what only the portal can judge: a Bitrix24 user id or CALL_ID that may not exist
    there is accepted (the service cannot know) and refused by Bitrix24 later, by design."""
    return "user_id" not in body.name and not any(key == "b24_call_id" for key, _ in body.query)


@pytest.mark.parametrize("group", ["pbx generic", "stt generic"])
def test_what_the_corpus_gets_accepted_is_delivered_to_the_fake_bitrix24(
    settings: Settings, db: Database, fake_bitrix24: FakeBitrix24, group: str
) -> None:
    """Accepted ⇒ processable with real delivery (register, finish, attach against the fake portal),
    not only the dry run: a value Bitrix24 refuses for good would leave a job retrying or dead."""
    delivering = settings.with_overrides(bitrix24_webhook_url=fake_bitrix24.webhook_url)
    app = create_app(delivering)
    with server_errors() as errors:
        fuzz = Fuzzer(app.test_client(), Worker(db, delivering, SOURCES), db, errors)
        cases = [body for number, body in enumerate(corpus(group)) if number % 3 == 0 and portal_can_check(body)]
        for number, case in enumerate(cases, 1):
            headers = {**auth(), "Content-Type": case.content_type} if case.content_type else auth()
            fuzz.send(f"corpus {group} (fake Bitrix24)", "POST", case.path, case.body, headers, list(case.query))
            if number % SETTLE_EVERY == 0:
                fuzz.settle()
        fuzz.settle()
    assert_clean(fuzz, f"hostile corpus, {group}, delivered to the fake Bitrix24")
