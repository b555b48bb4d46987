"""The SMPP connector over real SMPP on loopback, against the simulated SMSC.

Every wait is bounded; every SMSC and connection is closed by its fixture or `finally`.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from smpplib import consts, smpp

from carriers.smpp.client import SmppCarrier, SubmitResult, _Pending
from carriers.smpp.dlr import Receipt
from carriers.smpp.receipt_match import ReceiptMatcher
from carriers.smsc.server import SimulatedSMSC, deliver_after

NUMBER = "+447700900123"
WAIT_S = 15.0


class Receipts:
    """Receipts reported by a connection, per key (thread-safe)."""

    def __init__(self) -> None:
        self.by_key: dict[str, list[Receipt]] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str, receipt: Receipt) -> None:
        with self._lock:
            self.by_key.setdefault(key, []).append(receipt)

    def final(self) -> Counter[str]:
        """How many final receipts each key got."""
        with self._lock:
            return Counter(k for k, rs in self.by_key.items() for r in rs if r.final)


def wait_for(predicate: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    """Poll `predicate` until true or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def smsc_factory() -> Iterator[Callable[..., SimulatedSMSC]]:
    """Start simulated SMSCs (one receipt after 0.05 s unless told); stop them all at the end."""
    started: list[SimulatedSMSC] = []

    def make(**kwargs: object) -> SimulatedSMSC:
        behaviour = kwargs.pop("behaviour", deliver_after(0.05))
        smsc = SimulatedSMSC("sim", behaviour, **kwargs).start()
        started.append(smsc)
        return smsc

    yield make
    for smsc in started:
        smsc.stop(timeout=5)


@pytest.fixture
def connect() -> Iterator[Callable[..., tuple[SmppCarrier, Receipts]]]:
    """Bind connections to an SMSC; close them all at the end."""
    opened: list[SmppCarrier] = []

    def make(smsc: SimulatedSMSC, **kwargs: object) -> tuple[SmppCarrier, Receipts]:
        receipts = Receipts()
        kwargs.setdefault("reconnect_backoff", (0.1, 0.5))
        kwargs.setdefault("submit_timeout_s", 5.0)
        carrier = SmppCarrier(
            "sim", "127.0.0.1", smsc.port, "sim", "secret", on_receipt=receipts, **kwargs
        )
        carrier.start(timeout=5)
        opened.append(carrier)
        return carrier, receipts

    yield make
    for carrier in opened:
        carrier.close(timeout=5)


def submit_all(carrier: SmppCarrier, keys: list[str], threads: int = 4) -> list[SubmitResult]:
    """Submit one short text per key from several threads."""
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda k: carrier.submit(k, NUMBER, f"code {k}"), keys))


@pytest.mark.parametrize(
    ("id_format", "receipt_id_format"),
    [("dec", "dec"), ("hex", "dec"), ("dec", "hex"), ("hex-lower", "dec-padded")],
)
def test_submit_and_receipt_matched_to_key(
    smsc_factory, connect, id_format: str, receipt_id_format: str
) -> None:
    """Every key gets its own receipt once, whatever form the carrier writes the ids in."""
    smsc = smsc_factory(id_format=id_format, receipt_id_format=receipt_id_format)
    carrier, receipts = connect(smsc)
    keys = [f"d{i}" for i in range(60)]
    results = submit_all(carrier, keys)
    assert all(r.ok and r.parts == 1 and len(r.message_ids) == 1 for r in results)
    assert wait_for(lambda: len(receipts.final()) == len(keys))
    assert receipts.final() == Counter(keys)
    assert all(r.status == "DELIVRD" for rs in receipts.by_key.values() for r in rs)
    stats = carrier.stats
    assert (stats.unmatched_receipts, stats.held_receipts, stats.bad_receipts) == (0, 0, 0)
    assert stats.accepted_parts == smsc.counters.accepted == len(keys)


@pytest.mark.parametrize("bind", ["pair", "transceiver"])
@pytest.mark.parametrize("receipt_pdu", ["deliver_sm", "data_sm"])
def test_receipts_by_deliver_sm_or_data_sm_on_either_bind(
    smsc_factory, connect, bind: str, receipt_pdu: str
) -> None:
    """Transceiver, or transmitter plus receiver (receipts go only to receivers): receipts as
    deliver_sm or as data_sm are acknowledged and matched."""
    smsc = smsc_factory(id_format="hex", receipt_pdu=receipt_pdu)
    carrier, receipts = connect(smsc, bind=bind)
    sessions = 2 if bind == "pair" else 1
    assert wait_for(lambda: smsc.bound_sessions == sessions)
    keys = [f"p{i}" for i in range(20)]
    assert all(r.ok for r in submit_all(carrier, keys))
    assert wait_for(lambda: len(receipts.final()) == len(keys))
    assert receipts.final() == Counter(keys)
    assert wait_for(lambda: smsc.counters.receipts_acked == len(keys))


def test_receipt_on_another_connection_matched_through_a_shared_matcher(
    smsc_factory, connect
) -> None:
    """Receipts for submits made on one connection come back on another bind of the same
    account (the first one has unbound): a shared matcher still maps each to its key once."""
    smsc = smsc_factory(behaviour=deliver_after(1.0), id_format="hex", receipt_id_format="dec")
    matcher = ReceiptMatcher()
    sender, receipts = connect(smsc, matcher=matcher)
    other = SmppCarrier("sim", "127.0.0.1", smsc.port, "sim", "secret", matcher=matcher)
    other.on_receipt = receipts
    other.start(timeout=5)
    try:
        keys = [f"o{i}" for i in range(20)]
        assert all(r.ok for r in submit_all(sender, keys))
        sender.close(timeout=5)
        assert wait_for(lambda: receipts.final() == Counter(keys))
        assert other.stats.reported_receipts == len(keys)
        assert matcher.stats.unmatched == 0
    finally:
        other.close(timeout=5)


def test_receipt_that_beats_the_shared_ledger_is_reported_once_its_id_is_recorded(
    smsc_factory, connect
) -> None:
    """A receipt reaches another worker's connection before the sending worker recorded the
    message id in the shared ledger: held (acknowledged), then reported by the sweep once the
    ledger knows the id, never lost."""
    smsc = smsc_factory(behaviour=deliver_after(0.5))
    ledger: dict[str, str] = {}
    sender, _ = connect(smsc)
    other = SmppCarrier(
        "sim",
        "127.0.0.1",
        smsc.port,
        "sim",
        "secret",
        resolve_unmatched=lambda r: ledger.get(r.message_id),
    )
    receipts = Receipts()
    other.on_receipt = receipts
    other.start(timeout=5)
    try:
        keys = [f"w{i}" for i in range(10)]
        results = submit_all(sender, keys)
        assert all(r.ok for r in results)
        sender.close(timeout=5)  # its receipts now come to the other connection
        assert wait_for(lambda: other.stats.held_receipts == len(keys))
        assert receipts.final() == Counter()
        ledger.update({r.message_ids[0]: k for k, r in zip(keys, results, strict=True)})
        assert wait_for(lambda: receipts.final() == Counter(keys))
        assert other.stats.swept_receipts == len(keys)
        assert other.stats.held_receipts == 0
    finally:
        other.close(timeout=5)


def test_long_message_goes_in_three_parts(smsc_factory, connect) -> None:
    """A 400-character text: 3 submit_sm with a UDH, 3 ids, one receipt reported (first part)."""
    smsc = smsc_factory()
    carrier, receipts = connect(smsc)
    result = carrier.submit("long", NUMBER, "x" * 400)
    assert result.ok and result.parts == 3 and len(set(result.message_ids)) == 3
    assert (smsc.counters.messages, smsc.counters.parts) == (1, 3)
    assert wait_for(lambda: carrier.stats.part_receipts == 2)
    assert receipts.final() == Counter({"long": 1})
    ucs2 = carrier.submit("ucs2", NUMBER, "Код подтверждения " * 5)
    assert ucs2.ok and ucs2.parts == 2


def test_throttling_answers_are_retried(smsc_factory, connect) -> None:
    """Three ESME_RTHROTTLED answers, then accepted: one ok result, three throttles counted."""
    smsc = smsc_factory()
    carrier, receipts = connect(smsc)
    smsc.fail_next(3, consts.SMPP_ESME_RTHROTTLED)
    result = carrier.submit("t1", NUMBER, "hello")
    assert result.ok and result.command_status == 0
    assert carrier.stats.throttled == 3
    assert smsc.counters.submits == 4
    assert wait_for(lambda: receipts.final() == Counter({"t1": 1}))


def test_smsc_rate_cap_throttles_then_everything_gets_through(smsc_factory, connect) -> None:
    """Over the SMSC's 40/s cap from 6 threads: throttled answers, retried, all accepted."""
    smsc = smsc_factory(max_tps=40)
    carrier, receipts = connect(smsc, retry_backoff=(0.05, 0.5), max_retries=10)
    keys = [f"r{i}" for i in range(80)]
    results = submit_all(carrier, keys, threads=6)
    assert all(r.ok for r in results)
    assert smsc.counters.throttled > 0 and carrier.stats.throttled == smsc.counters.throttled
    assert wait_for(lambda: receipts.final() == Counter(keys))


def test_own_rate_cap_keeps_the_smsc_from_throttling(smsc_factory, connect) -> None:
    """With max_tps at the SMSC's cap, 60 parts from 6 threads draw no throttling answer."""
    smsc = smsc_factory(max_tps=40)
    carrier, _ = connect(smsc, max_tps=40)
    keys = [f"c{i}" for i in range(60)]
    assert all(r.ok for r in submit_all(carrier, keys, threads=6))
    assert smsc.counters.throttled == 0


def test_window_bounds_outstanding_submits(smsc_factory, connect) -> None:
    """An SMSC that throttles past 2 outstanding submits: a window of 2 never hits it."""
    smsc = smsc_factory(window=2, submit_resp_delay=0.05)
    carrier, _ = connect(smsc, window=2)
    assert all(r.ok for r in submit_all(carrier, [f"w{i}" for i in range(24)], threads=6))
    assert smsc.counters.throttled == 0


def test_temporary_errors_bounded_then_reported_temporary(smsc_factory, connect) -> None:
    """A queue that stays full: 1 + max_retries tries, then a temporary failure."""
    smsc = smsc_factory()
    carrier, _ = connect(smsc, max_retries=2)
    smsc.fail_next(10, consts.SMPP_ESME_RMSGQFUL)
    result = carrier.submit("q1", NUMBER, "hello")
    assert not result.ok and result.temporary
    assert (result.error, result.command_status) == ("ESME_RMSGQFUL", 0x14)
    assert smsc.counters.submits == 3


def test_permanent_error_reported_without_retry(smsc_factory, connect) -> None:
    """ESME_RINVDSTADR: reported at once, permanent, and the error never holds the number."""
    smsc = smsc_factory()
    carrier, _ = connect(smsc)
    smsc.fail_next(1, consts.SMPP_ESME_RINVDSTADR)
    result = carrier.submit("bad", NUMBER, "hello")
    assert not result.ok and not result.temporary
    assert result.error == "ESME_RINVDSTADR" and result.command_status == 0x0B
    assert NUMBER.lstrip("+") not in repr(result)
    assert smsc.counters.submits == 1 and carrier.stats.permanent_errors == 1


def test_long_message_failing_midway_is_not_ok(smsc_factory, connect) -> None:
    """Second part refused permanently: no third part sent, the first part's id given back."""
    smsc = smsc_factory()
    carrier, receipts = connect(smsc)
    smsc.fail_next(1, consts.SMPP_ESME_ROK)  # the first part goes through as usual
    smsc.fail_next(1, consts.SMPP_ESME_RINVDSTADR)
    result = carrier.submit("half", NUMBER, "y" * 400)
    assert not result.ok and result.parts == 3 and not result.temporary
    assert result.message_ids[0] and result.message_ids[1:] == ("", "")
    assert smsc.counters.submits == 2
    time.sleep(0.5)  # a receipt for the accepted first part is not reported for a failed message
    assert "half" not in receipts.by_key


def test_killed_and_restarted_smsc_loses_and_doubles_nothing(smsc_factory, connect) -> None:
    """Kill the SMSC mid-run, restart it 1 s later: the connection rebinds, later submits
    succeed, receipts pending at the kill arrive after the rebind, each key gets one."""
    smsc = smsc_factory(behaviour=deliver_after(0.4), id_format="hex", receipt_id_format="dec")
    carrier, receipts = connect(smsc, max_retries=8, retry_backoff=(0.1, 1.0))
    results: dict[str, SubmitResult] = {}
    stop = threading.Event()

    def sender(worker: int) -> None:
        n = 0
        while not stop.is_set():
            key = f"k{worker}-{n}"
            results[key] = carrier.submit(key, NUMBER, f"code {n}")
            n += 1
            time.sleep(0.01)

    threads = [threading.Thread(target=sender, args=(w,), daemon=True) for w in range(3)]
    for thread in threads:
        thread.start()
    assert wait_for(lambda: len(results) >= 60)
    smsc.kill()
    assert wait_for(lambda: not carrier.connected, timeout=5)
    assert smsc.pending_receipts > 0  # owed at the kill: they must come after the rebind
    time.sleep(1.0)
    smsc.restart()
    assert wait_for(lambda: carrier.connected)
    before = len(results)
    assert wait_for(lambda: len(results) >= before + 60)
    stop.set()
    for thread in threads:
        thread.join(WAIT_S)
    ok = [k for k, r in results.items() if r.ok]
    # A submit on the wire at the kill is unconfirmed (never sent again); nothing else failed.
    unconfirmed = [k for k, r in results.items() if r.unconfirmed]
    assert len(ok) + len(unconfirmed) == len(results), Counter(
        r.error for r in results.values() if not r.ok
    )
    assert len(unconfirmed) <= 3  # at most one per sending thread
    assert carrier.stats.reconnects >= 1
    assert wait_for(lambda: set(receipts.final()) >= set(ok))
    assert smsc.pending_receipts == 0 or wait_for(lambda: smsc.pending_receipts == 0)
    final = receipts.final()
    assert set(final) == set(ok) and set(final.values()) == {1}  # each accepted key once
    assert smsc.counters.accepted <= len(results)  # nothing sent twice


def test_unanswered_submit_is_not_sent_again_and_a_late_answer_still_routes_its_receipt(
    smsc_factory, connect
) -> None:
    """The SMSC answers after the submit stopped waiting: the submit is unconfirmed and not
    retried (sending it again would deliver and bill it twice); the late answer's message id
    is still learned, so the receipt reaches its key and `on_late_accept` hears of it."""
    smsc = smsc_factory(behaviour=deliver_after(1.0), submit_resp_delay=0.8)
    late: list[tuple[str, str]] = []
    carrier, receipts = connect(
        smsc, submit_timeout_s=0.3, max_retries=5, on_late_accept=lambda k, m: late.append((k, m))
    )
    result = carrier.submit("u1", NUMBER, "code 1")
    assert not result.ok and result.unconfirmed and result.error == "timeout"
    assert smsc.counters.submits == 1  # not sent again
    assert wait_for(lambda: late != [])
    assert late[0][0] == "u1" and late[0][1]
    assert wait_for(lambda: receipts.final() == Counter(["u1"]))
    stats = carrier.stats
    assert (stats.timeouts, stats.late_responses, stats.unmatched_receipts) == (1, 1, 0)


def test_receipt_before_its_submit_resp_is_matched(smsc_factory, connect) -> None:
    """The SMSC sends the receipt before submit_sm_resp: held, then matched when the id comes."""
    smsc = smsc_factory(behaviour=deliver_after(0.0), receipt_first=True, id_format="hex")
    carrier, receipts = connect(smsc)
    keys = [f"e{i}" for i in range(30)]
    assert all(r.ok for r in submit_all(carrier, keys))
    assert wait_for(lambda: receipts.final() == Counter(keys))
    stats = carrier.stats
    assert stats.early_receipts >= 1
    assert (stats.unmatched_receipts, stats.held_receipts) == (0, 0)


def test_graceful_close_waits_for_outstanding_submits(smsc_factory, connect) -> None:
    """close() while 6 submits wait on a slow SMSC: all answered ok, then unbound."""
    smsc = smsc_factory(submit_resp_delay=0.3)
    carrier, _ = connect(smsc)
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(carrier.submit, f"g{i}", NUMBER, "bye") for i in range(6)]
        assert wait_for(lambda: carrier.stats.submitted_parts == 6, timeout=5)
        carrier.close(timeout=5)
        results = [f.result(timeout=WAIT_S) for f in futures]
    assert all(r.ok for r in results)
    assert not carrier.connected
    assert wait_for(lambda: smsc.bound_sessions == 0, timeout=5)
    late = carrier.submit("after", NUMBER, "x")
    assert not late.ok and late.temporary and late.error == "closed"


def test_enquire_link_keeps_an_idle_link(smsc_factory, connect) -> None:
    """Idle for 1.2 s with a 0.3 s keep-alive: enquire_links answered, still bound, still sends."""
    smsc = smsc_factory()
    carrier, _ = connect(smsc, enquire_link_s=0.3)
    time.sleep(1.2)
    assert carrier.stats.enquire_links >= 2
    assert carrier.connected and carrier.stats.reconnects == 0
    assert carrier.submit("idle", NUMBER, "hi").ok


def test_wrong_password_fails_start_with_the_status(smsc_factory) -> None:
    """A refused bind: start() raises within its timeout, naming the SMPP status."""
    smsc = smsc_factory()
    carrier = SmppCarrier(
        "sim", "127.0.0.1", smsc.port, "sim", "wrong", reconnect_backoff=(0.1, 0.2)
    )
    with pytest.raises(ConnectionError, match="ESME_RINVPASWD"):
        carrier.start(timeout=1.0)
    assert not carrier.connected


def test_no_log_line_holds_the_number(smsc_factory, connect, caplog) -> None:
    """With every logger at DEBUG, a submit, a refusal and a receipt log no phone number
    (smpplib's own hex dumps of the PDUs included)."""
    caplog.set_level(logging.DEBUG)
    smsc = smsc_factory()
    carrier, receipts = connect(smsc)
    smsc.fail_next(1, consts.SMPP_ESME_RINVDSTADR)
    assert not carrier.submit("p0", NUMBER, "hello").ok
    assert carrier.submit("p1", NUMBER, "hello").ok
    assert wait_for(lambda: receipts.final() == Counter({"p1": 1}))
    digits = NUMBER.lstrip("+")
    hex_digits = digits.encode().hex()
    assert caplog.records
    assert digits not in caplog.text and hex_digits not in caplog.text


def test_generic_nack_fails_the_waiting_submit_as_temporary(smsc_factory, connect) -> None:
    """A submit_sm the SMSC cannot parse (a stray byte after its body, injected on the real
    link) draws generic_nack: that submit fails as temporary, the link stays usable."""
    smsc = smsc_factory()
    carrier, _ = connect(smsc)
    bind = carrier._link.tx
    pending = _Pending(None)
    with bind.send_lock:
        pdu = smpp.make_pdu(
            "submit_sm", client=bind.client, destination_addr="1", short_message=b"x"
        )
        raw = pdu.generate() + b"\x00"
        pending.sequence = pdu.sequence
        with bind.waiting_lock:
            bind.waiting[pdu.sequence] = pending
        bind.client._socket.sendall(struct.pack(">L", len(raw)) + raw[4:])
    assert pending.done.wait(5)
    assert pending.temporary and pending.error == "generic_nack ESME_RINVCMDLEN"
    assert carrier.stats.generic_nacks == 1 and smsc.counters.generic_nacks == 1
    assert carrier.submit("after", NUMBER, "hi").ok
