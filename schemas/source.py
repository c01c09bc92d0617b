"""What every source module shares: reading a JSON body so that a bad one is a 422 naming `_schema`.

What a source *is* (`SttVendor`, `PbxSource`, `FetchSpec`) is core data, in `b24scribe/sources.py`.
"""

from __future__ import annotations

import json
from typing import Any

from marshmallow import ValidationError


def load_json(raw_body: bytes) -> Any:
    """The decoded JSON body; a ValidationError on `_schema` when it is not JSON (a 422, not a 500)."""
    try:
        return json.loads(raw_body)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise ValidationError({"_schema": [f"The body is not valid JSON ({type(error).__name__})."]}) from None
