"""`scripts/fuzz` prints the counts: cases per route family, 5xx found, 2xx that could not be
processed, and each failure with its request."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_scripts_fuzz_prints_cases_per_family_and_what_broke() -> None:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("B24SCRIBE_")}
    result = subprocess.run(
        [str(ROOT / "scripts" / "fuzz"), "--ci", "-k", "test_the_admin_api_never_5xx and sqlite"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr

    assert "fuzz profile ci: cases per route family" in output, output
    row = re.search(r"^\s+v1 admin\s+(\d+)\s+(\d+)$", output, re.MULTILINE)
    assert row is not None and int(row.group(1)) >= 12, output  # the ci profile's 12 examples, and the explicit ones
    assert re.search(r"^5xx found: \d+$", output, re.MULTILINE), output
    assert re.search(r"^2xx that could not be processed: \d+", output, re.MULTILINE), output
    counts = re.search(r"^distinct failures: (\d+) \((\d+) known open", output, re.MULTILINE)
    assert counts is not None, output
    new = int(counts.group(1)) - int(counts.group(2))
    assert (result.returncode == 0) == (new == 0), output  # it fails exactly when something new broke
