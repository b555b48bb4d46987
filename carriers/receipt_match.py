"""Match delivery receipts to submits by the carrier's message id, whichever comes first.

Carriers write an id one way in `submit_sm_resp` and sometimes another way in the receipt (hex
against decimal, case, leading zeros). Until the connection has seen which, ids are compared
under every form `carriers.dlr.message_id_keys` gives, the plain form first; a match that only a
hex/decimal conversion explains between ids that leave no doubt (one has a hex letter), or ten
plain matches and no converted one, fix the carrier's relation (or the caller gives it), and from
then on only that relation is used, so the decimal id "16" of one message is never taken for the
hex id "10" of another.

A receipt that arrives before its `submit_sm_resp` (it happens under load) is held for a while
and handed over when the id is registered; one still unmatched when it expires is counted.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from carriers.dlr import Receipt, message_id_keys

IdRelation = Literal["same", "hex-dec", "dec-hex"]
_HEX_DIGITS = frozenset("0123456789abcdef")
_PLAIN_MATCHES_FOR_SAME = 10


@dataclass(frozen=True, slots=True)
class Sent:
    """What a carrier message id stands for: the caller's key and which part (0 = first)."""

    key: str
    part: int


@dataclass(frozen=True, slots=True)
class MatcherStats:
    """Counters of the matcher since it was made, and how much it holds now."""

    matched: int
    matched_late: int
    unmatched: int
    expired_ids: int
    held: int
    tracked: int
    relation: IdRelation | None


def _bare(message_id: str) -> str:
    """The plain form of an id: no padding, lower case, no leading zeros."""
    return message_id.strip().strip("\x00").strip().lower().lstrip("0") or "0"


def _is_hex(bare: str) -> bool:
    return bool(bare) and set(bare) <= _HEX_DIGITS


def _relation(submitted: str, received: str) -> IdRelation | None:
    """How the receipt's id relates to the submit's, when the ids leave no doubt."""
    if submitted == received:
        return None if submitted.isdecimal() else "same"
    if not (_is_hex(submitted) and _is_hex(received)):
        return None
    if received.isdecimal() and not submitted.isdecimal() and int(submitted, 16) == int(received):
        return "hex-dec"
    if submitted.isdecimal() and not received.isdecimal() and int(received, 16) == int(submitted):
        return "dec-hex"
    return None


def _convert(bare: str, relation: IdRelation, *, from_receipt: bool) -> str | None:
    """The other side's plain form of an id under a known relation (None if it cannot be)."""
    if relation == "same":
        return bare
    hex_side_is_submit = relation == "hex-dec"
    to_hex = from_receipt == hex_side_is_submit
    if to_hex:
        return format(int(bare), "x") if bare.isdecimal() else None
    return str(int(bare, 16)) if _is_hex(bare) else None


class ReceiptMatcher:
    """Registered submit ids and held early receipts, matched under the carrier's id relation."""

    def __init__(
        self,
        *,
        ttl_s: float = 72 * 3600.0,
        max_ids: int = 1_000_000,
        hold_s: float = 60.0,
        max_held: int = 10_000,
        relation: IdRelation | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s, self._max_ids = ttl_s, max_ids
        self._hold_s, self._max_held = hold_s, max_held
        self._clock = clock
        self._ids: OrderedDict[str, tuple[float, Sent]] = OrderedDict()
        self._held: OrderedDict[str, tuple[float, list[Receipt]]] = OrderedDict()
        self._relation = relation
        self._plain_matches = self._converted_matches = 0
        self._lock = threading.Lock()
        self._matched = self._matched_late = self._unmatched = self._expired = 0

    def sent(self, message_id: str, sent: Sent) -> list[Receipt]:
        """Register a submit's id; returns receipts that arrived for it before, oldest first."""
        bare = _bare(message_id)
        with self._lock:
            self._expire(self._clock())
            found = self._find(self._held, bare, from_receipt=False)
            receipts = self._held.pop(found)[1] if found else []
            if found:
                self._learn(bare, found)
                self._matched_late += len(receipts)
            if not any(r.final for r in receipts):
                self._ids[bare] = (self._clock(), sent)
                self._ids.move_to_end(bare)  # oldest first, for expiry
                while len(self._ids) > self._max_ids:
                    self._ids.popitem(last=False)
                    self._expired += 1
            return receipts

    def received(self, receipt: Receipt) -> Sent | None:
        """The submit a receipt belongs to, or None (the receipt is held until its id comes)."""
        bare = _bare(receipt.message_id)
        with self._lock:
            self._expire(self._clock())
            found = self._find(self._ids, bare, from_receipt=True)
            if found is None:
                held = self._held.setdefault(bare, (self._clock(), []))[1]
                held.append(receipt)
                while len(self._held) > self._max_held:
                    self._unmatched += len(self._held.popitem(last=False)[1][1])
                return None
            self._learn(found, bare)
            self._matched += 1
            sent = self._ids.pop(found)[1] if receipt.final else self._ids[found][1]
            return sent

    def release(self, message_id: str) -> None:
        """Drop the held receipts of an id that was matched elsewhere (another connection's
        submit, found in a shared ledger)."""
        with self._lock:
            self._held.pop(_bare(message_id), None)

    def forget(self, message_id: str) -> None:
        """Stop tracking an id (its message failed as a whole, so no receipt is wanted)."""
        with self._lock:
            self._ids.pop(_bare(message_id), None)

    @property
    def stats(self) -> MatcherStats:
        """A snapshot of the counters."""
        with self._lock:
            return MatcherStats(
                self._matched,
                self._matched_late,
                self._unmatched,
                self._expired,
                sum(len(r) for _, r in self._held.values()),
                len(self._ids),
                self._relation,
            )

    def _find(self, table: OrderedDict, bare: str, *, from_receipt: bool) -> str | None:
        """The entry of `table` (the other side's ids) that the id `bare` matches."""
        if self._relation is not None:
            other = _convert(bare, self._relation, from_receipt=from_receipt)
            return other if other in table else None
        for form in message_id_keys(bare):
            if form in table:
                return form
        return None

    def _learn(self, submitted: str, received: str) -> None:
        """Fix the carrier's id relation from matches that leave no doubt about it."""
        if self._relation is not None:
            return
        self._relation = _relation(submitted, received)
        if submitted == received:
            self._plain_matches += 1
        else:
            self._converted_matches += 1
        if self._plain_matches >= _PLAIN_MATCHES_FOR_SAME and not self._converted_matches:
            self._relation = "same"

    def _expire(self, now: float) -> None:
        """Drop ids past their time to live and held receipts past their hold (unmatched)."""
        while self._held and next(iter(self._held.values()))[0] < now - self._hold_s:
            self._unmatched += len(self._held.popitem(last=False)[1][1])
        while self._ids and next(iter(self._ids.values()))[0] < now - self._ttl_s:
            self._ids.popitem(last=False)
            self._expired += 1
