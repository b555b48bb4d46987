"""Context features: destination parsing, event time and privacy helpers (no I/O)."""

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
