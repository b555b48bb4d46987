"""A standalone SMSC on the `smpp34` package (a Rust SMPP 3.4 stack, not this project's smpplib).

    python tests/carriers/smpp/smsc34_server.py --port 2775 --behaviour appendixb10 \
        --log receipts.jsonl

It accepts every bind (smpp34's Python server does not surface the password) and every
`submit_sm`, and sends delivery receipts the way real carriers do, chosen by `--behaviour`:

| behaviour | receipts |
| --- | --- |
| `appendixb10` | SMPP 3.4 Appendix B text, 10-digit dates (minute precision, UTC), esm_class 0x04 |
| `appendixb12` | the same with 12-digit dates (YYMMDDhhmmss, UTC) |
| `tlv_only` | no text: TLVs receipted_message_id + message_state (+ network_error_code) |
| `intermediate` | ENROUTE and/or ACCEPTD receipts first, then the final one |
| `hex_resp_dec_receipt` | submit_sm_resp id in hex, the receipt's id the same number in decimal |
| `mixed_ids` | the id scheme changes from message to message on one bind (see `MixedIds`) |
| `clock_fast` | dates from a clock 3 minutes fast |
| `utc_plus3` | dates in UTC+3 local time, no offset |
| `receipt_first` | the receipt (deliver_sm) is sent and acknowledged before the submit_sm_resp |
| `long_parts` | every part of a concatenated message gets its own id and its own receipt |

Each message's fate is deterministic: a hash of its text and the account (system_id) makes
~12% UNDELIV and ~6% EXPIRED, the rest DELIVRD, so a retry on another carrier may succeed.
Receipts go out after a random delay (`--min-delay`..`--max-delay`, default 0.05-1 s) on a
session of the same account that can receive (the submitting one if it is a transceiver), from
the handset's number to the sender, as carriers send them; a receipt the ESME does not
acknowledge is sent again (1 s apart, up to 10 tries). Bind as transceiver: smpp34 1.5 answers
an ESME's deliver_sm_resp on a *receiver* bind with generic_nack ESME_RINVCMDID (its own
deliver_sm then fails with ESME_RSYSERR when the session ends), and `deliver_sm` on a
transmitter bind panics in its Rust core.

`--log` gets JSON lines: `{"event": "ready"}` once listening, one `"accept"` line per accepted
part (ids, account) and one `"receipt"` line per receipt sent (ids, account, the message's text,
status, final, wall time sent, whether the ESME acknowledged it). The destination number is
never written anywhere. SIGTERM (or SIGINT) stops it cleanly: sessions unbound, exit code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import random
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import smpp34

BEHAVIOURS = (
    "appendixb10",
    "appendixb12",
    "tlv_only",
    "intermediate",
    "hex_resp_dec_receipt",
    "mixed_ids",
    "clock_fast",
    "utc_plus3",
    "receipt_first",
    "long_parts",
)

ESM_RECEIPT = 0x04  # SMSC delivery receipt
ESM_INTERMEDIATE = 0x20  # intermediate delivery notification
ESM_UDHI = 0x40
MESSAGE_STATE = {"ENROUTE": 1, "DELIVRD": 2, "EXPIRED": 3, "UNDELIV": 5, "ACCEPTD": 6}
ERROR_CODE = {"DELIVRD": 0, "UNDELIV": 1, "EXPIRED": 27}
RECEIPT_RETRIES = 10  # deliver_sm refused or no receiving session: try again, 1 s apart


# ---- ids ------------------------------------------------------------------------------------


def _norm(message_id: str) -> str:
    """An id with case and leading zeros dropped (what every matcher treats as the same)."""
    return message_id.strip().lower().lstrip("0") or "0"


def _readings(message_id: str) -> set[str]:
    """Every id an id may be read as: itself and its hex<->decimal conversions (normalized)."""
    n = _norm(message_id)
    out = {n}
    if n.isdecimal():
        out.add(format(int(n), "x"))
    if all(c in "0123456789abcdef" for c in n):
        out.add(str(int(n, 16)))
    return out


@dataclass(frozen=True)
class Ids:
    """A part's id in the submit_sm_resp and in its receipt; `same`: the receipt's id is the
    response's (up to case and zero padding), else a hex<->decimal conversion of it."""

    resp: str
    receipt: str
    scheme: str

    @property
    def same(self) -> bool:
        return _norm(self.resp) == _norm(self.receipt)


class IdBook:
    """Every id pair issued on one account; refuses pairs that would make a receipt attributable
    to two messages even in principle (so the tests hold the router to an exact answer).

    A receipt whose id is its message's own (same) must not equal another message's response
    id; a converted receipt id must have no reading that is another message's response id.
    Deliberate traps (a same-id receipt that a *fixed* conversion would read as another
    message's id) are allowed: the plain reading settles them.
    """

    def __init__(self) -> None:
        self.issued: list[Ids] = []
        self._resp: set[str] = set()
        self._receipt: set[str] = set()

    def fits(self, ids: Ids) -> bool:
        resp, receipt = _norm(ids.resp), _norm(ids.receipt)
        if resp in self._resp or receipt in self._receipt:
            return False
        if receipt in self._resp or (not ids.same and resp in self._receipt):
            return False
        for old in self.issued:
            if not ids.same and _readings(ids.receipt) & _readings(old.resp):
                return False
            if not old.same and _readings(old.receipt) & _readings(ids.resp):
                return False
            if _norm(old.receipt) == resp:
                return False
        return True

    def add(self, ids: Ids) -> None:
        self.issued.append(ids)
        self._resp.add(_norm(ids.resp))
        self._receipt.add(_norm(ids.receipt))


def _hex_with_letter(rng: random.Random, lo: int, hi: int) -> int:
    while True:
        n = rng.randrange(lo, hi)
        if any(c in "abcdef" for c in format(n, "x")):
            return n


class MixedIds:
    """`mixed_ids`: the scheme changes message by message on one account.

    The first three messages of an account answer in hex with a letter and receipt in decimal
    (a matcher that learns one relation per connection learns hex->decimal). Then, in turn:
    hex responses with a same-id receipt (upper case), zero-padded all-digit responses
    ("0000000014") with the same id or stripped of its zeros in the receipt, padded decimal
    responses with a hex receipt, hex->decimal again, and traps: a hex response "<hex of k>"
    with a same-id receipt, followed while it is outstanding by a padded decimal response
    "<k zero-padded>" with a same-id receipt, whose receipt is sent first; read with a fixed
    hex->decimal relation it names the first message.
    """

    CYCLE = ("trap_b", "padded_same", "hex_same", "trap_a", "hex_dec", "padded_stripped", "dec_hex")

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.count = 0
        self.trap_b: Ids | None = None  # a trap's first message, outstanding

    def next(self, book: IdBook) -> Ids:
        kind = "hex_dec" if self.count < 3 else self.CYCLE[(self.count - 3) % len(self.CYCLE)]
        self.count += 1
        if kind == "trap_a" and self.trap_b is None:
            kind = "padded_same"
        if kind == "trap_b" and self.trap_b is not None:
            kind = "hex_same"
        for _ in range(1000):
            ids = self._make(kind)
            if ids is not None and book.fits(ids):
                if kind == "trap_b":
                    self.trap_b = ids
                elif kind == "trap_a":
                    self.trap_b = None
                return ids
        raise RuntimeError(f"no free id for scheme {kind}")

    def _make(self, kind: str) -> Ids | None:
        rng = self.rng
        if kind == "hex_dec":
            n = _hex_with_letter(rng, 0x100000, 0xFFFFFF)
            return Ids(format(n, "x"), str(n), kind)
        if kind == "hex_same":
            n = _hex_with_letter(rng, 0x100000, 0xFFFFFF)
            return Ids(format(n, "x"), format(n, "X"), kind)
        if kind == "padded_same":
            n = rng.randrange(10, 99_999)
            return Ids(f"{n:010d}", f"{n:010d}", kind)
        if kind == "padded_stripped":
            n = rng.randrange(10, 99_999)
            return Ids(f"{n:010d}", str(n), kind)
        if kind == "dec_hex":
            n = _hex_with_letter(rng, 100_000, 999_999)
            return Ids(f"{n:010d}", format(n, "x"), kind)
        if kind == "trap_b":
            k = rng.randrange(10, 99_999)
            if not any(c in "abcdef" for c in format(k, "x")):
                return None
            return Ids(format(k, "x"), format(k, "x"), kind)
        if kind == "trap_a":
            assert self.trap_b is not None
            k = int(self.trap_b.resp, 16)  # the decimal digits of the first message's number
            return Ids(f"{k:010d}", f"{k:010d}", kind)
        raise ValueError(kind)


def plain_ids(behaviour: str, rng: random.Random, counter: itertools.count) -> Ids:
    """The id scheme of every behaviour but `mixed_ids` (each a different, common style)."""
    n = next(counter)
    if behaviour == "hex_resp_dec_receipt":
        v = rng.randrange(0x100000, 0xFFFFFFF)
        return Ids(format(v, "x"), str(v), behaviour)
    if behaviour == "tlv_only":
        s = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        return Ids(s, s, behaviour)
    if behaviour in ("appendixb12", "clock_fast", "receipt_first"):
        s = format(rng.getrandbits(32) | (1 << 31), "08X")
        return Ids(s, s, behaviour)
    s = str(1_000_000_000 + n * 7919 + rng.randrange(7919))  # 10 digits, rising
    return Ids(s, s, behaviour)


# ---- messages -------------------------------------------------------------------------------


def decode_text(short_message: bytes, data_coding: int, udhi: bool) -> tuple[tuple | None, str]:
    """A part's concatenation (ref, total, number) if any, and its text."""
    concat, body = None, short_message
    if udhi and short_message:
        udhl = short_message[0] + 1
        elements, body = short_message[1:udhl], short_message[udhl:]
        pos = 0
        while pos + 2 <= len(elements):
            iei, length = elements[pos], elements[pos + 1]
            value = elements[pos + 2 : pos + 2 + length]
            if iei == 0x00 and length == 3:
                concat = (value[0], value[1], value[2])
            elif iei == 0x08 and length == 4:
                concat = (int.from_bytes(value[:2], "big"), value[2], value[3])
            pos += 2 + length
    if data_coding == 0x08:
        return concat, body.decode("utf-16-be", errors="replace")
    if data_coding in (0x01, 0x03):
        return concat, body.decode("latin-1")
    try:
        import gsm0338  # noqa: F401  (registers the "gsm03.38" codec)

        return concat, body.decode("gsm03.38", errors="replace")
    except (ImportError, LookupError):
        return concat, body.decode("latin-1")


def fate(text: str, account: str) -> str:
    """The message's final status on this account: deterministic, mostly DELIVRD."""
    h = int.from_bytes(hashlib.sha256(f"{account}\0{text}".encode()).digest()[:4], "big") % 100
    return "UNDELIV" if h < 12 else "EXPIRED" if h < 18 else "DELIVRD"


@dataclass
class Part:
    ids: Ids
    accepted_at: float  # wall time
    handset: str = field(default="", repr=False)  # the submit's destination: kept, never logged
    sender: str = ""


@dataclass
class Group:
    """The parts of one concatenated message seen so far."""

    total: int
    parts: dict[int, tuple[Part, str]] = field(default_factory=dict)
    session: str = ""


# ---- the server -----------------------------------------------------------------------------


class Smsc:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.behaviour: str = args.behaviour
        self.rng = random.Random(args.seed)
        self.sessions: dict[str, smpp34.Esme] = {}
        self.books: dict[str, IdBook] = {}
        self.mixed: dict[str, MixedIds] = {}
        self.counter = itertools.count()
        self.groups: dict[tuple[str, int, int], Group] = {}
        self.tasks: set[asyncio.Task] = set()
        self.trap_a_done: dict[str, asyncio.Event] = {}  # trap_b receipt waits for its trap_a
        self.log = open(args.log, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self.stats = {"binds": 0, "submits": 0, "receipts": 0, "refused": 0}
        self.offset = timedelta(minutes=3) if self.behaviour == "clock_fast" else timedelta()
        self.tz = UTC

    # ---- log / clock ----

    def write(self, **record: object) -> None:
        self.log.write(json.dumps(record, separators=(",", ":")) + "\n")

    def stamp(self, wall: float) -> str:
        """A receipt date as this SMSC's clock writes it."""
        t = datetime.fromtimestamp(wall, UTC) + self.offset
        if self.behaviour == "utc_plus3":
            t = t + timedelta(hours=3)  # local time, no offset written
        return t.strftime("%y%m%d%H%M" if self.behaviour == "appendixb10" else "%y%m%d%H%M%S")

    def delay(self) -> float:
        return self.rng.uniform(self.args.min_delay, self.args.max_delay)

    # ---- main loop ----

    async def run(self) -> None:
        server = smpp34.Server(self.args.host, self.args.port, system_id="SMPP34SMSC")
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        self.write(event="ready", behaviour=self.behaviour, port=self.args.port, at=time.time())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while True:
                nxt = asyncio.ensure_future(server.next())
                done, _ = await asyncio.wait({nxt, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    with contextlib.suppress(BaseException):
                        await nxt
                    break
                self.on_event(nxt.result())
        finally:
            for task in list(self.tasks):
                task.cancel()
            if self.tasks:
                await asyncio.wait(self.tasks, timeout=2)
            for esme in list(self.sessions.values()):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(esme.unbind(), 2)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.stop(), 5)
            self.write(event="stopped", at=time.time(), **self.stats)
            self.log.close()

    def spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            print(f"smsc34: task failed: {task.exception()!r}", file=sys.stderr, flush=True)

    def on_event(self, ev: object) -> None:
        if isinstance(ev, smpp34.Esme):
            self.sessions[ev.session_id] = ev
            self.stats["binds"] += 1
            self.write(
                event="bind",
                account=ev.system_id,
                session=ev.session_id,
                can_receive=ev.can_receive,
                at=time.time(),
            )
        elif isinstance(ev, smpp34.Unbound):
            self.sessions.pop(ev.session_id, None)
            self.write(event="unbind", session=ev.session_id, at=time.time())
        elif isinstance(ev, smpp34.SubmitSmEvent):
            self.on_submit(ev)

    # ---- submits ----

    def account_of(self, session_id: str) -> str:
        esme = self.sessions.get(session_id)
        return esme.system_id if esme is not None else "?"

    def new_ids(self, account: str) -> Ids:
        book = self.books.setdefault(account, IdBook())
        if self.behaviour == "mixed_ids":
            ids = self.mixed.setdefault(account, MixedIds(self.rng)).next(book)
        else:
            for _ in range(1000):
                ids = plain_ids(self.behaviour, self.rng, self.counter)
                if book.fits(ids):
                    break
        book.add(ids)
        return ids

    def on_submit(self, ev: smpp34.SubmitSmEvent) -> None:
        self.stats["submits"] += 1
        account = self.account_of(ev.session_id)
        udhi = bool(ev.esm_class & ESM_UDHI)
        concat, text = decode_text(ev.short_message, ev.data_coding, udhi)
        ids = self.new_ids(account)
        now = time.time()
        part = Part(ids, now, ev.destination_addr, ev.source_addr)
        wants_receipt = bool(ev.registered_delivery & 0x03)
        if concat is None:
            if self.behaviour == "receipt_first" and wants_receipt:
                self.spawn(self.receipt_then_accept(ev, account, part, text))
                return
            ev.accept(ids.resp)
            self.write_accept(account, ids, 0, 1)
            if wants_receipt:
                self.spawn(self.receipts(ev.session_id, account, [part], text))
            return
        ev.accept(ids.resp)
        ref, total, number = concat
        self.write_accept(account, ids, number - 1, total)
        key = (account, ref, total)
        group = self.groups.get(key)
        if group is None or number in group.parts:
            group = self.groups[key] = Group(total, session=ev.session_id)
        group.parts[number] = (part, text)
        if len(group.parts) == total:
            del self.groups[key]
            full = "".join(group.parts[i][1] for i in sorted(group.parts))
            parts = [group.parts[i][0] for i in sorted(group.parts)]
            if wants_receipt:
                self.spawn(self.receipts(ev.session_id, account, parts, full))

    def write_accept(self, account: str, ids: Ids, part: int, parts: int) -> None:
        self.write(
            event="accept",
            account=account,
            resp_id=ids.resp,
            receipt_id=ids.receipt,
            scheme=ids.scheme,
            part=part,
            parts=parts,
            at=time.time(),
        )

    # ---- receipts ----

    async def receipt_then_accept(
        self, ev: smpp34.SubmitSmEvent, account: str, part: Part, text: str
    ) -> None:
        """`receipt_first`: the final receipt is acknowledged before the submit is answered."""
        await asyncio.sleep(self.rng.uniform(0.05, 0.3))
        status = fate(text, account)
        try:
            await self.send_receipt(ev.session_id, account, part, 0, 1, text, status, True)
        finally:
            ev.accept(part.ids.resp)
            self.write_accept(account, part.ids, 0, 1)

    async def receipts(self, session_id: str, account: str, parts: list[Part], text: str) -> None:
        status = fate(text, account)
        scheme = parts[0].ids.scheme
        if self.behaviour == "intermediate":
            first = self.rng.choice((("ENROUTE",), ("ACCEPTD",), ("ENROUTE", "ACCEPTD")))
            for word in first:
                await asyncio.sleep(self.rng.uniform(0.05, 0.3))
                for i, part in enumerate(parts):
                    await self.send_receipt(
                        session_id, account, part, i, len(parts), text, word, False
                    )
        await asyncio.sleep(self.delay())
        if scheme == "trap_b":  # sent after the trap's second message's receipt (or 3 s)
            done = self.trap_a_done.setdefault(parts[0].ids.resp, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 3.0)
        for i, part in enumerate(parts):
            await self.send_receipt(session_id, account, part, i, len(parts), text, status, True)
        if scheme == "trap_a":
            k = int(parts[0].ids.resp)
            self.trap_a_done.setdefault(format(k, "x"), asyncio.Event()).set()

    def receiver(self, session_id: str, account: str) -> smpp34.Esme | None:
        """The session to send a receipt on: the submitting one if it receives, else any
        receiving session of the same account."""
        own = self.sessions.get(session_id)
        if own is not None and own.can_receive:
            return own
        for esme in self.sessions.values():
            if esme.system_id == account and esme.can_receive:
                return esme
        return None

    def receipt_pdu(
        self, part: Part, status: str, final: bool, text: str, sent: float
    ) -> dict[str, object]:
        """deliver_sm fields (short_message, esm_class, tlvs) for one receipt."""
        rid = part.ids.receipt
        esm = ESM_INTERMEDIATE if (not final and status == "ENROUTE") else ESM_RECEIPT
        if self.behaviour == "tlv_only":
            tlvs = [
                smpp34.Tlv(smpp34.TLV_RECEIPTED_MESSAGE_ID, rid.encode() + b"\0"),
                smpp34.Tlv(smpp34.TLV_MESSAGE_STATE, bytes([MESSAGE_STATE[status]])),
            ]
            if ERROR_CODE.get(status):
                code = ERROR_CODE[status].to_bytes(2, "big")
                tlvs.append(smpp34.Tlv(smpp34.TLV_NETWORK_ERROR_CODE, b"\x03" + code))
            return {"short_message": b"", "esm_class": esm, "tlvs": tlvs}
        dlvrd = 1 if status == "DELIVRD" else 0
        body = (
            f"id:{rid} sub:001 dlvrd:{dlvrd:03d} submit date:{self.stamp(part.accepted_at)} "
            f"done date:{self.stamp(sent)} stat:{status} err:{ERROR_CODE.get(status, 0):03d} "
            f"text:{text[:20]}"
        )
        return {"short_message": body.encode("latin-1", "replace"), "esm_class": esm, "tlvs": []}

    async def send_receipt(
        self,
        session_id: str,
        account: str,
        part: Part,
        index: int,
        parts: int,
        text: str,
        status: str,
        final: bool,
    ) -> None:
        first_sent = None
        acked, command_status, attempts = False, None, 0
        sent = time.time()
        while attempts < RECEIPT_RETRIES:
            attempts += 1
            esme = self.receiver(session_id, account)
            if esme is None:
                await asyncio.sleep(1.0)
                continue
            sent = time.time()
            first_sent = first_sent or sent
            fields = self.receipt_pdu(part, status, final, text, sent)
            try:
                # As carriers do: from the handset, to the message's sender.
                resp = await asyncio.wait_for(
                    esme.deliver_sm(part.sender or "SMSC", source_addr=part.handset, **fields),
                    10,
                )
            except Exception as exc:
                print(f"smsc34: deliver_sm failed: {exc!r}", file=sys.stderr, flush=True)
                await asyncio.sleep(1.0)
                continue
            command_status = resp.command_status
            if resp.is_success:
                acked = True
                break
            self.stats["refused"] += 1
            await asyncio.sleep(1.0)
        self.stats["receipts"] += 1
        self.write(
            event="receipt",
            account=account,
            resp_id=part.ids.resp,
            receipt_id=part.ids.receipt,
            scheme=part.ids.scheme,
            part=index,
            parts=parts,
            text=text,
            status=status,
            final=final,
            accepted_at=part.accepted_at,
            first_sent_at=first_sent,
            sent_at=sent,
            acked=acked,
            command_status=command_status,
            attempts=attempts,
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--behaviour", "--behavior", choices=BEHAVIOURS, default="appendixb12")
    p.add_argument("--log", required=True, help="JSON lines: accepts and receipts sent")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--min-delay", type=float, default=0.05)
    p.add_argument("--max-delay", type=float, default=1.0)
    args = p.parse_args(argv)
    asyncio.run(Smsc(args).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
