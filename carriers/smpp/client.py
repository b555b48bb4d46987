"""One SMPP 3.4 carrier connection on the sender's side (ESME), on smpplib.

`SmppCarrier` binds as a transceiver (or a transmitter plus a receiver), keeps the link alive
with `enquire_link`, rebinds with jittered exponential back-off when it drops, and lets many
threads submit through one bind: a window caps outstanding `submit_sm`s, a token bucket caps
parts per second, and each `submit_sm_resp` wakes the submit waiting on its sequence number.
Temporary refusals (throttling, queue full, system error, no answer, lost link, generic_nack)
are retried with back-off within a bound. Receipts (`deliver_sm`/`data_sm`, on any bind) are
answered ESME_ROK, parsed by `carriers.smpp.dlr` and reported against the caller's key; a receipt
that beats its `submit_sm_resp` is held until the id arrives.

smpplib is used for its PDUs and socket, not for its read loop: `Client.read_once` ignores
`data_sm` and `generic_nack`, raises on any error response, and answers `deliver_sm` with the
handler's return value as the status; each bind here runs its own reader thread on `read_pdu`.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, tzinfo
from typing import Any, Literal

from smpplib import consts, exceptions, smpp
from smpplib.client import Client

from carriers.smpp.dlr import Receipt, receipt_from_pdu
from carriers.smpp.encoding import encode
from carriers.smpp.receipt_match import ReceiptMatcher, Sent
from carriers.smpp.throttle import TokenBucket, backoff_delay

log = logging.getLogger(__name__)

TEMPORARY_STATUSES = frozenset(
    {
        consts.SMPP_ESME_RINVBNDSTS,
        consts.SMPP_ESME_RSYSERR,
        consts.SMPP_ESME_RMSGQFUL,
        consts.SMPP_ESME_RTHROTTLED,
        consts.SMPP_ESME_RX_T_APPN,
    }
)
_STATUS_NAMES = {
    value: name.removeprefix("SMPP_")
    for name, value in vars(consts).items()
    if name.startswith("SMPP_ESME_") and isinstance(value, int)
}
_WIRE_LOGGER = "carriers.smpp.wire"  # smpplib hex-dumps PDUs (numbers included) at DEBUG
logging.getLogger(_WIRE_LOGGER).setLevel(logging.INFO)  # so those dumps are never emitted
_CONNECTION_ERRORS = (exceptions.ConnectionError, exceptions.PDUError, OSError)
_POLL_S = 0.2
_SWEEP_S = 1.0  # how often receipts held without a submit are looked up in the shared ledger
_ABANDONED_KEPT = 10_000  # timed-out submits per bind whose late answer is still read

Bind = Literal["transceiver", "pair"]
ReceiptHandler = Callable[[str, Receipt], None]


def status_name(status: int) -> str:
    """The SMPP name of a command_status, e.g. 'ESME_RTHROTTLED' (hex for unknown codes)."""
    return _STATUS_NAMES.get(status, f"0x{status:08X}")


@dataclass(frozen=True)
class SubmitResult:
    """What became of one message (all its parts) on one carrier."""

    ok: bool  # every part accepted
    message_ids: tuple[str, ...]  # per part, from submit_sm_resp ("" for a part not accepted)
    command_status: int  # 0, or the failing response's status (0 when no PDU said it)
    error: str | None  # e.g. "ESME_RINVDSTADR", "timeout", "connection lost"; never a number
    temporary: bool  # the failure may succeed later or elsewhere
    parts: int
    # A part left on the wire and no answer came (timeout, session lost): the carrier may have
    # accepted it, so it was not sent again, and must not be sent again by the caller.
    unconfirmed: bool = False


@dataclass(frozen=True, slots=True)
class CarrierStats:
    """Counters of one connection since it was made (parts count one each)."""

    submitted_parts: int  # submit_sm PDUs sent, retries included
    accepted_parts: int
    throttled: int  # ESME_RTHROTTLED answers
    temporary_errors: int  # temporary failures of a part, throttling included
    permanent_errors: int
    timeouts: int
    generic_nacks: int
    late_responses: int  # submit_sm_resp for a submit that had given up or been failed
    reconnects: int
    enquire_links: int  # keep-alives sent
    receipts: int  # receipt PDUs read
    reported_receipts: int  # on_receipt calls
    early_receipts: int  # receipts matched when their submit_sm_resp came after them
    part_receipts: int  # receipts of a long message's later parts (acknowledged, not reported)
    held_receipts: int  # receipts waiting now for their submit_sm_resp
    unmatched_receipts: int  # held receipts whose id never came
    ambiguous_receipts: int  # receipts whose id fitted two submits (held, never guessed)
    ambiguous_expired: int  # of those, never resolved within the hold
    bad_receipts: int  # receipt PDUs that could not be read
    other_messages: int  # deliver_sm/data_sm that were not receipts (mobile-originated)
    callback_errors: int
    swept_receipts: int  # held receipts reported once the shared ledger knew their id


class _Pending:
    """One submit_sm waiting for its response."""

    __slots__ = ("done", "failure", "message_id", "sent", "sequence", "status", "written")

    def __init__(self, sent: Sent | None) -> None:
        self.sent = sent
        self.sequence = -1
        self.written = False  # the PDU went out on the socket
        self.done = threading.Event()
        self.status = 0
        self.message_id = ""
        self.failure: str | None = "timeout"  # what it reads as until resolved

    def resolve(self, status: int = 0, message_id: str = "", failure: str | None = None) -> None:
        self.status, self.message_id, self.failure = status, message_id, failure
        self.done.set()

    @property
    def ok(self) -> bool:
        return self.failure is None and self.status == consts.SMPP_ESME_ROK

    @property
    def temporary(self) -> bool:
        return self.failure is not None or self.status in TEMPORARY_STATUSES

    @property
    def unconfirmed(self) -> bool:
        """Sent, and no answer: the carrier may or may not have it."""
        return self.written and self.failure is not None

    @property
    def error(self) -> str:
        return self.failure or status_name(self.status)


class _BindConnection:
    """One bound smpplib client, its send lock, the submits waiting on it and its reader."""

    def __init__(self, carrier: SmppCarrier, mode: str, link: _Link) -> None:
        self.carrier, self.mode, self.link = carrier, mode, link
        self.client: Client | None = None
        self.send_lock = threading.Lock()
        self.waiting: dict[int, _Pending] = {}
        self.abandoned: OrderedDict[int, _Pending] = OrderedDict()  # timed out, may answer late
        self.waiting_lock = threading.Lock()
        self.stopping = False
        self.closed = False
        self.unbound = threading.Event()
        self.reader: threading.Thread | None = None
        self.last_rx = 0.0
        self.enquire_sent_at: float | None = None

    def open(self) -> None:
        """Connect, set TCP_NODELAY, bind, and start the reader thread."""
        c = self.carrier
        client = Client(
            c.host,
            c.port,
            timeout=c.io_timeout_s,
            logger_name=_WIRE_LOGGER,
            allow_unknown_opt_params=True,
        )
        self.client = client
        client.connect()
        if c.tcp_nodelay:
            client._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        getattr(client, f"bind_{self.mode}")(
            system_id=c.system_id, password=c.password, system_type=c.system_type
        )
        self.last_rx = time.monotonic()
        self.reader = threading.Thread(
            target=self._read_loop, name=f"smpp-{c.carrier_id}-{self.mode}", daemon=True
        )
        self.reader.start()

    def send(self, pdu_name: str, **fields: Any) -> Any:
        """Make and send a PDU under the send lock (sequence numbers come from the client)."""
        with self.send_lock:
            if self.closed or self.client is None:
                raise exceptions.ConnectionError("bind closed")
            pdu = smpp.make_pdu(pdu_name, client=self.client, **fields)
            self.client.send_pdu(pdu)
            return pdu

    def send_submit(self, pending: _Pending, fields: dict[str, Any]) -> None:
        """Send a submit_sm, registered under its sequence number before it leaves."""
        with self.send_lock:
            if self.closed or self.client is None:
                raise exceptions.ConnectionError("bind closed")
            pdu = smpp.make_pdu("submit_sm", client=self.client, **fields)
            pending.sequence = pdu.sequence
            with self.waiting_lock:
                self.waiting[pdu.sequence] = pending
            try:
                self.client.send_pdu(pdu)
            except BaseException:
                with self.waiting_lock:
                    self.waiting.pop(pdu.sequence, None)
                raise
            pending.written = True

    def respond(self, pdu_name: str, request: Any, status: int = consts.SMPP_ESME_ROK) -> None:
        """Answer a request PDU with the same sequence number."""
        with self.send_lock:
            if self.closed or self.client is None:
                return
            resp = smpp.make_pdu(pdu_name, client=self.client, status=status)
            resp.sequence = request.sequence
            self.client.send_pdu(resp)

    def take(self, sequence: int) -> _Pending | None:
        """Remove and return the submit waiting on `sequence`."""
        with self.waiting_lock:
            return self.waiting.pop(sequence, None)

    def give_up(self, pending: _Pending) -> bool:
        """Stop waiting for `pending`; False if its answer is being handled already. A late
        answer still finds it among the abandoned, so the message id is not lost."""
        with self.waiting_lock:
            if self.waiting.get(pending.sequence) is not pending:
                return False
            del self.waiting[pending.sequence]
            self.abandoned[pending.sequence] = pending
            while len(self.abandoned) > _ABANDONED_KEPT:
                self.abandoned.popitem(last=False)
            return True

    def take_abandoned(self, sequence: int) -> _Pending | None:
        """Remove and return the submit that timed out waiting on `sequence`."""
        with self.waiting_lock:
            return self.abandoned.pop(sequence, None)

    def fail_waiting(self, failure: str) -> None:
        """Resolve every waiting submit as failed (the link is gone)."""
        with self.waiting_lock:
            pending, self.waiting = list(self.waiting.values()), {}
        for item in pending:
            item.resolve(failure=failure)

    def _read_loop(self) -> None:
        """Read PDUs until the bind ends; keep it alive with enquire_link when idle."""
        assert self.client is not None
        sock = self.client._socket
        try:
            while not self.unbound.is_set():
                readable, _, _ = select.select([sock], [], [], _POLL_S)
                now = time.monotonic()
                if not readable:
                    self._keep_alive(now)
                    continue
                try:
                    pdu = self.client.read_pdu()
                except exceptions.UnknownCommandError as exc:
                    log.warning("%s %s: %s", self.carrier.carrier_id, self.mode, exc)
                    continue
                self.last_rx, self.enquire_sent_at = now, None
                self.carrier._dispatch(self, pdu)
        except (*_CONNECTION_ERRORS, ValueError) as exc:
            if not self.stopping:
                log.warning("%s %s bind lost: %r", self.carrier.carrier_id, self.mode, exc)
        except Exception:
            log.exception("%s %s reader failed", self.carrier.carrier_id, self.mode)
        finally:
            self.unbound.set()  # the bind is over either way: close() need not wait for it
            if not self.stopping:
                self.link.dead.set()

    def _keep_alive(self, now: float) -> None:
        """Send enquire_link after `enquire_link_s` of silence; give up if it goes unanswered."""
        c = self.carrier
        if self.enquire_sent_at is not None:
            if now - self.enquire_sent_at > c.enquire_timeout_s:
                raise exceptions.ConnectionError("enquire_link unanswered")
        elif now - self.last_rx >= c.enquire_link_s:
            self.send("enquire_link")
            self.enquire_sent_at = now
            c._count("enquire_links")

    def unbind(self) -> None:
        """Ask the SMSC to unbind; the reader keeps handling receipts until unbind_resp."""
        self.stopping = True
        try:
            self.send("unbind")
        except _CONNECTION_ERRORS:
            self.unbound.set()

    def close(self, join_s: float = 2.0) -> None:
        """Stop the reader and close the socket (wakes a blocked reader or sender)."""
        self.stopping = True
        self.unbound.set()
        client = self.client
        sock = client._socket if client is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self.reader is not None and self.reader is not threading.current_thread():
            self.reader.join(join_s)
        with self.send_lock:
            self.closed = True
            if client is not None and client._socket is not None:
                client.disconnect()


class _Link:
    """The binds of one connection attempt: one transceiver, or a transmitter and a receiver."""

    def __init__(self, carrier: SmppCarrier) -> None:
        self.dead = threading.Event()
        modes = ("transceiver",) if carrier.bind == "transceiver" else ("transmitter", "receiver")
        self.binds = [_BindConnection(carrier, mode, self) for mode in modes]
        self.tx = self.binds[0]

    def open(self) -> None:
        """Bind every connection, or close those already bound and raise."""
        try:
            for bind in self.binds:
                bind.open()
        except BaseException:
            self.close("bind failed")
            raise

    def waiting(self) -> int:
        return sum(len(bind.waiting) for bind in self.binds)

    def unbind(self, timeout: float) -> None:
        """Unbind every bind gracefully, waiting (bounded) for each unbind_resp."""
        for bind in self.binds:
            bind.unbind()
        deadline = time.monotonic() + timeout
        for bind in self.binds:
            bind.unbound.wait(max(0.0, deadline - time.monotonic()))

    def close(self, failure: str) -> None:
        """Close every bind and fail the submits still waiting."""
        for bind in self.binds:
            bind.close()
            bind.fail_waiting(failure)


class SmppCarrier:
    """A carrier reached over SMPP: thread-safe blocking submits, receipts to `on_receipt`.

    `on_receipt(key, receipt)` runs on a reader thread before the receipt is acknowledged, and
    may run before `submit` has returned for that key; keep it quick (hand it to a queue).
    For a long message only the first part's receipt is reported: every carrier that sends
    receipts for concatenated messages sends one for the first part (some send no other), and
    it tells when the message reached the handset; later parts' receipts are counted only.
    """

    def __init__(
        self,
        carrier_id: str,
        host: str,
        port: int,
        system_id: str,
        password: str,
        *,
        bind: Bind = "transceiver",
        window: int = 10,
        max_tps: float | None = None,
        enquire_link_s: float = 30.0,
        reconnect_backoff: tuple[float, float] = (0.5, 30.0),
        submit_timeout_s: float = 10.0,
        source_addr: str = "INFO",
        on_receipt: ReceiptHandler | None = None,
        system_type: str = "",
        packed_gsm7: bool = False,
        max_retries: int = 5,
        retry_backoff: tuple[float, float] = (0.05, 2.0),
        tcp_nodelay: bool = True,
        matcher: ReceiptMatcher | None = None,
        resolve_unmatched: Callable[[Receipt], str | None] | None = None,
        receipt_tz: tzinfo = UTC,
        on_late_accept: Callable[[str, str], None] | None = None,
    ) -> None:
        if bind not in ("transceiver", "pair"):
            raise ValueError(f"bind must be 'transceiver' or 'pair', not {bind!r}")
        self.carrier_id, self.host, self.port = carrier_id, host, int(port)
        self.system_id, self.password, self.system_type = system_id, password, system_type
        self.bind = bind
        self.enquire_link_s = enquire_link_s
        self.enquire_timeout_s = max(1.0, min(enquire_link_s, 10.0))
        self.io_timeout_s = max(1.0, min(submit_timeout_s, 10.0))
        self.reconnect_backoff = reconnect_backoff
        self.submit_timeout_s = submit_timeout_s
        self.source_addr = source_addr
        self.on_receipt = on_receipt
        self.packed_gsm7 = packed_gsm7
        self.max_retries, self.retry_backoff = max_retries, retry_backoff
        self.tcp_nodelay = tcp_nodelay
        self.matcher = matcher or ReceiptMatcher()
        self.resolve_unmatched = resolve_unmatched
        self.receipt_tz = receipt_tz  # the zone of the SMSC's receipt dates (no offset in them)
        # (key, message id) of a first part accepted after its submit stopped waiting.
        self.on_late_accept = on_late_accept
        self._window = threading.BoundedSemaphore(window)
        self._bucket = TokenBucket(max_tps) if max_tps else None
        self._link: _Link | None = None
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._closing = False
        self._supervisor: threading.Thread | None = None
        self._last_error = "never tried"
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Connect and bind (keeps rebinding in the background); raise if not bound in time."""
        if self._supervisor is not None:
            raise RuntimeError("already started")
        self._supervisor = threading.Thread(
            target=self._supervise, name=f"smpp-{self.carrier_id}", daemon=True
        )
        self._supervisor.start()
        if not self._connected.wait(timeout):
            error = self._last_error
            self.close(timeout=1.0)
            raise ConnectionError(f"carrier {self.carrier_id}: not bound in {timeout}s ({error})")

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking submits, wait (bounded) for outstanding responses, unbind, stop threads."""
        deadline = time.monotonic() + timeout
        self._closing = True
        link = self._link
        while link is not None and link.waiting() and time.monotonic() < deadline:
            time.sleep(0.01)
        if link is not None and self._connected.is_set():
            link.unbind(max(0.0, deadline - time.monotonic()))
        self._stopping.set()
        if link is not None:
            link.dead.set()
        if self._supervisor is not None:
            self._supervisor.join(max(0.1, deadline - time.monotonic()))

    @property
    def connected(self) -> bool:
        """Whether every bind is up now."""
        return self._connected.is_set()

    def _supervise(self) -> None:
        """Bind, wait for the link to die, rebind with jittered exponential back-off."""
        attempt, bound_before = 0, False
        while not self._stopping.is_set():
            link = _Link(self)
            try:
                link.open()
            except Exception as exc:
                self._last_error = _describe(exc)
                log.warning("carrier %s: bind failed: %s", self.carrier_id, self._last_error)
                self._stopping.wait(backoff_delay(attempt, *self.reconnect_backoff))
                attempt += 1
                continue
            attempt = 0
            if bound_before:
                self._count("reconnects")
            bound_before = True
            self._link = link
            self._connected.set()
            log.info("carrier %s: bound (%s)", self.carrier_id, self.bind)
            swept = time.monotonic()
            while not link.dead.wait(_POLL_S) and not self._stopping.is_set():
                if time.monotonic() - swept >= _SWEEP_S:
                    swept = time.monotonic()
                    self._sweep_held()
            self._connected.clear()
            self._link = None
            link.close("closed" if self._stopping.is_set() else "connection lost")
            if not self._stopping.is_set():
                log.warning("carrier %s: connection lost, rebinding", self.carrier_id)
                self._stopping.wait(backoff_delay(0, *self.reconnect_backoff))

    # ---- submitting ------------------------------------------------------------------------

    def submit(
        self,
        key: str,
        destination: str,
        text: str,
        *,
        source: str | None = None,
        source_ton: int | None = None,
        source_npi: int | None = None,
        dest_ton: int = consts.SMPP_TON_INTL,
        dest_npi: int = consts.SMPP_NPI_ISDN,
        register_dlr: bool = True,
    ) -> SubmitResult:
        """Send `text` to `destination` (E.164) in as many parts as it needs; block until every
        part is answered (temporary refusals retried within the bound). Thread-safe."""
        if self._supervisor is None:
            raise RuntimeError(f"carrier {self.carrier_id}: start() before submit()")
        message = encode(text, packed=self.packed_gsm7)
        n = len(message.parts)
        source = source or self.source_addr
        numeric = source.lstrip("+").isdigit()
        base = {
            "source_addr_ton": source_ton
            if source_ton is not None
            else (consts.SMPP_TON_INTL if numeric else consts.SMPP_TON_ALNUM),
            "source_addr_npi": source_npi
            if source_npi is not None
            else (consts.SMPP_NPI_ISDN if numeric else consts.SMPP_NPI_UNK),
            "source_addr": source.lstrip("+") if numeric else source,
            "dest_addr_ton": dest_ton,
            "dest_addr_npi": dest_npi,
            "destination_addr": destination.lstrip("+"),
            "esm_class": message.esm_class,
            "registered_delivery": 1 if register_dlr else 0,
            "data_coding": message.data_coding,
        }
        ids: list[str | None] = [None] * n
        for attempt in range(self.max_retries + 1):
            failure = None
            for i in (i for i in range(n) if ids[i] is None):
                sent = Sent(key, i) if register_dlr else None
                item = self._send_part(sent, {**base, "short_message": message.parts[i]})
                if not item.ok:
                    failure = item
                    break
                ids[i] = item.message_id
            if failure is None:
                return SubmitResult(True, tuple(map(str, ids)), 0, None, False, n)
            if (
                not failure.temporary
                or failure.unconfirmed
                or attempt == self.max_retries
                or self._closing
            ):
                break
            time.sleep(backoff_delay(attempt, *self.retry_backoff))
        for message_id in filter(None, ids):
            for sent, receipt in self.matcher.forget(message_id):
                self._report(sent, receipt)
        accepted = tuple(message_id or "" for message_id in ids)
        return SubmitResult(
            False,
            accepted,
            failure.status,
            failure.error,
            failure.temporary,
            n,
            unconfirmed=failure.unconfirmed,
        )

    def _send_part(self, sent: Sent | None, fields: dict[str, Any]) -> _Pending:
        """Send one submit_sm within the throughput cap and the window; wait for its answer."""
        pending = _Pending(sent)
        if self._closing:
            pending.resolve(failure="closed")
            return pending
        if self._bucket is not None and not self._bucket.acquire(timeout=self.submit_timeout_s):
            pending.resolve(failure="throughput cap")
            self._count("temporary_errors")
            return pending
        if not self._window.acquire(timeout=self.submit_timeout_s):
            pending.resolve(failure="window full")
            self._count("temporary_errors")
            return pending
        try:
            self._send_and_wait(pending, fields)
        finally:
            self._window.release()
        self._count_outcome(pending)
        return pending

    def _send_and_wait(self, pending: _Pending, fields: dict[str, Any]) -> None:
        """Send on the current link's transmitting bind and wait for the response."""
        if not self._connected.wait(self.submit_timeout_s):
            pending.resolve(failure="not connected")
            return
        link = self._link
        if link is None:
            pending.resolve(failure="not connected")
            return
        bind = link.tx
        try:
            bind.send_submit(pending, fields)
        except _CONNECTION_ERRORS:
            pending.resolve(failure="connection lost")
            link.dead.set()
            return
        self._count("submitted_parts")
        if not pending.done.wait(self.submit_timeout_s):
            if bind.give_up(pending):
                pending.resolve(failure="timeout")
                self._count("timeouts")
            else:
                pending.done.wait(self.submit_timeout_s)  # the reader is resolving it now

    def _count_outcome(self, pending: _Pending) -> None:
        if pending.ok:
            self._count("accepted_parts")
            return
        self._count("temporary_errors" if pending.temporary else "permanent_errors")
        if pending.status == consts.SMPP_ESME_RTHROTTLED:
            self._count("throttled")

    # ---- reading ---------------------------------------------------------------------------

    def _dispatch(self, bind: _BindConnection, pdu: Any) -> None:
        """Act on one PDU read from `bind` (runs on that bind's reader thread)."""
        command = pdu.command
        if command == "submit_sm_resp":
            self._on_submit_resp(bind, pdu)
        elif command in ("deliver_sm", "data_sm"):
            self._on_message(bind, pdu)
        elif command == "enquire_link":
            bind.respond("enquire_link_resp", pdu)
        elif command == "generic_nack":
            self._on_generic_nack(bind, pdu)
        elif command == "unbind":
            bind.respond("unbind_resp", pdu)
            raise exceptions.ConnectionError("unbound by the SMSC")
        elif command == "unbind_resp":
            bind.unbound.set()
        elif command not in ("enquire_link_resp", "alert_notification"):
            log.warning("carrier %s: unhandled %s", self.carrier_id, command)
            if pdu.is_request():
                bind.respond("generic_nack", pdu, consts.SMPP_ESME_RINVCMDID)

    def _on_submit_resp(self, bind: _BindConnection, pdu: Any) -> None:
        pending = bind.take(pdu.sequence)
        if pending is None:
            self._count("late_responses")
            self._on_late_resp(bind, pdu)
            return
        message_id = _text(getattr(pdu, "message_id", None))
        early: list[Receipt] = []
        if pdu.status == consts.SMPP_ESME_ROK and pending.sent is not None and message_id:
            early = self.matcher.sent(message_id, pending.sent)
        pending.resolve(pdu.status, message_id)
        for receipt in early:
            self._report(pending.sent, receipt)

    def _on_late_resp(self, bind: _BindConnection, pdu: Any) -> None:
        """An answer after the submit gave up waiting: an acceptance still says where the
        message went, so its receipts find their decision (`on_late_accept` tells the caller)."""
        pending = bind.take_abandoned(pdu.sequence)
        message_id = _text(getattr(pdu, "message_id", None))
        if pending is None or pending.sent is None or pdu.status != consts.SMPP_ESME_ROK:
            return
        if not message_id:
            return
        early = self.matcher.sent(message_id, pending.sent)
        if self.on_late_accept is not None and pending.sent.part == 0:
            self.on_late_accept(pending.sent.key, message_id)
        for receipt in early:
            self._report(pending.sent, receipt)

    def _on_generic_nack(self, bind: _BindConnection, pdu: Any) -> None:
        self._count("generic_nacks")
        pending = bind.take(pdu.sequence)
        if pending is not None:
            pending.resolve(pdu.status, failure=f"generic_nack {status_name(pdu.status)}")

    def _on_message(self, bind: _BindConnection, pdu: Any) -> None:
        """A deliver_sm or data_sm: report the receipt it carries, then answer ESME_ROK."""
        try:
            receipt = receipt_from_pdu(pdu, self.receipt_tz)
        except ValueError as exc:
            receipt = None
            self._count("bad_receipts")
            log.warning("carrier %s: unreadable receipt: %s", self.carrier_id, exc)
        else:
            if receipt is None:
                self._count("other_messages")
            else:
                self._count("receipts")
                matches = self.matcher.received(receipt)
                for sent, matched in matches:
                    self._report(sent, matched)
                if (
                    not matches
                    and self.matcher.is_held(receipt.message_id)
                    and not self._resolve_elsewhere(receipt)
                ):
                    # Not known to be recorded (the shared ledger was unreachable): a temporary
                    # error makes the SMSC send it again, instead of an ack that would lose it.
                    self.matcher.release(receipt.message_id)
                    bind.respond(f"{pdu.command}_resp", pdu, consts.SMPP_ESME_RX_T_APPN)
                    return
        bind.respond(f"{pdu.command}_resp", pdu)

    def _resolve_elsewhere(self, receipt: Receipt) -> bool:
        """A receipt for no submit of this connection: ask `resolve_unmatched` (a shared job
        ledger, for messages another worker submitted); else it stays held, and is asked for
        again while held (`_sweep_held`: the worker that sent it may not have written its id
        yet). False when the ledger could not be asked (the receipt must not be acknowledged)."""
        if self.resolve_unmatched is None or self.on_receipt is None:
            return True
        try:
            key = self.resolve_unmatched(receipt)
            if key is not None:
                self.matcher.release(receipt.message_id)
                self._count("reported_receipts")
                self.on_receipt(key, receipt)
        except Exception as exc:
            self._count("callback_errors")
            log.warning(
                "carrier %s: resolving a receipt failed (%s); answered as a temporary error so "
                "the SMSC resends it",
                self.carrier_id,
                type(exc).__name__,
            )
            return False
        return True

    def _sweep_held(self) -> None:
        """Ask the shared ledger again for the receipts held without a submit: one that came
        before the sending worker recorded its message id is reported once the id is there."""
        if self.resolve_unmatched is None or self.on_receipt is None:
            return
        for receipt in self.matcher.held_receipts():
            try:
                key = self.resolve_unmatched(receipt)
            except Exception:  # the ledger is away: the next sweep asks again
                return
            if key is None:
                continue
            for held in self.matcher.take_held(receipt.message_id):
                self._count("reported_receipts")
                self._count("swept_receipts")
                try:
                    self.on_receipt(key, held)
                except Exception as exc:
                    self._count("callback_errors")
                    log.warning(
                        "carrier %s: a held receipt's report failed (%s)",
                        self.carrier_id,
                        type(exc).__name__,
                    )

    def _report(self, sent: Sent, receipt: Receipt) -> None:
        """Hand a matched receipt to `on_receipt` (first parts only)."""
        if sent.part != 0:
            self._count("part_receipts")
            return
        self._count("reported_receipts")
        if self.on_receipt is None:
            return
        try:
            self.on_receipt(sent.key, receipt)
        except Exception:
            self._count("callback_errors")
            log.exception("carrier %s: on_receipt failed", self.carrier_id)

    # ---- stats -----------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[name] += n

    @property
    def stats(self) -> CarrierStats:
        """A snapshot of the connection's counters."""
        matched = self.matcher.stats
        with self._counts_lock:
            counts = dict(self._counts)
        counts.update(
            early_receipts=matched.matched_late,
            held_receipts=matched.held,
            unmatched_receipts=matched.unmatched,
            ambiguous_receipts=matched.ambiguous,
            ambiguous_expired=matched.ambiguous_expired,
        )
        return CarrierStats(**{name: counts.get(name, 0) for name in CarrierStats.__slots__})


def _text(value: Any) -> str:
    """A C-octet string field as text."""
    if isinstance(value, bytes):
        return value.rstrip(b"\x00").decode("ascii", "replace")
    return "" if value is None else str(value)


def _describe(exc: BaseException) -> str:
    """A short description of a connection failure (smpplib puts the status in args[1])."""
    if isinstance(exc, exceptions.PDUError) and len(exc.args) > 1:
        return status_name(int(exc.args[1]))
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
