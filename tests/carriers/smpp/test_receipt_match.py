"""Receipt-to-submit matching by carrier message id, and the connection's pacing helpers."""

from __future__ import annotations

import threading

from carriers.smpp.dlr import Receipt
from carriers.smpp.receipt_match import ReceiptMatcher, Sent
from carriers.smpp.throttle import TokenBucket, backoff_delay


def _receipt(message_id: str, status: str = "DELIVRD") -> Receipt:
    return Receipt(message_id, status, "000", None, None)


def _sent(matches: list[tuple[Sent, Receipt]]) -> list[Sent]:
    return [sent for sent, _ in matches]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_match_and_final_receipt_ends_tracking() -> None:
    """An intermediate receipt keeps the id tracked; the final one matches and removes it."""
    matcher = ReceiptMatcher()
    assert matcher.sent("ABC123", Sent("d1", 0)) == []
    assert _sent(matcher.received(_receipt("abc123", "ENROUTE"))) == [Sent("d1", 0)]
    assert _sent(matcher.received(_receipt("ABC123"))) == [Sent("d1", 0)]
    assert matcher.stats.tracked == 0
    assert matcher.received(_receipt("ABC123")) == []  # a repeat is held, not re-reported


def test_hex_in_resp_decimal_in_receipt_learned() -> None:
    """A hex id with letters matched by its decimal form fixes the relation; a later receipt
    whose exact and learned readings fit two submits waits until one of them settles."""
    matcher = ReceiptMatcher()
    matcher.sent("1f", Sent("a", 0))
    assert _sent(matcher.received(_receipt("31"))) == [Sent("a", 0)]
    assert matcher.stats.relation == "hex-dec"
    matcher.sent("10", Sent("b", 0))  # 0x10 == 16
    matcher.sent("16", Sent("c", 0))  # 0x16 == 22
    assert matcher.received(_receipt("16")) == []  # exact "16" (c) or hex 0x10 (b): held
    assert matcher.stats.ambiguous_held == 1
    # c's own receipt (decimal 22) settles c, which leaves b as the only fit for "16".
    assert _sent(matcher.received(_receipt("22"))) == [Sent("c", 0), Sent("b", 0)]
    stats = matcher.stats
    assert (stats.ambiguous, stats.ambiguous_held, stats.tracked) == (1, 0, 0)


def test_exact_id_wins_over_a_learned_conversion() -> None:
    """After a hex-dec match, a zero-padded id received exactly as sent is that message's
    (the issue's misattribution: "0000000014" read as decimal 14 = hex "e" of another)."""
    matcher = ReceiptMatcher()
    matcher.sent("1a2b", Sent("hex", 0))
    assert _sent(matcher.received(_receipt(str(0x1A2B)))) == [Sent("hex", 0)]
    matcher.sent("0000000014", Sent("padded", 0))
    assert _sent(matcher.received(_receipt("0000000014", "UNKNOWN"))) == [Sent("padded", 0)]
    matcher.sent("0000000015", Sent("p15", 0))
    matcher.sent("f", Sent("hex15", 0))  # 0xf == 15: exact "0000000015" and hex "f" both fit
    assert matcher.received(_receipt("0000000015")) == []
    assert matcher.stats.ambiguous == 1
    assert _sent(matcher.forget("f")) == [Sent("p15", 0)]  # "f" failed: the receipt is p15's


def test_padding_is_not_another_reading() -> None:
    """Leading zeros dropped in the receipt match the padded response, whatever was learned."""
    matcher = ReceiptMatcher(relation="hex-dec")
    matcher.sent("0000028400", Sent("padded", 0))
    assert _sent(matcher.received(_receipt("28400"))) == [Sent("padded", 0)]
    matcher.sent("14", Sent("a", 0))
    matcher.sent("0014", Sent("b", 0))
    assert matcher.received(_receipt("00014")) == []  # both are "14" once unpadded: held


def test_ambiguous_receipt_expires_unguessed() -> None:
    """An ambiguous receipt nobody settles is counted expired after the hold, never matched."""
    clock = _Clock()
    matcher = ReceiptMatcher(relation="hex-dec", hold_s=5.0, clock=clock)
    matcher.sent("10", Sent("b", 0))
    matcher.sent("16", Sent("c", 0))
    assert matcher.received(_receipt("16")) == []
    clock.now = 10.0
    assert matcher.received(_receipt("999999")) == []  # any call expires what is due
    stats = matcher.stats
    assert (stats.ambiguous_expired, stats.tracked) == (1, 2)


def test_scheme_change_is_relearned() -> None:
    """A carrier that moves from echoing ids to hex/decimal is followed by no-doubt matches."""
    matcher = ReceiptMatcher()
    for n in range(100, 110):
        matcher.sent(str(n), Sent(f"k{n}", 0))
        matcher.received(_receipt(str(n)))
    assert matcher.stats.relation == "same"
    matcher.sent("ab", Sent("letters", 0))
    assert _sent(matcher.received(_receipt(str(0xAB)))) == [Sent("letters", 0)]
    assert matcher.stats.relation == "hex-dec"


def test_decimal_carrier_never_crosses_ids() -> None:
    """After ten plain matches, an early decimal receipt is not taken for another id's hex form."""
    matcher = ReceiptMatcher()
    for n in range(100, 110):
        matcher.sent(str(n), Sent(f"k{n}", 0))
        assert _sent(matcher.received(_receipt(str(n)))) == [Sent(f"k{n}", 0)]
    assert matcher.stats.relation == "same"
    matcher.sent("10", Sent("ten", 0))
    assert matcher.received(_receipt("16")) == []  # held: "16" is not 0x10 here
    assert matcher.sent("16", Sent("sixteen", 0)) == [_receipt("16")]


def test_receipt_before_resp_is_held_then_handed_over() -> None:
    """A receipt that beats its submit_sm_resp comes back when the id is registered."""
    matcher = ReceiptMatcher()
    assert matcher.received(_receipt("777", "ENROUTE")) == []
    assert matcher.received(_receipt("777")) == []
    assert matcher.stats.held == 2
    held = matcher.sent("777", Sent("late", 0))
    assert [r.status for r in held] == ["ENROUTE", "DELIVRD"]
    stats = matcher.stats
    assert (stats.held, stats.matched_late, stats.tracked) == (0, 2, 0)


def test_held_receipts_expire_as_unmatched() -> None:
    """A held receipt whose id never comes is counted unmatched after the hold, not kept."""
    clock = _Clock()
    matcher = ReceiptMatcher(hold_s=5.0, max_held=2, clock=clock)
    matcher.received(_receipt("1"))
    clock.now = 10.0
    matcher.received(_receipt("2"))
    matcher.received(_receipt("3"))
    matcher.received(_receipt("4"))  # over max_held: the oldest goes
    stats = matcher.stats
    assert (stats.unmatched, stats.held) == (2, 2)


def test_forget_drops_an_id() -> None:
    """A message that failed as a whole stops matching its parts' receipts."""
    matcher = ReceiptMatcher()
    matcher.sent("55", Sent("x", 0))
    matcher.forget("55")
    assert matcher.received(_receipt("55")) == []


def test_token_bucket_paces_threads_in_order() -> None:
    """Ten acquisitions at 100/s from five threads take 90 ms of (fake) time, burst 1."""
    clock = _Clock()
    slept: list[float] = []
    lock = threading.Lock()

    def sleep(seconds: float) -> None:
        with lock:
            slept.append(seconds)

    bucket = TokenBucket(100.0, clock=clock, sleep=sleep)
    threads = [
        threading.Thread(target=lambda: [bucket.acquire() for _ in range(2)]) for _ in "x" * 5
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert sorted(round(s, 6) for s in slept) == [round(0.01 * k, 6) for k in range(1, 10)]
    assert not bucket.acquire(timeout=0.05)  # the next slot is 100 ms away


def test_backoff_grows_and_is_capped() -> None:
    """Delays double from `low`, stay within [d/2, d] and never pass `high`."""
    for attempt in range(12):
        delay = min(8.0, 0.5 * 2**attempt)
        assert delay / 2 <= backoff_delay(attempt, 0.5, 8.0) <= delay
