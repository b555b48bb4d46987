"""SMPP 3.4 on the wire for the simulated SMSC: framing, parsing and PDU building on smpplib.

smpplib is a client library; its PDU classes encode and decode both directions, so the server
side reuses them. What smpplib does not do for a server (frame reads off an asyncio stream,
reject garbled PDUs with a status, pin a response's sequence number) lives here.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import Any

from smpplib import command_codes, consts, smpp
from smpplib.client import SimpleSequenceGenerator

from carriers.smpp.encoding import GSM7, UCS2, Concatenation, decode_part, parts_count

HEADER = struct.Struct(">LLLL")
MAX_PDU_LENGTH = 64 * 1024
ESM_UDHI = 0x40


class BadPDU(Exception):
    """A PDU that cannot be read: answered with generic_nack carrying `status`."""

    def __init__(self, status: int, sequence: int, fatal: bool = False) -> None:
        super().__init__(consts.DESCRIPTIONS.get(status, hex(status)))
        self.status = status
        self.sequence = sequence
        self.fatal = fatal  # the stream is out of step and the session must close


async def read_raw(reader: asyncio.StreamReader) -> bytes:
    """One whole PDU's bytes off the stream (raises BadPDU, fatal, on an impossible length)."""
    head = await reader.readexactly(16)
    length, _, _, sequence = HEADER.unpack(head)
    if not 16 <= length <= MAX_PDU_LENGTH:
        raise BadPDU(consts.SMPP_ESME_RINVCMDLEN, sequence, fatal=True)
    return head + await reader.readexactly(length - 16)


def parse(raw: bytes) -> Any:
    """The smpplib PDU object for `raw` (raises BadPDU on an unknown command or bad body)."""
    _, command_id, _, sequence = HEADER.unpack(raw[:16])
    try:
        command_codes.get_command_name(command_id)
    except Exception:
        raise BadPDU(consts.SMPP_ESME_RINVCMDID, sequence) from None
    try:
        return smpp.parse_pdu(raw, client=_NO_SEQUENCE, allow_unknown_opt_params=True)
    except Exception:
        raise BadPDU(consts.SMPP_ESME_RINVCMDLEN, sequence) from None


def response(name: str, sequence: int, status: int = consts.SMPP_ESME_ROK, **fields: Any) -> bytes:
    """A response PDU's bytes with the request's sequence number."""
    pdu = smpp.make_pdu(name, client=_NO_SEQUENCE, status=status, **fields)
    pdu.sequence = sequence
    return pdu.generate()


def request(name: str, sequencer: SimpleSequenceGenerator, **fields: Any) -> tuple[int, bytes]:
    """A request PDU's (sequence number, bytes), numbered by the session's sequencer."""
    pdu = smpp.make_pdu(name, client=sequencer, **fields)
    return pdu.sequence, pdu.generate()


def text_of(value: bytes | str | None) -> str:
    """A C-octet string field as text."""
    if value is None:
        return ""
    return value.decode("latin-1") if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class Content:
    """What a submit_sm carries: addresses, decoded text, parts it counts for, concatenation."""

    source: str
    destination: str
    text: str
    parts: int
    concat: Concatenation | None
    registered_delivery: int


def content_of(pdu: Any) -> Content:
    """Decode a submit_sm: UDH or SAR concatenation, GSM-7/UCS-2 text, message_payload parts."""
    coding = pdu.data_coding or 0
    payload = pdu.message_payload
    if payload:
        concat, text = _decode(payload, coding, udhi=False)
        parts = max(1, parts_count(text)) if text else 1
    else:
        concat, text = _decode(
            pdu.short_message or b"", coding, udhi=bool((pdu.esm_class or 0) & ESM_UDHI)
        )
        parts = 1
    if concat is None and pdu.sar_total_segments:
        concat = Concatenation(
            pdu.sar_msg_ref_num or 0, pdu.sar_total_segments, pdu.sar_segment_seqnum or 1
        )
    return Content(
        source=text_of(pdu.source_addr),
        destination=text_of(pdu.destination_addr),
        text=text,
        parts=parts,
        concat=concat,
        registered_delivery=pdu.registered_delivery or 0,
    )


def _decode(raw: bytes, coding: int, *, udhi: bool) -> tuple[Concatenation | None, str]:
    try:
        return decode_part(raw, UCS2 if coding == UCS2 else GSM7, udhi=udhi)
    except (UnicodeDecodeError, ValueError, IndexError):
        return None, raw.decode("latin-1")


class _NoSequence:
    """Responses carry the request's number; smpplib still wants a numbering object."""

    sequence = 0

    @staticmethod
    def next_sequence() -> int:
        return 0


_NO_SEQUENCE = _NoSequence()
