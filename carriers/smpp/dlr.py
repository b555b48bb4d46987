"""SMPP 3.4 delivery receipts: parse the text and TLV forms carriers send, format the standard text.

Carriers disagree on the details (date widths, key case, long status words, extra fields, ids in
hex in one place and decimal in another), so parsing is tolerant and id matching goes through
`carriers.smpp.receipt_match`. Receipt dates are the carrier's clock: minute precision (Appendix B's
10 digits) or seconds, in the carrier's zone (UTC unless the caller says otherwise), sometimes off
by minutes; `carriers.smpp.receipt_time` turns them into the outcome's event time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any

from features.clock import ensure_utc

STATUSES = ("DELIVRD", "UNDELIV", "EXPIRED", "REJECTD", "DELETED", "UNKNOWN", "ACCEPTD", "ENROUTE")
INTERMEDIATE = frozenset({"ACCEPTD", "ENROUTE"})

# SMPP 3.4 §5.2.28 message_state values.
MESSAGE_STATES = {
    1: "ENROUTE",
    2: "DELIVRD",
    3: "EXPIRED",
    4: "DELETED",
    5: "UNDELIV",
    6: "ACCEPTD",
    7: "UNKNOWN",
    8: "REJECTD",
}
STATE_OF_STATUS = {status: state for state, status in MESSAGE_STATES.items()}

# Status words seen in the wild, upper-cased, mapped to the SMPP 3.4 stat word.
_STATUS_WORDS = {
    **{s: s for s in STATUSES},
    **{str(n): s for n, s in MESSAGE_STATES.items()},
    "DELIVERED": "DELIVRD",
    "DLIVRD": "DELIVRD",
    "UNDELIVERABLE": "UNDELIV",
    "UNDELIVERED": "UNDELIV",
    "UNDLIVRD": "UNDELIV",
    "FAILED": "UNDELIV",
    "EXPIRD": "EXPIRED",
    "REJECTED": "REJECTD",
    "DELETD": "DELETED",
    "UNKNWN": "UNKNOWN",
    "ACCEPTED": "ACCEPTD",
    "EN_ROUTE": "ENROUTE",
    "EN-ROUTE": "ENROUTE",
}

# esm_class message-type bits (SMPP 3.4 §5.2.12) that mark a receipt.
ESM_SMSC_RECEIPT = 0x04
ESM_INTERMEDIATE = 0x20
_ESM_TYPE_MASK = 0x3C

_KEY_RE = re.compile(
    r"(?:^|(?<=[\s,;]))(id|sub|dlvrd|submit[ _]?date|done[ _]?date|stat|err|text)\s*:",
    re.IGNORECASE,
)
_SAFE_WORD = re.compile(r"[A-Za-z_ -]{1,16}")


class ReceiptError(ValueError):
    """A delivery receipt that cannot be read; the message says what is missing or wrong."""


@dataclass(frozen=True, slots=True)
class Receipt:
    """One delivery receipt: which message, what happened, when (UTC event time)."""

    message_id: str
    status: str
    error_code: str | None
    submit_date: datetime | None
    done_date: datetime | None
    date_precision_s: float = 1.0  # 60 when the dates have no seconds (YYMMDDhhmm)

    @property
    def final(self) -> bool:
        """Whether the status ends the message's life (ACCEPTD and ENROUTE are intermediate)."""
        return self.status not in INTERMEDIATE


def normalize_status(word: str) -> str:
    """The SMPP 3.4 stat word for a status word carriers send (any case, long forms, 1..8)."""
    status = _STATUS_WORDS.get(word.strip().upper())
    if status is None:
        shown = repr(word) if _SAFE_WORD.fullmatch(word) else "(not shown)"
        raise ReceiptError(f"unknown receipt status word {shown}")
    return status


def parse_receipt_text(text: str | bytes, tz: tzinfo = UTC) -> Receipt:
    """Parse a receipt's text (`id:… sub:… dlvrd:… submit date:… done date:… stat:… err:…`);
    dates are read in the carrier's zone `tz`."""
    fields = _text_fields(_decode(text))
    return _receipt(fields.get("id"), fields.get("stat"), fields, tz)


def receipt_from_pdu(pdu: Any, tz: tzinfo = UTC) -> Receipt | None:
    """The receipt carried by a smpplib DeliverSM/DataSM, or None if it carries none.

    TLVs (receipted_message_id, message_state, network_error_code) come first; the text in
    short_message or message_payload fills what they lack (and gives the dates, read in `tz`).
    """
    esm_type = (getattr(pdu, "esm_class", None) or 0) & _ESM_TYPE_MASK
    flagged = esm_type in (ESM_SMSC_RECEIPT, ESM_INTERMEDIATE)
    tlv_id = _tlv_text(getattr(pdu, "receipted_message_id", None))
    tlv_state = getattr(pdu, "message_state", None)
    raw = getattr(pdu, "short_message", None) or getattr(pdu, "message_payload", None) or b""
    text = _decode(raw, ucs2=getattr(pdu, "data_coding", None) == 8)
    fields = _text_fields(text)
    if not (flagged or tlv_id or tlv_state is not None):
        try:
            return _receipt(fields.get("id"), fields.get("stat"), fields, tz)
        except ReceiptError:
            return None
    status = MESSAGE_STATES.get(tlv_state) if isinstance(tlv_state, int) else None
    err = _network_error_code(getattr(pdu, "network_error_code", None))
    if err is not None:
        fields["err"] = err
    return _receipt(tlv_id or fields.get("id"), status or fields.get("stat"), fields, tz)


def format_receipt_text(
    message_id: str,
    status: str,
    *,
    error_code: str = "000",
    submit_date: datetime,
    done_date: datetime,
    submitted: int = 1,
    delivered: int | None = None,
    text: str = "",
    seconds: bool = False,
    tz: tzinfo = UTC,
) -> str:
    """The standard receipt text (SMPP 3.4 Appendix B): dates as YYMMDDhhmm, as most carriers
    send them (YYMMDDhhmmss with `seconds`), on a wall clock in zone `tz` with no offset."""
    status = normalize_status(status)
    if delivered is None:
        delivered = submitted if status == "DELIVRD" else 0
    fmt = "%y%m%d%H%M%S" if seconds else "%y%m%d%H%M"
    submitted_at, done_at = (
        ensure_utc(d).astimezone(tz).strftime(fmt) for d in (submit_date, done_date)
    )
    return (
        f"id:{message_id} sub:{submitted:03d} dlvrd:{delivered:03d} "
        f"submit date:{submitted_at} done date:{done_at} "
        f"stat:{status} err:{error_code} text:{text[:20]}"
    )


def message_id_keys(message_id: str) -> tuple[str, ...]:
    """Every form under which a carrier's message id may be matched, most specific first.

    As is, stripped, lower-case, without leading zeros, then the hex<->decimal conversions
    (carriers give the id in hex in submit_sm_resp and in decimal in the receipt, or the other
    way round). Look the keys up in order and take the first hit: an all-digit id is also a
    valid hex number, so the conversions are a fallback, not an identity.
    """
    stripped = message_id.strip().strip("\x00").strip()
    low = stripped.lower()
    keys = [message_id, stripped, low]
    if low:
        keys.append(low.lstrip("0") or "0")
    if low.isdecimal() and low.isascii():
        keys.append(format(int(low), "x"))
    if low and re.fullmatch(r"[0-9a-f]+", low):
        keys.append(str(int(low, 16)))
    return tuple(dict.fromkeys(keys))


def _receipt(
    message_id: str | None, stat: str | None, fields: dict[str, str], tz: tzinfo = UTC
) -> Receipt:
    if not message_id:
        raise ReceiptError("receipt has no message id (no id: field and no receipted_message_id)")
    if not stat:
        raise ReceiptError("receipt has no status (no stat: field and no message_state)")
    err = fields.get("err")
    done, precision = _parse_date(fields.get("done date"), tz)
    return Receipt(
        message_id=message_id,
        status=normalize_status(stat),
        error_code=err or None,
        submit_date=_parse_date(fields.get("submit date"), tz)[0],
        done_date=done,
        date_precision_s=precision,
    )


def _text_fields(text: str) -> dict[str, str]:
    """Key -> value of a receipt text; unknown fields are skipped, the first of a key wins.

    After `text:` only keys not yet seen count, so a message text holding `id:` is not misread.
    """
    found: list[tuple[str, int, int]] = []
    seen: set[str] = set()
    for m in _KEY_RE.finditer(text):
        key = re.sub(r"[ _]?date$", " date", m.group(1).lower())
        if key in seen or ("text" in seen and key == "text"):
            continue
        seen.add(key)
        found.append((key, m.start(), m.end()))
    fields: dict[str, str] = {}
    for i, (key, _, value_start) in enumerate(found):
        end = found[i + 1][1] if i + 1 < len(found) else len(text)
        segment = text[value_start:end]
        if key == "text":
            fields[key] = segment.strip()
        else:
            tokens = segment.split()
            fields[key] = tokens[0] if tokens else ""
    if "stat" not in fields:
        bare = _bare_status(text, found)
        if bare:
            fields["stat"] = bare
    return fields


def _bare_status(text: str, found: list[tuple[str, int, int]]) -> str | None:
    """A status word standing alone (`… done date:… DELIVRD err:…`), outside the text field."""
    text_start = next((start for key, start, _ in found if key == "text"), len(text))
    for token in text[:text_start].split():
        word = token.upper()
        if ":" not in word and word in _STATUS_WORDS and not word.isdecimal():
            return word
    return None


def _parse_date(value: str | None, tz: tzinfo = UTC) -> tuple[datetime | None, float]:
    """YYMMDDhhmm, YYMMDDhhmmss, YYYYMMDDhhmm or YYYYMMDDhhmmss on a clock in zone `tz`, as
    UTC, with its precision in seconds (60 without seconds); None if absent or invalid
    (carriers send zeros or garbage dates; the status still counts)."""
    if not value or not value.isdecimal():
        return None, 1.0
    formats = {
        10: (("%y%m%d%H%M", 60.0),),
        12: (("%y%m%d%H%M%S", 1.0), ("%Y%m%d%H%M", 60.0)),
        14: (("%Y%m%d%H%M%S", 1.0),),
    }.get(len(value), ())
    for fmt, precision in formats:
        try:
            local = datetime.strptime(value, fmt).replace(tzinfo=tz)
        except ValueError:
            continue
        return local.astimezone(UTC), precision
    return None, 1.0


def _decode(raw: str | bytes, ucs2: bool = False) -> str:
    """Receipt bytes as text: UCS-2 when the coding says so or the bytes look like it."""
    if isinstance(raw, str):
        return raw
    if ucs2 or (len(raw) >= 4 and len(raw) % 2 == 0 and raw[0::2].count(0) * 2 > len(raw) // 2):
        return raw.decode("utf-16-be", errors="replace")
    return raw.decode("latin-1")


def _tlv_text(value: str | bytes | None) -> str | None:
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return text.strip("\x00").strip() or None


def _network_error_code(value: str | bytes | None) -> str | None:
    """The network_error_code TLV (network type + 2-byte code) as a 3-digit code."""
    if value is None:
        return None
    if isinstance(value, bytes) and len(value) == 3:
        return f"{int.from_bytes(value[1:3], 'big'):03d}"
    return _tlv_text(value)
