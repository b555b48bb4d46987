"""Phone numbers kept out of what the API says and stores: runs of digits that could be a
number are hidden in error messages, and refused in the free-text fields that are logged."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator

# Seven or more digits, possibly split by the separators numbers are written with.
NUMBER_IN_TEXT = re.compile(r"\+?\d(?:[\s\-().]{0,2}\d){6,}")
# Nine or more: longer than any SMPP status or error code (8 hex digits at most).
NUMBER_IN_FIELD = re.compile(r"\d(?:[\s\-().]{0,2}\d){8,}")
HIDDEN = "<digits hidden>"


def redact(value: Any) -> Any:
    """`value` with digit runs that could be a phone number hidden, through dicts and lists."""
    if isinstance(value, str):
        return NUMBER_IN_TEXT.sub(HIDDEN, value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def _no_number(value: str | None) -> str | None:
    if value is not None and NUMBER_IN_FIELD.search(value):
        raise ValueError("must not contain a phone number (a run of 9 or more digits)")
    return value


NoNumber = Annotated[str, AfterValidator(_no_number)]
"""A free-text field that is logged or stored: a phone number in it is refused (422)."""
