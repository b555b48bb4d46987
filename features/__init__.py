"""Context features: destination parsing, event time and privacy helpers (no I/O).

Names load on first use (PEP 562), so `features.clock` does not load phonenumbers: a sender
worker reads event times without the numbering plan.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "ensure_utc": "clock",
    "from_epoch": "clock",
    "local_hour_weekday": "clock",
    "time_band": "clock",
    "to_epoch": "clock",
    "UNKNOWN_OPERATOR": "numbering",
    "Destination": "numbering",
    "DestinationParser": "numbering",
    "InvalidNumber": "numbering",
    "OperatorDirectory": "numbering",
    "OperatorEntry": "numbering",
    "UnknownMccMnc": "numbering",
    "msisdn_hmac": "privacy",
}
__all__ = [
    "UNKNOWN_OPERATOR",
    "Destination",
    "DestinationParser",
    "InvalidNumber",
    "OperatorDirectory",
    "OperatorEntry",
    "UnknownMccMnc",
    "ensure_utc",
    "from_epoch",
    "local_hour_weekday",
    "msisdn_hmac",
    "time_band",
    "to_epoch",
]

if TYPE_CHECKING:
    from features.clock import ensure_utc, from_epoch, local_hour_weekday, time_band, to_epoch
    from features.numbering import (
        UNKNOWN_OPERATOR,
        Destination,
        DestinationParser,
        InvalidNumber,
        OperatorDirectory,
        OperatorEntry,
        UnknownMccMnc,
    )
    from features.privacy import msisdn_hmac


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'features' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"features.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
