"""Match delivery receipts to submits by the carrier's message id, whichever comes first.

Carriers write an id one way in `submit_sm_resp` and sometimes another way in the receipt (hex
against decimal, case, leading zeros), and some change their scheme from message to message.
A receipt's id is read in order: exactly as received (case and padding aside), then under the
connection's learned relation (hex in the response and decimal in the receipt, say), then under
the other relations. Two rules keep a receipt from landing on the wrong message:

* a receipt whose exact reading and learned reading name two different outstanding submits is
  *ambiguous*: it is held, counted and logged (without ids), never guessed; it is matched as soon
  as the other candidate is settled by its own final receipt (or dropped by its sender), and
  counted as expired ambiguous if that never happens within the hold;
* the other relations are used only when the ids leave no doubt (one has a hex letter) or no
  relation has been learned yet; an all-digit id that only a conversion explains, on a
  connection whose relation is known, is held like a receipt that beat its submit_sm_resp.

The relation is learned per connection from matches that leave no doubt, and relearned when
the carrier's scheme changes (a no-doubt match under another relation). A receipt that arrives
before its `submit_sm_resp` (it happens under load) is held and handed over when the id is
registered; one still unmatched when its hold expires is counted.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from carriers.smpp.dlr import Receipt

log = logging.getLogger(__name__)

IdRelation = Literal["same", "hex-dec", "dec-hex"]
RELATIONS: tuple[IdRelation, ...] = ("same", "hex-dec", "dec-hex")
_HEX_DIGITS = frozenset("0123456789abcdef")
_PLAIN_MATCHES_FOR_SAME = 10

Match = tuple["Sent", Receipt]  # a receipt and the submit it belongs to


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
    ambiguous: int = 0  # receipts held because two submits fit them
    ambiguous_held: int = 0  # of those, held now
    ambiguous_expired: int = 0  # of those, never resolved within the hold


def _literal(message_id: str) -> str:
    """An id as received, without NUL/space padding and case."""
    return message_id.strip().strip("\x00").strip().lower()


def _bare(literal: str) -> str:
    """An id without leading zeros: padding is not a different reading."""
    return literal.lstrip("0") or "0"


def _keys(literal: str) -> list[tuple[str, int | str]]:
    """Index keys of an id: its bare form, and the numbers it may stand for."""
    return [("bare", _bare(literal)), *_values(literal)]


def _is_hex(literal: str) -> bool:
    return bool(literal) and set(literal) <= _HEX_DIGITS


def _values(literal: str) -> list[tuple[str, int]]:
    """The numbers an id may stand for: ("dec", n) if all digits, ("hex", n) if hex."""
    out: list[tuple[str, int]] = []
    if literal.isdecimal() and literal.isascii():
        out.append(("dec", int(literal)))
    if _is_hex(literal):
        out.append(("hex", int(literal, 16)))
    return out


def _readings(
    literal: str, relation: IdRelation, *, from_receipt: bool
) -> list[tuple[str, int | str]]:
    """Index keys of the other side's ids that `literal` matches under `relation`."""
    values = dict(_values(literal))
    if relation == "same":
        return list(values.items())
    submit_base, receipt_base = ("hex", "dec") if relation == "hex-dec" else ("dec", "hex")
    mine, theirs = (receipt_base, submit_base) if from_receipt else (submit_base, receipt_base)
    return [(theirs, values[mine])] if mine in values else []


def _no_doubt(submitted: str, received: str) -> IdRelation | None:
    """The relation two matched ids prove on their own (None when digits alone leave doubt)."""
    if submitted == received:
        return None if submitted.isdecimal() else "same"
    sub, rec = dict(_values(submitted)), dict(_values(received))
    if not (sub and rec):
        return None
    if "dec" not in sub and "dec" in rec and sub["hex"] == rec["dec"]:
        return "hex-dec"
    if "dec" in sub and "dec" not in rec and sub["dec"] == rec["hex"]:
        return "dec-hex"
    if "dec" not in sub and "dec" not in rec and sub["hex"] == rec["hex"]:
        return "same"  # padding differs, a hex letter on both sides
    return None


class _IdTable:
    """Ids (literal form) with their payload, oldest first, and an index by numeric value."""

    def __init__(self) -> None:
        self.items: OrderedDict[str, tuple[float, object]] = OrderedDict()
        self._index: dict[tuple[str, int | str], set[str]] = {}

    def __contains__(self, literal: str) -> bool:
        return literal in self.items

    def __len__(self) -> int:
        return len(self.items)

    def add(self, literal: str, when: float, payload: object) -> None:
        self.items[literal] = (when, payload)
        self.items.move_to_end(literal)
        for key in _keys(literal):
            self._index.setdefault(key, set()).add(literal)

    def pop(self, literal: str) -> object | None:
        found = self.items.pop(literal, None)
        if found is None:
            return None
        for key in _keys(literal):
            bucket = self._index.get(key)
            if bucket is not None:
                bucket.discard(literal)
                if not bucket:
                    del self._index[key]
        return found[1]

    def oldest(self) -> tuple[str, float] | None:
        if not self.items:
            return None
        literal, (when, _) = next(iter(self.items.items()))
        return literal, when

    def find(self, keys: list[tuple[str, int | str]]) -> set[str]:
        out: set[str] = set()
        for key in keys:
            out |= self._index.get(key, set())
        return out


@dataclass(slots=True)
class _Ambiguous:
    at: float
    receipt: Receipt
    literal: str


class ReceiptMatcher:
    """Registered submit ids and held receipts, matched under the carrier's id relation."""

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
        self._ids = _IdTable()  # literal -> Sent
        self._held = _IdTable()  # literal -> list[Receipt] (no submit known yet)
        self._ambiguous: OrderedDict[int, _Ambiguous] = OrderedDict()
        self._seq = itertools.count()
        self._relation = relation
        self._plain_matches = 0
        self._lock = threading.Lock()
        self._matched = self._matched_late = self._unmatched = self._expired = 0
        self._ambiguous_total = self._ambiguous_expired = 0

    # ---- the two sides -------------------------------------------------------------------

    def sent(self, message_id: str, sent: Sent) -> list[Receipt]:
        """Register a submit's id; returns receipts that arrived for it before, oldest first."""
        literal = _literal(message_id)
        with self._lock:
            self._expire(self._clock())
            found = self._find_held(literal)
            receipts: list[Receipt] = list(self._held.pop(found) or []) if found else []  # type: ignore[call-overload]
            if found:
                self._learn(literal, found)
                self._matched_late += len(receipts)
            if not any(r.final for r in receipts):
                self._ids.add(literal, self._clock(), sent)
                while len(self._ids) > self._max_ids:
                    oldest = self._ids.oldest()
                    assert oldest is not None
                    self._ids.pop(oldest[0])
                    self._expired += 1
            return receipts

    def received(self, receipt: Receipt) -> list[Match]:
        """The submits receipts belong to: this one's (if it is matched now), then any held
        ambiguous receipt that this one's settling resolved. Empty: the receipt is held."""
        literal = _literal(receipt.message_id)
        with self._lock:
            self._expire(self._clock())
            candidates = self._candidates(literal)
            if len(candidates) > 1:
                self._hold_ambiguous(literal, receipt)
                return []
            if not candidates:
                self._hold(literal, receipt)
                return []
            found = next(iter(candidates))
            self._learn(found, literal)
            self._matched += 1
            if receipt.final:
                sent = self._ids.pop(found)
                return [(sent, receipt), *self._resolve()]  # type: ignore[list-item]
            return [(self._ids.items[found][1], receipt)]  # type: ignore[list-item]

    def is_held(self, message_id: str) -> bool:
        """Whether receipts with this id wait for a submit (not ambiguous ones)."""
        with self._lock:
            return _literal(message_id) in self._held

    def held_receipts(self) -> list[Receipt]:
        """The first receipt of each id held without a submit (a snapshot)."""
        with self._lock:
            return [rs[0] for _, rs in self._held.items.values() if rs]  # type: ignore[index]

    def take_held(self, message_id: str) -> list[Receipt]:
        """Remove and return the receipts held under an id (matched elsewhere)."""
        with self._lock:
            return list(self._held.pop(_literal(message_id)) or [])  # type: ignore[call-overload]

    def release(self, message_id: str) -> None:
        """Drop the held receipts of an id that was matched elsewhere (another connection's
        submit, found in a shared ledger)."""
        with self._lock:
            self._held.pop(_literal(message_id))

    def forget(self, message_id: str) -> list[Match]:
        """Stop tracking an id (its message failed as a whole, so no receipt is wanted);
        returns ambiguous receipts that this resolves."""
        with self._lock:
            if self._ids.pop(_literal(message_id)) is None:
                return []
            return self._resolve()

    @property
    def stats(self) -> MatcherStats:
        """A snapshot of the counters."""
        with self._lock:
            return MatcherStats(
                self._matched,
                self._matched_late,
                self._unmatched,
                self._expired,
                sum(len(r) for _, r in self._held.items.values()),  # type: ignore[arg-type]
                len(self._ids),
                self._relation,
                self._ambiguous_total,
                len(self._ambiguous),
                self._ambiguous_expired,
            )

    # ---- matching ------------------------------------------------------------------------

    def _candidates(self, literal: str) -> set[str]:
        """The outstanding submits a receipt id fits.

        Exact and learned readings are asked together: two different submits there are an
        ambiguity. Failing both, the other relations, where the ids leave no doubt or no
        relation is known yet.
        """
        exact = self._ids.find([("bare", _bare(literal))])
        learned = (
            self._ids.find(_readings(literal, self._relation, from_receipt=True))
            if self._relation is not None
            else set()
        )
        if exact or learned:
            return exact | learned
        return self._other_readings(self._ids, literal, from_receipt=True)

    def _find_held(self, literal: str) -> str | None:
        """The held receipts' id that a newly registered submit id fits (exact first)."""
        exact = self._held.find([("bare", _bare(literal))])
        if exact:
            return next(iter(exact)) if len(exact) == 1 else None
        if self._relation is not None:
            learned = self._held.find(_readings(literal, self._relation, from_receipt=False))
            if len(learned) == 1:
                return next(iter(learned))
            if learned:
                return None
        others = self._other_readings(self._held, literal, from_receipt=False)
        return next(iter(others)) if len(others) == 1 else None

    def _other_readings(self, table: _IdTable, literal: str, *, from_receipt: bool) -> set[str]:
        """The other side's ids `literal` fits under relations other than the learned one:
        any while none is learned, else only where the two ids leave no doubt."""
        found: set[str] = set()
        for relation in RELATIONS:
            if relation == self._relation:
                continue
            for other in table.find(_readings(literal, relation, from_receipt=from_receipt)):
                submitted, received = (other, literal) if from_receipt else (literal, other)
                if self._relation is None or _no_doubt(submitted, received) is not None:
                    found.add(other)
        return found

    def _learn(self, submitted: str, received: str) -> None:
        """Learn (or relearn) the carrier's id relation from matches that leave no doubt."""
        proven = _no_doubt(submitted, received)
        if submitted == received:
            self._plain_matches += 1
            if self._relation is None and self._plain_matches >= _PLAIN_MATCHES_FOR_SAME:
                self._relation = "same"
        elif proven is not None and proven != "same":
            self._plain_matches = 0
        if proven is not None and proven != self._relation:
            if self._relation is not None:
                log.info("receipt id scheme changed: %s -> %s", self._relation, proven)
            self._relation = proven

    def _hold(self, literal: str, receipt: Receipt) -> None:
        found = self._held.items.get(literal)
        if found is None:
            self._held.add(literal, self._clock(), [receipt])
        else:
            found[1].append(receipt)  # type: ignore[attr-defined]
        while len(self._held) > self._max_held:
            oldest = self._held.oldest()
            assert oldest is not None
            self._unmatched += len(self._held.pop(oldest[0]))  # type: ignore[arg-type]

    def _hold_ambiguous(self, literal: str, receipt: Receipt) -> None:
        self._ambiguous_total += 1
        log.warning(
            "receipt held as ambiguous: its id fits two outstanding submits under different "
            "readings (relation %s); it waits for one of them to settle",
            self._relation,
        )
        self._ambiguous[next(self._seq)] = _Ambiguous(self._clock(), receipt, literal)
        while len(self._ambiguous) > self._max_held:
            self._ambiguous.popitem(last=False)
            self._ambiguous_expired += 1

    def _resolve(self) -> list[Match]:
        """Ambiguous receipts that now fit one submit (another candidate has settled)."""
        out: list[Match] = []
        for seq, held in list(self._ambiguous.items()):
            candidates = self._candidates(held.literal)
            if len(candidates) > 1:
                continue
            del self._ambiguous[seq]
            if not candidates:
                self._hold(held.literal, held.receipt)
                continue
            found = next(iter(candidates))
            self._matched += 1
            sent = self._ids.pop(found) if held.receipt.final else self._ids.items[found][1]
            out.append((sent, held.receipt))  # type: ignore[arg-type]
        return out

    def _expire(self, now: float) -> None:
        """Drop ids past their time to live and held receipts past their hold (unmatched)."""
        while (oldest := self._held.oldest()) is not None and oldest[1] < now - self._hold_s:
            self._unmatched += len(self._held.pop(oldest[0]))  # type: ignore[arg-type]
        while self._ambiguous and next(iter(self._ambiguous.values())).at < now - self._hold_s:
            self._ambiguous.popitem(last=False)
            self._ambiguous_expired += 1
            log.warning("an ambiguous receipt expired unmatched (never guessed)")
        while (oldest := self._ids.oldest()) is not None and oldest[1] < now - self._ttl_s:
            self._ids.pop(oldest[0])
            self._expired += 1
