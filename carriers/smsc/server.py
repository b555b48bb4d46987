"""A simulated SMSC: a real SMPP 3.4 server on loopback that answers as a carrier would.

Each `SimulatedSMSC` runs its own asyncio loop in a daemon thread, so several carriers can run in
one process, each with several sessions (transmitter, receiver, transceiver binds). A behaviour
callback decides each message's fate (accept or reject, and which receipts to send after which
event-time delay); receipts go out as `deliver_sm` on any receiver bind of the same system_id,
wait for `deliver_sm_resp`, are resent when not acknowledged, and are kept while no receiver is
bound. Faults (kill, restart, dropped sessions, error answers) and throttling are built in.
Destination numbers are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, tzinfo
from typing import Any, Literal, NamedTuple

from smpplib import consts

from carriers.smpp.dlr import normalize_status
from carriers.smsc import wire
from carriers.smsc.receipts import OwedReceipt, ReceiptDesk, Session, SMSCCounters
from carriers.smsc.simclock import SimClock

__all__ = [
    "ESME_RINVDSTADR",
    "ESME_RINVPASWD",
    "ESME_RINVSYSID",
    "ESME_ROK",
    "ESME_RSUBMITFAIL",
    "ESME_RSYSERR",
    "ESME_RTHROTTLED",
    "Behaviour",
    "Fate",
    "IdFormat",
    "PlannedReceipt",
    "SMSCCounters",
    "SimulatedSMSC",
    "Submission",
    "deliver_after",
]

log = logging.getLogger("carriers.smsc.server")

ESME_ROK = consts.SMPP_ESME_ROK
ESME_RSYSERR = consts.SMPP_ESME_RSYSERR
ESME_RINVDSTADR = consts.SMPP_ESME_RINVDSTADR
ESME_RTHROTTLED = consts.SMPP_ESME_RTHROTTLED
ESME_RINVPASWD = consts.SMPP_ESME_RINVPASWD
ESME_RINVSYSID = consts.SMPP_ESME_RINVSYSID
ESME_RSUBMITFAIL = consts.SMPP_ESME_RSUBMITFAIL

IdFormat = Literal["dec", "hex", "hex-lower", "dec-padded"]
_ID_FORMATS = {"dec": "{:d}", "hex": "{:X}", "hex-lower": "{:x}", "dec-padded": "{:012d}"}
_BIND_MODES = {"bind_transmitter": "tx", "bind_receiver": "rx", "bind_transceiver": "trx"}
_CONCAT_TTL_S = 300.0


class PlannedReceipt(NamedTuple):
    """A receipt the SMSC will send `delay` event seconds after the submit."""

    delay: float
    status: str
    error_code: str = "000"


@dataclass(frozen=True, slots=True)
class Fate:
    """What happens to a message: the submit_sm_resp status, then the receipts to send."""

    command_status: int = ESME_ROK
    receipts: tuple[PlannedReceipt, ...] = ()

    @classmethod
    def accept(cls, *receipts: PlannedReceipt | tuple[float, str, str]) -> Fate:
        """Accepted, with these receipts (none: the carrier never reports)."""
        return cls(ESME_ROK, tuple(PlannedReceipt(*r) for r in receipts))

    @classmethod
    def reject(cls, command_status: int) -> Fate:
        """Refused at submit with this command status."""
        return cls(command_status, ())


@dataclass(frozen=True, slots=True)
class Submission:
    """A message as the behaviour sees it; a concatenated message is seen once, at its first
    part, with `parts` from the UDH (or SAR) and the text of the parts received so far."""

    message_id: str
    system_id: str
    destination: str
    text: str
    parts: int
    at: float


Behaviour = Callable[[Submission], Fate]


def deliver_after(
    delay: float = 1.0, status: str = "DELIVRD", error_code: str = "000"
) -> Behaviour:
    """A behaviour that accepts everything and sends one receipt `delay` event seconds later."""
    fate = Fate.accept(PlannedReceipt(delay, status, error_code))
    return lambda _submission: fate


@dataclass
class _Concat:
    message_id: str
    fate: Fate
    total: int
    seen: set[int]
    expires: float


class _Bucket:
    """Per-system throughput cap in wall time: `rate` parts per second, one second of burst."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.t = time.monotonic()

    def take(self, parts: int) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens < min(parts, self.rate):
            return False
        self.tokens -= parts
        return True


class SimulatedSMSC:
    """An SMPP 3.4 server for one simulated carrier (see the module docstring).

    `clock` gives event time (receipt due times and dates); `max_tps` caps parts per wall
    second per system_id (ESME_RTHROTTLED beyond); `window` bounds both submits awaiting their
    answer and unacknowledged receipts per session. `id_format` is how submit_sm_resp gives
    ids, `receipt_id_format` how receipts give them (default: the same); receipts go as
    `receipt_pdu` (deliver_sm, or data_sm with the text in message_payload), with the TLVs
    receipted_message_id/message_state/network_error_code when `receipt_tlvs`. `part_receipts`
    "last" sends receipts for a concatenated message's last part only. `submit_resp_delay`
    delays each submit_sm_resp; `receipt_first` sends a receipt due at once before the
    submit_sm_resp. Receipts are resent after `receipt_ack_timeout` wall seconds without an
    answer, up to `receipt_max_attempts` sends, and kept at most `receipt_ttl` event seconds
    after their due time while no receiver is bound. Receipt dates are Appendix B's
    YYMMDDhhmm (`receipt_date_seconds` for YYMMDDhhmmss), in `receipt_tz` with no offset, on a
    clock `receipt_clock_offset_s` ahead of event time. Faults: `drop_every`
    drops a session at its N-th submit (unanswered), `temp_error_rate`/`perm_error_rate` answer
    that share of submits with ESME_RSYSERR/ESME_RINVDSTADR, `fail_next` scripts answers.
    """

    def __init__(
        self,
        carrier_id: str,
        behaviour: Behaviour,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        system_id: str | None = None,
        password: str = "secret",
        accounts: dict[str, str] | None = None,
        clock: SimClock | None = None,
        max_tps: float | None = None,
        window: int = 64,
        id_format: IdFormat = "dec",
        receipt_id_format: IdFormat | None = None,
        receipt_tlvs: bool = True,
        receipt_pdu: Literal["deliver_sm", "data_sm"] = "deliver_sm",
        part_receipts: Literal["each", "last"] = "each",
        receipt_ack_timeout: float = 5.0,
        receipt_max_attempts: int = 5,
        receipt_ttl: float = 72 * 3600.0,
        submit_resp_delay: float = 0.0,
        receipt_first: bool = False,
        receipt_date_seconds: bool = False,
        receipt_clock_offset_s: float = 0.0,
        receipt_tz: tzinfo = UTC,
        drop_every: int | None = None,
        temp_error_rate: float = 0.0,
        perm_error_rate: float = 0.0,
        first_id: int | None = None,
        seed: int = 0,
    ) -> None:
        self.carrier_id = carrier_id
        self.behaviour = behaviour
        self.host = host
        self.port = port
        self.system_id = system_id or carrier_id
        self.accounts = dict(accounts) if accounts else {self.system_id: password}
        self.clock = clock or SimClock()
        self.max_tps = max_tps
        self.window = window
        self.id_format = id_format
        self.receipt_id_format = receipt_id_format or id_format
        self.part_receipts = part_receipts
        self.submit_resp_delay = submit_resp_delay
        self.receipt_first = receipt_first
        self.drop_every = drop_every
        self.temp_error_rate = temp_error_rate
        self.perm_error_rate = perm_error_rate
        self.counters = SMSCCounters()
        self._rng = random.Random(f"{carrier_id}:{seed}")
        start = first_id if first_id is not None else self._rng.randrange(1 << 28, 1 << 32)
        self._ids = itertools.count(start)
        self._faults: deque[int] = deque()
        self._buckets: dict[str, _Bucket] = {}
        self._sessions: set[Session] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._desk = ReceiptDesk(
            carrier_id,
            self.clock,
            self.counters,
            window=window,
            ack_timeout=receipt_ack_timeout,
            max_attempts=receipt_max_attempts,
            ttl=receipt_ttl,
            tlvs=receipt_tlvs,
            pdu=receipt_pdu,
            date_seconds=receipt_date_seconds,
            clock_offset_s=receipt_clock_offset_s,
            date_tz=receipt_tz,
        )
        self._concat: dict[tuple[str, str, int, int], _Concat] = {}
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake: asyncio.Event | None = None
        self._done: asyncio.Event | None = None
        self._listening = threading.Event()
        self._start_error: BaseException | None = None

    # ---- control, from any thread ---------------------------------------------------------

    def start(self, timeout: float = 5.0) -> SimulatedSMSC:
        """Start listening (returns once `.port` is set); returns self."""
        if self._thread is not None:
            raise RuntimeError(f"SMSC {self.carrier_id} is already started")
        self._thread = threading.Thread(target=self._run, name=f"smsc-{self.carrier_id}")
        self._thread.daemon = True
        self._thread.start()
        if not self._listening.wait(timeout):
            raise TimeoutError(f"SMSC {self.carrier_id} did not start within {timeout} s")
        if self._start_error is not None:
            self._thread.join(timeout)
            self._thread = None
            raise self._start_error
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop: unbind every session, close, end the loop thread."""
        if self._thread is None:
            return
        if self._thread.is_alive():
            self._call(self._shutdown(), timeout)
        self._thread.join(timeout)
        self._thread = None

    def kill(self) -> None:
        """Drop every connection abruptly (TCP reset) and refuse new ones until `restart()`.
        Receipts not yet acknowledged are kept and go out once a receiver binds again."""
        self._call(self._kill())

    def restart(self) -> None:
        """Listen again on the same port after `kill()`."""
        self._call(self._listen())

    def fail_next(self, count: int, status: int = ESME_RSYSERR) -> None:
        """Answer the next `count` submits with `status` (a temporary or permanent error)."""
        self._faults.extend([status] * count)

    @property
    def bound_sessions(self) -> int:
        """Sessions currently bound (any mode)."""
        return self._call(self._read(lambda: sum(1 for s in self._sessions if s.mode)))

    @property
    def pending_receipts(self) -> int:
        """Receipts not yet acknowledged: scheduled, waiting for a receiver, or in flight."""

        return self._call(self._read(lambda: self._desk.pending(self._sessions)))

    @staticmethod
    async def _read(get: Callable[[], int]) -> int:
        return get()

    def __enter__(self) -> SimulatedSMSC:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Any, timeout: float = 5.0) -> Any:
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            coro.close()
            raise RuntimeError(f"SMSC {self.carrier_id} is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ---- the loop thread ------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._wake = asyncio.Event()
        self._done = asyncio.Event()
        try:
            await self._listen()
        except BaseException as exc:
            self._start_error = exc
            self._listening.set()
            return
        self._listening.set()
        pump = asyncio.create_task(self._pump_forever())
        await self._done.wait()
        pump.cancel()
        for session in list(self._sessions):
            self._abort(session)
        if self._tasks:  # sessions end on their own once their connection is gone
            await asyncio.wait(list(self._tasks), timeout=2.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(pump, *self._tasks, return_exceptions=True)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
            self.port = self._server.sockets[0].getsockname()[1]
            log.info("SMSC %s listening on %s:%d", self.carrier_id, self.host, self.port)

    async def _kill(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for session in list(self._sessions):
            self._abort(session)
        log.info("SMSC %s killed", self.carrier_id)

    async def _shutdown(self, unbind_wait: float = 0.5) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for session in list(self._sessions):
            if session.mode:
                session.send(wire.request("unbind", session.sequencer)[1])
        deadline = time.monotonic() + unbind_wait
        while self._sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for session in list(self._sessions):
            session.writer.close()
        assert self._done is not None
        self._done.set()

    def _abort(self, session: Session) -> None:
        sock = session.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        session.writer.transport.abort()

    # ---- sessions --------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = Session(writer)
        self._sessions.add(session)
        try:
            while not writer.is_closing():
                try:
                    raw = await wire.read_raw(reader)
                    self._dispatch(session, raw)
                except (asyncio.IncompleteReadError, ConnectionError, OSError):
                    break
                except wire.BadPDU as bad:
                    self.counters.generic_nacks += 1
                    session.send(wire.response("generic_nack", bad.sequence, bad.status))
                    if bad.fatal:
                        break
                except Exception:
                    log.exception("SMSC %s failed on a PDU; closing the session", self.carrier_id)
                    break
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._close_session(session)
            self._tasks.discard(task)

    def _close_session(self, session: Session) -> None:
        if session not in self._sessions:
            return
        self._sessions.discard(session)
        self._desk.release(session)
        if not session.writer.is_closing():
            session.writer.close()
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _dispatch(self, session: Session, raw: bytes) -> None:
        pdu = wire.parse(raw)
        name = pdu.command
        if name in _BIND_MODES:
            self._on_bind(session, pdu)
        elif name == "enquire_link":
            session.send(wire.response("enquire_link_resp", pdu.sequence))
        elif name == "unbind":
            session.send(wire.response("unbind_resp", pdu.sequence))
            session.writer.close()
        elif name == "submit_sm":
            self._on_submit(session, pdu)
        elif name in ("deliver_sm_resp", "data_sm_resp", "generic_nack"):
            self._desk.answered(session, pdu.sequence, pdu.status)
            self._poke()
        elif name == "unbind_resp":
            session.writer.close()
        elif not pdu.is_response():
            self.counters.generic_nacks += 1
            session.send(wire.response("generic_nack", pdu.sequence, consts.SMPP_ESME_RINVCMDID))

    def _on_bind(self, session: Session, pdu: Any) -> None:
        answer = pdu.command + "_resp"
        if session.mode:
            session.send(wire.response(answer, pdu.sequence, consts.SMPP_ESME_RALYBND))
            return
        system_id, password = wire.text_of(pdu.system_id), wire.text_of(pdu.password)
        expected = self.accounts.get(system_id)
        status = (
            ESME_RINVSYSID
            if expected is None
            else ESME_RINVPASWD
            if password != expected
            else ESME_ROK
        )
        if status != ESME_ROK:
            self.counters.bind_failures += 1
            log.info("SMSC %s refused a bind: %s", self.carrier_id, consts.DESCRIPTIONS[status])
            session.send(wire.response(answer, pdu.sequence, status))
            session.writer.close()
            return
        session.mode, session.system_id = _BIND_MODES[pdu.command], system_id
        self.counters.binds += 1
        session.send(wire.response(answer, pdu.sequence, system_id=self.carrier_id[:15]))
        log.info("SMSC %s: %s bound as %s", self.carrier_id, system_id, session.mode)
        self._poke()

    # ---- submits ---------------------------------------------------------------------------

    def _on_submit(self, session: Session, pdu: Any) -> None:
        self.counters.submits += 1
        if not session.transmits:
            self._refuse(session, pdu.sequence, consts.SMPP_ESME_RINVBNDSTS)
            return
        session.submits += 1
        if self.drop_every and session.submits % self.drop_every == 0:
            self.counters.dropped_sessions += 1
            self._abort(session)
            return
        if session.outstanding >= self.window:
            self.counters.throttled += 1
            self._refuse(session, pdu.sequence, ESME_RTHROTTLED)
            return
        content = wire.content_of(pdu)
        if not self._take_tokens(session.system_id, content.parts):
            self.counters.throttled += 1
            self._refuse(session, pdu.sequence, ESME_RTHROTTLED)
            return
        fault = self._fault()
        if fault != ESME_ROK:
            self.counters.rejected += 1
            self._answer(session, pdu.sequence, fault)
            return
        at = self.clock.now()
        number, fate = self._fate(session.system_id, content, at)
        if fate.command_status != ESME_ROK:
            self.counters.rejected += 1
            self._answer(session, pdu.sequence, fate.command_status)
            return
        self.counters.accepted += 1
        self.counters.parts += content.parts
        self._schedule(session.system_id, number, content, fate, at)
        if self.receipt_first:
            self._desk.pump(self._sessions)
        self._answer(session, pdu.sequence, ESME_ROK, _ID_FORMATS[self.id_format].format(number))

    def _take_tokens(self, system_id: str, parts: int) -> bool:
        if self.max_tps is None:
            return True
        bucket = self._buckets.get(system_id)
        if bucket is None:
            bucket = self._buckets[system_id] = _Bucket(self.max_tps)
        return bucket.take(parts)

    def _fault(self) -> int:
        if self._faults:
            return self._faults.popleft()
        draw = self._rng.random() if self.temp_error_rate or self.perm_error_rate else 1.0
        if draw < self.temp_error_rate:
            return ESME_RSYSERR
        if draw < self.temp_error_rate + self.perm_error_rate:
            return ESME_RINVDSTADR
        return ESME_ROK

    def _fate(self, system_id: str, content: wire.Content, at: float) -> tuple[int, Fate]:
        """This part's id number and its message's fate (decided once per concatenated message)."""
        number = next(self._ids)
        concat = content.concat
        if concat is None:
            return number, self._decide(number, system_id, content, content.parts, at)
        now = time.monotonic()
        self._concat = {k: v for k, v in self._concat.items() if v.expires > now}
        key = (system_id, content.destination, concat.reference, concat.total)
        entry = self._concat.get(key)
        if entry is None:
            fate = self._decide(number, system_id, content, concat.total, at)
            entry = self._concat[key] = _Concat(
                _ID_FORMATS[self.id_format].format(number),
                fate,
                concat.total,
                set(),
                now + _CONCAT_TTL_S,
            )
        entry.seen.add(concat.number)
        if len(entry.seen) >= entry.total:
            del self._concat[key]
        return number, entry.fate

    def _decide(
        self, number: int, system_id: str, content: wire.Content, parts: int, at: float
    ) -> Fate:
        self.counters.messages += 1
        message_id = _ID_FORMATS[self.id_format].format(number)
        submission = Submission(message_id, system_id, content.destination, content.text, parts, at)
        try:
            return self.behaviour(submission)
        except Exception:
            log.exception("SMSC %s: the behaviour failed on a submit", self.carrier_id)
            return Fate.reject(ESME_RSYSERR)

    def _refuse(self, session: Session, sequence: int, status: int) -> None:
        """Refused before any processing (bind state, throttling): answered at once."""
        session.send(wire.response("submit_sm_resp", sequence, status))

    def _answer(
        self, session: Session, sequence: int, status: int, message_id: str | None = None
    ) -> None:
        """The answer after processing, `submit_resp_delay` later (outstanding meanwhile)."""
        data = wire.response("submit_sm_resp", sequence, status, message_id=message_id)
        if self.submit_resp_delay <= 0:
            session.send(data)
            return
        session.outstanding += 1

        def later() -> None:
            session.outstanding -= 1
            session.send(data)

        asyncio.get_running_loop().call_later(self.submit_resp_delay, later)

    # ---- receipts --------------------------------------------------------------------------

    def _schedule(
        self, system_id: str, number: int, content: wire.Content, fate: Fate, at: float
    ) -> None:
        requested = content.registered_delivery & 0x03
        concat = content.concat
        if not requested or (
            self.part_receipts == "last" and concat is not None and concat.number != concat.total
        ):
            return
        receipt_id = _ID_FORMATS[self.receipt_id_format].format(number)
        for plan in fate.receipts:
            status = normalize_status(plan.status)
            if requested == 2 and status == "DELIVRD":
                continue  # receipts on failure only
            receipt = OwedReceipt(
                receipt_id,
                system_id,
                content.destination,
                content.source,
                at,
                at + plan.delay,
                status,
                plan.error_code,
                content.text[:20],
            )
            self._desk.add(receipt)
        self._poke()

    async def _pump_forever(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            delay = self._desk.pump(self._sessions)
            self._wake.clear()
            timer = loop.call_later(delay, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                timer.cancel()
