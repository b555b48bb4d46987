"""A receipt's event time, from the carrier's clock: zone, offset, precision, and what is possible.

A receipt's `done date` is the carrier's clock: minute precision (SMPP 3.4 Appendix B's ten
digits) or seconds, in the SMSC's own zone with no offset (the link says which zone, UTC by
default), and sometimes minutes off. It is never trusted blindly and never a reason to lose the
receipt. Each connection estimates its carrier's clock offset from the receipts themselves: a
receipt stating D (precision p) for a message submitted at S and received at A bounds the
offset o, since the true time T = D - o + [0, p) lies in [S, A]:

    D - A  <  o  <=  D + p - S

The tightest bounds over recent receipts give an interval; the offset used is the value in it
closest to zero (a right clock stays uncorrected; a clock 3 minutes fast or an unannounced
UTC+3 is found within a few receipts). The event time reported is the corrected interval
clipped into [S, A]: its middle as `at`, its ends as a coarse interval when wider than a second,
so the router's SLA test weighs a minute-precision receipt by the share of its interval within
the SLA instead of taking the floor of the minute for the truth.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import UTC, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from carriers.smpp.dlr import Receipt

MAX_CLOCK_ERROR_S = 26 * 3600.0  # zones span UTC-12..+14; anything further is a bad date


def receipt_timezone(name: str | None) -> tzinfo:
    """A carrier's receipt zone: an IANA name ("Europe/Moscow"), "UTC", or a fixed offset
    ("+03:00", "-0530"); a clear ValueError otherwise."""
    if not name or name.upper() in ("UTC", "Z", "GMT"):
        return UTC
    text = name.strip()
    if text[0] in "+-":
        digits = text[1:].replace(":", "")
        if digits.isdecimal() and len(digits) in (2, 4):
            hours, minutes = int(digits[:2]), int(digits[2:] or 0)
            if hours <= 14 and minutes < 60:
                sign = -1 if text[0] == "-" else 1
                return timezone(sign * timedelta(hours=hours, minutes=minutes))
        raise ValueError(f"receipt time zone {name!r}: an offset is written +HH:MM or -HHMM")
    try:
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"receipt time zone {name!r} is not a known IANA zone") from exc


@dataclass(frozen=True, slots=True)
class ReceiptTime:
    """Where a receipt's event lies: `at`, within [earliest, latest], and how it was found."""

    at: float
    earliest: float
    latest: float
    stated: float | None  # the done date as the carrier stated it (read in its zone), if any
    offset_s: float  # the carrier clock's estimated offset that was taken off
    flags: tuple[str, ...]  # coarse, clock_offset, no_date, clamped

    @property
    def coarse(self) -> bool:
        """Whether the time is an interval wider than a second."""
        return self.latest - self.earliest > 1.0

    @property
    def flag(self) -> str | None:
        """The flags as the API's `at_flag`."""
        return ",".join(self.flags) or None


class ReceiptClock:
    """One connection's estimate of its carrier's receipt clock offset (not thread-safe:
    the caller serializes)."""

    def __init__(self, window: int = 64, tolerance_s: float = 1.0) -> None:
        self.tolerance_s = tolerance_s
        self._low: deque[float] = deque(maxlen=window)  # D - A per receipt
        self._high: deque[float] = deque(maxlen=window)  # D + p - S per receipt

    @property
    def offset_s(self) -> float:
        """The offset estimate: the value of the bounds' interval closest to zero."""
        if not self._low:
            return 0.0
        low = max(self._low)
        high = min(self._high) if self._high else float("inf")
        if low > high:  # bounds disagree (the clock moved): trust the tighter lower side
            return low
        if low <= 0.0 <= high:
            return 0.0
        return low if low > 0.0 else high

    def place(self, receipt: Receipt, arrived: float, submitted: float | None) -> ReceiptTime:
        """The event time of `receipt`, received at `arrived` (worker clock), for a message
        submitted at `submitted` (None when this worker does not know)."""
        lower = submitted if submitted is not None and submitted <= arrived else None
        stated = receipt.done_date.timestamp() if receipt.done_date is not None else None
        if stated is None or abs(stated - arrived) > MAX_CLOCK_ERROR_S:
            low = arrived if lower is None else lower
            return ReceiptTime(arrived, low, arrived, stated, 0.0, ("no_date",))
        precision = receipt.date_precision_s
        self._low.append(stated - arrived)
        if lower is not None:
            self._high.append(stated + precision - lower)
        offset = self.offset_s
        if abs(offset) < self.tolerance_s:
            offset = 0.0
        start = stated - offset
        flags = ["clock_offset"] if offset else []
        floor = lower if lower is not None else float("-inf")
        if precision <= 1.0:  # a point: the stated second, moved into [submit, arrival]
            point = min(max(start, floor), arrived)
            if point != start:
                flags.append("clamped")
            return ReceiptTime(point, point, point, stated, offset, tuple(flags))
        flags.insert(0, "coarse")
        clipped_start, clipped_end = max(start, floor), min(start + precision, arrived)
        if clipped_start > clipped_end:  # outside what is possible even after the correction
            point = arrived if start > arrived else floor
            flags.append("clamped")
            return ReceiptTime(point, point, point, stated, offset, tuple(flags))
        return ReceiptTime(
            (clipped_start + clipped_end) / 2,
            clipped_start,
            clipped_end,
            stated,
            offset,
            tuple(flags),
        )
