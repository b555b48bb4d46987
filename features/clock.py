"""Event time: parsing timestamps and the destination's local hour and weekday."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from zoneinfo import ZoneInfo


@lru_cache(maxsize=1024)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def ensure_utc(at: datetime) -> datetime:
    """A timezone-aware UTC datetime; naive datetimes are taken to be UTC."""
    if at.tzinfo is None:
        return at.replace(tzinfo=UTC)
    return at.astimezone(UTC)


def to_epoch(at: datetime) -> float:
    """Seconds since the Unix epoch, the engine's internal event-time unit."""
    return ensure_utc(at).timestamp()


def from_epoch(ts: float) -> datetime:
    """UTC datetime from epoch seconds."""
    return datetime.fromtimestamp(ts, tz=UTC)


def local_hour_weekday(ts: float, tz: str) -> tuple[int, int]:
    """The destination's local hour (0-23) and weekday (Monday=0) at event time `ts`."""
    local = datetime.fromtimestamp(ts, tz=_zone(tz))
    return local.hour, local.weekday()


def time_band(hour: int, band_hours: int) -> int:
    """Index of the band of `band_hours` hours that contains `hour`."""
    return hour // band_hours
