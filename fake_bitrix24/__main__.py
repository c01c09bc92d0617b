"""``python -m fake_bitrix24 --port 0 ...``: see fake_bitrix24.cli."""

from __future__ import annotations

import sys

from fake_bitrix24.cli import main

if __name__ == "__main__":
    sys.exit(main())
