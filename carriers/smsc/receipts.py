"""The receipts a simulated SMSC owes its ESMEs, and the sessions they travel on.

A receipt is due at an event time; once due it goes out as `deliver_sm` (or `data_sm`) on any
receiver-capable session of its system_id (the least busy one, within the window), waits for
its answer, and is resent after a timeout or an error answer, a bounded number of times. While
no receiver is bound it waits, until it expires, as real SMSCs keep receipts for a returning
client.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from datetime import UTC, tzinfo
from typing import Any, Literal

from smpplib.client import SimpleSequenceGenerator
from smpplib.consts import SMPP_ESME_ROK

from carriers.smpp.dlr import ESM_SMSC_RECEIPT, STATE_OF_STATUS, format_receipt_text
from carriers.smsc import wire
from carriers.smsc.simclock import SimClock
from features.clock import from_epoch

log = logging.getLogger("carriers.smsc.server")

_GSM_NETWORK = 3  # network_error_code TLV: network type GSM


@dataclass
class SMSCCounters:
    """What an SMSC has seen and done (updated by its loop thread; read them from anywhere)."""

    binds: int = 0
    bind_failures: int = 0
    submits: int = 0
    messages: int = 0
    accepted: int = 0
    parts: int = 0
    rejected: int = 0
    throttled: int = 0
    dropped_sessions: int = 0
    generic_nacks: int = 0
    receipts_scheduled: int = 0
    receipts_sent: int = 0
    receipts_resent: int = 0
    receipts_acked: int = 0
    receipts_nacked: int = 0
    receipts_expired: int = 0
    receipts_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        """A snapshot of the counters."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(eq=False)
class OwedReceipt:
    """One receipt to send: for which message, to whom, what it says, due when (event time)."""

    message_id: str
    system_id: str
    handset: str
    esme_address: str
    submit_at: float
    due: float
    status: str
    error_code: str
    text: str
    attempts: int = 0
    not_before: float = 0.0  # wall (monotonic) time before which it is not resent


@dataclass(eq=False)
class Session:
    """One ESME connection: its bind, its numbering, its submits and receipts in flight."""

    writer: asyncio.StreamWriter
    sequencer: SimpleSequenceGenerator = field(default_factory=SimpleSequenceGenerator)
    mode: str | None = None
    system_id: str = ""
    submits: int = 0
    outstanding: int = 0
    inflight: dict[int, tuple[OwedReceipt, float]] = field(default_factory=dict)

    @property
    def receives(self) -> bool:
        """Bound as a receiver or transceiver."""
        return self.mode in ("rx", "trx")

    @property
    def transmits(self) -> bool:
        """Bound as a transmitter or transceiver."""
        return self.mode in ("tx", "trx")

    def send(self, data: bytes) -> None:
        """Queue bytes on the connection unless it is closing."""
        if not self.writer.is_closing():
            self.writer.write(data)


class ReceiptDesk:
    """Schedules, sends, resends and expires an SMSC's receipts (runs on the SMSC's loop)."""

    def __init__(
        self,
        name: str,
        clock: SimClock,
        counters: SMSCCounters,
        *,
        window: int,
        ack_timeout: float,
        max_attempts: int,
        ttl: float,
        tlvs: bool,
        pdu: Literal["deliver_sm", "data_sm"] = "deliver_sm",
        date_seconds: bool = False,
        clock_offset_s: float = 0.0,
        date_tz: tzinfo = UTC,
    ) -> None:
        self.name = name
        self.clock = clock
        self.counters = counters
        self.window = window
        self.ack_timeout = ack_timeout
        self.max_attempts = max_attempts
        self.ttl = ttl
        self.tlvs = tlvs
        self.pdu = pdu
        self.date_seconds = date_seconds  # Appendix B's 10-digit dates unless True (12)
        self.clock_offset_s = clock_offset_s  # how far the receipt clock is ahead
        self.date_tz = date_tz  # the zone the dates are written in, with no offset
        self._scheduled: list[tuple[float, int, OwedReceipt]] = []
        self._ready: dict[str, list[OwedReceipt]] = {}
        self._order = itertools.count()

    def add(self, receipt: OwedReceipt) -> None:
        """Owe a receipt, to go out at its due event time."""
        heapq.heappush(self._scheduled, (receipt.due, next(self._order), receipt))
        self.counters.receipts_scheduled += 1

    def release(self, session: Session) -> None:
        """A session is gone: what it had in flight goes out again on another one."""
        for receipt, _ in session.inflight.values():
            receipt.not_before = 0.0
            self._ready.setdefault(receipt.system_id, []).append(receipt)
        session.inflight.clear()

    def answered(self, session: Session, sequence: int, status: int) -> None:
        """A deliver_sm_resp/data_sm_resp (or generic_nack) came back: done, or resend later."""
        entry = session.inflight.pop(sequence, None)
        if entry is None:
            return
        if status == SMPP_ESME_ROK:
            self.counters.receipts_acked += 1
        else:
            self.counters.receipts_nacked += 1
            self._retry(entry[0], time.monotonic(), backoff=self.ack_timeout)

    def pending(self, sessions: Iterable[Session]) -> int:
        """Receipts not yet acknowledged: scheduled, waiting for a receiver, or in flight."""
        waiting = sum(len(q) for q in self._ready.values())
        return len(self._scheduled) + waiting + sum(len(s.inflight) for s in sessions)

    def pump(self, sessions: Iterable[Session]) -> float:
        """Send what is due; returns the wall seconds until something may next be due."""
        sessions = list(sessions)
        now, wall = self.clock.now(), time.monotonic()
        while self._scheduled and self._scheduled[0][0] <= now:
            receipt = heapq.heappop(self._scheduled)[2]
            self._ready.setdefault(receipt.system_id, []).append(receipt)
        wait = 0.25
        for session in sessions:
            for sequence, (receipt, deadline) in list(session.inflight.items()):
                if deadline <= wall:
                    del session.inflight[sequence]
                    self._retry(receipt, wall, backoff=0.0)
                else:
                    wait = min(wait, deadline - wall)
        for system_id, queue in self._ready.items():
            if queue:
                receivers = [s for s in sessions if s.receives and s.system_id == system_id]
                queue[:] = list(self._deliver(receivers, queue, now, wall))
                wait = min([wait, *(r.not_before - wall for r in queue if r.not_before > wall)])
        if self._scheduled:
            wait = min(wait, self.clock.wall_delay(self._scheduled[0][0]))
        return max(wait, 0.0)

    def _deliver(
        self, receivers: list[Session], queue: list[OwedReceipt], now: float, wall: float
    ) -> Iterable[OwedReceipt]:
        """Send the receipts that can go now; yields those that must wait."""
        for receipt in queue:
            if now > receipt.due + self.ttl:
                self.counters.receipts_expired += 1
                continue
            free = [s for s in receivers if len(s.inflight) < self.window]
            if receipt.not_before > wall or not free:
                yield receipt
                continue
            self._send(min(free, key=lambda s: len(s.inflight)), receipt, wall)

    def _send(self, session: Session, receipt: OwedReceipt, wall: float) -> None:
        text = format_receipt_text(
            receipt.message_id,
            receipt.status,
            error_code=receipt.error_code,
            submit_date=from_epoch(receipt.submit_at + self.clock_offset_s),
            done_date=from_epoch(receipt.due + self.clock_offset_s),
            text=receipt.text,
            seconds=self.date_seconds,
            tz=self.date_tz,
        )
        fields: dict[str, Any] = {
            "service_type": "",
            "source_addr_ton": 1,
            "source_addr_npi": 1,
            "source_addr": receipt.handset,
            "dest_addr_ton": 0,
            "dest_addr_npi": 0,
            "destination_addr": receipt.esme_address,
            "esm_class": ESM_SMSC_RECEIPT,
            "data_coding": 0,
        }
        body = text.encode("ascii", errors="replace")
        if self.pdu == "data_sm":  # the text rides in message_payload, the TLVs always go
            fields.update(registered_delivery=0, message_payload=body, **self._tlvs(receipt))
        else:
            fields.update(short_message=body, **(self._tlvs(receipt) if self.tlvs else {}))
        sequence, data = wire.request(self.pdu, session.sequencer, **fields)
        session.inflight[sequence] = (receipt, wall + self.ack_timeout)
        receipt.attempts += 1
        self.counters.receipts_sent += 1
        if receipt.attempts > 1:
            self.counters.receipts_resent += 1
        session.send(data)

    @staticmethod
    def _tlvs(receipt: OwedReceipt) -> dict[str, Any]:
        """receipted_message_id, message_state and (for a numeric error) network_error_code."""
        tlvs: dict[str, Any] = {
            "receipted_message_id": receipt.message_id,
            "message_state": STATE_OF_STATUS[receipt.status],
        }
        if receipt.error_code.isdecimal() and int(receipt.error_code) < 1 << 16:
            code = int(receipt.error_code).to_bytes(2, "big")
            tlvs["network_error_code"] = bytes([_GSM_NETWORK]) + code
        return tlvs

    def _retry(self, receipt: OwedReceipt, wall: float, backoff: float) -> None:
        if receipt.attempts >= self.max_attempts:
            self.counters.receipts_dropped += 1
            log.warning(
                "SMSC %s gave up on a receipt after %d attempts", self.name, receipt.attempts
            )
            return
        receipt.not_before = wall + backoff
        self._ready.setdefault(receipt.system_id, []).append(receipt)
