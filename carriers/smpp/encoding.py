"""SMS text encoding for SMPP: GSM 03.38 or UCS-2, split into concatenated parts with a UDH.

GSM-7 counts septets (an extension-table character such as `€` or `{` costs two, ESC + code);
UCS-2 counts UTF-16 code units (a character outside the BMP costs two, a surrogate pair). A text
that fits one message goes without a UDH (160 septets / 70 units); a longer one is cut into parts
of 153 septets / 67 units behind a 6-octet concatenation UDH (IEI 0x00, 8-bit reference), never
inside an escape sequence or a surrogate pair, so every part is at most 140 octets on the air.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from functools import lru_cache

import gsm0338  # noqa: F401  (registers the "gsm03.38" codec)

GSM7 = 0x00
UCS2 = 0x08
ESM_CLASS_UDHI = 0x40

SINGLE_GSM7_SEPTETS = 160
PART_GSM7_SEPTETS = 153
SINGLE_UCS2_UNITS = 70
PART_UCS2_UNITS = 67
MAX_PARTS = 255
UDH_LENGTH = 6
MAX_USER_DATA_OCTETS = 140

_GSM_CODEC = "gsm03.38"
_ESC = "\x1b"
_CR = 0x0D
_IEI_CONCAT_8BIT = 0x00
_references = itertools.count(random.randrange(256))


class MessageTooLong(ValueError):
    """The text needs more than 255 parts, the most a concatenation UDH can number."""


@dataclass(frozen=True, slots=True)
class EncodedMessage:
    """What goes into one or more `submit_sm`: data_coding, esm_class and each part's bytes."""

    data_coding: int
    esm_class: int
    parts: tuple[bytes, ...]
    reference: int | None


@dataclass(frozen=True, slots=True)
class Concatenation:
    """A concatenation UDH's fields: 8-bit reference, total parts, this part's 1-based number."""

    reference: int
    total: int
    number: int


@lru_cache(maxsize=8192)
def _gsm7_cost(char: str) -> int | None:
    """Septets `char` takes in GSM 03.38 (1, or 2 for the extension table), None if absent."""
    if char == _ESC:
        return None
    try:
        return len(char.encode(_GSM_CODEC))
    except UnicodeEncodeError:
        return None


@lru_cache(maxsize=256)
def _gsm7_bytes(text: str) -> bytes | None:
    """The text in GSM 03.38, unpacked, one septet per octet (None if it does not fit); cached
    because choosing the coding, counting and encoding all need it for the same text."""
    if _ESC in text:
        return None
    try:
        return text.encode(_GSM_CODEC)
    except UnicodeEncodeError:
        return None


def is_gsm7(text: str) -> bool:
    """True when every character of `text` is in the GSM 03.38 default alphabet or extension."""
    return _gsm7_bytes(text) is not None


def choose_data_coding(text: str) -> int:
    """0x00 (GSM-7) when the text fits the GSM alphabet, else 0x08 (UCS-2)."""
    return GSM7 if is_gsm7(text) else UCS2


def _costs(text: str, data_coding: int) -> list[int]:
    """Units each character takes: septets for GSM-7, UTF-16 code units for UCS-2."""
    if data_coding == GSM7:
        return [_gsm7_cost(char) or 0 for char in text]
    return [2 if ord(char) > 0xFFFF else 1 for char in text]


def text_length(text: str, data_coding: int | None = None) -> int:
    """Length in the coding's units (septets with extension characters counted double, or UCS-2
    code units with non-BMP characters counted double)."""
    coding = choose_data_coding(text) if data_coding is None else data_coding
    if coding == GSM7:
        return len(_gsm7_bytes(text) or b"")
    return len(text.encode("utf-16-be", errors="surrogatepass")) // 2


def _limits(data_coding: int) -> tuple[int, int]:
    """(units in a single message, units per part of a concatenated one) for the coding."""
    if data_coding == GSM7:
        return SINGLE_GSM7_SEPTETS, PART_GSM7_SEPTETS
    return SINGLE_UCS2_UNITS, PART_UCS2_UNITS


def _chunks(text: str, data_coding: int) -> tuple[str, ...]:
    """Cut `text` between characters into the chunks its parts carry, with no part limit."""
    single, per_part = _limits(data_coding)
    if text_length(text, data_coding) <= single:
        return (text,)
    costs = _costs(text, data_coding)
    chunks: list[str] = []
    start, used = 0, 0
    for index, cost in enumerate(costs):
        if used + cost > per_part:
            chunks.append(text[start:index])
            start, used = index, 0
        used += cost
    chunks.append(text[start:])
    return tuple(chunks)


def split_text(text: str, data_coding: int | None = None) -> tuple[int, tuple[str, ...]]:
    """Cut `text` into the chunks each part carries; returns (data_coding, chunks).

    Cuts fall between characters only, so an escape sequence or a surrogate pair is never split.
    """
    coding = choose_data_coding(text) if data_coding is None else data_coding
    chunks = _chunks(text, coding)
    if len(chunks) > MAX_PARTS:
        raise MessageTooLong(f"text needs {len(chunks)} parts, at most {MAX_PARTS} allowed")
    return coding, chunks


def parts_count(text: str) -> int:
    """How many SMS parts `text` takes (the router's `segments`), even past the 255-part limit."""
    return len(_chunks(text, choose_data_coding(text)))


def pack_septets(septets: bytes, fill_bits: int = 0) -> bytes:
    """Pack 7-bit values LSB first (GSM 03.38 §6.1.2.1) after `fill_bits` zero bits.

    When the last octet would hold 7 spare bits, they carry CR (§6.1.2.3.1), not a stray `@`.
    """
    if (fill_bits + 7 * len(septets)) % 8 == 1:
        septets = septets + bytes([_CR])
    accumulator, bits, out = 0, fill_bits, bytearray()
    for septet in septets:
        accumulator |= (septet & 0x7F) << bits
        bits += 7
        while bits >= 8:
            out.append(accumulator & 0xFF)
            accumulator >>= 8
            bits -= 8
    if bits:
        out.append(accumulator & 0xFF)
    return bytes(out)


def unpack_septets(data: bytes, fill_bits: int = 0) -> bytes:
    """Inverse of `pack_septets`: the septets packed in `data` after `fill_bits` bits.

    A trailing CR ending exactly on an octet boundary is taken as padding and dropped.
    """
    value = int.from_bytes(data, "little") >> fill_bits
    count = (8 * len(data) - fill_bits) // 7
    septets = bytes((value >> (7 * i)) & 0x7F for i in range(count))
    if septets.endswith(bytes([_CR])) and (fill_bits + 7 * count) % 8 == 0:
        septets = septets[:-1]
    return septets


def _udh(reference: int, total: int, number: int) -> bytes:
    """A 6-octet concatenation UDH: UDHL=5, IEI 0x00, IEDL 3, reference, total, number."""
    return bytes([5, _IEI_CONCAT_8BIT, 3, reference & 0xFF, total, number])


def _udh_fill_bits(udh_length: int) -> int:
    """Fill bits after a UDH so GSM-7 septets start on a septet boundary."""
    return (7 - (udh_length * 8) % 7) % 7


def _encode_chunk(chunk: str, data_coding: int, packed: bool, udh: bytes) -> bytes:
    """One part's `short_message`: the UDH (if any) and the chunk in the data coding."""
    if data_coding == UCS2:
        return udh + chunk.encode("utf-16-be", errors="surrogatepass")
    septets = _gsm7_bytes(chunk) or b""
    if not packed:
        return udh + septets
    return udh + pack_septets(septets, _udh_fill_bits(len(udh)) if udh else 0)


def encode(text: str, *, packed: bool = False, reference: int | None = None) -> EncodedMessage:
    """Encode `text` for `submit_sm`: one part, or parts behind a concatenation UDH.

    `packed` packs GSM-7 septets eight into seven octets; most SMSCs expect them unpacked, one per
    octet. `reference` is the concatenation reference (a rolling counter when omitted).
    """
    coding, chunks = split_text(text)
    if len(chunks) == 1:
        return EncodedMessage(coding, 0, (_encode_chunk(text, coding, packed, b""),), None)
    ref = (next(_references) if reference is None else reference) & 0xFF
    total = len(chunks)
    parts = tuple(
        _encode_chunk(chunk, coding, packed, _udh(ref, total, number))
        for number, chunk in enumerate(chunks, start=1)
    )
    return EncodedMessage(coding, ESM_CLASS_UDHI, parts, ref)


def decode_part(
    short_message: bytes, data_coding: int, *, udhi: bool, packed: bool = False
) -> tuple[Concatenation | None, str]:
    """Decode one part's `short_message`: its concatenation header (if any) and its text."""
    concat, body, udh_length = None, short_message, 0
    if udhi and short_message:
        udh_length = short_message[0] + 1
        concat = _find_concatenation(short_message[1:udh_length])
        body = short_message[udh_length:]
    if data_coding == UCS2:
        return concat, body.decode("utf-16-be", errors="surrogatepass")
    if packed:
        body = unpack_septets(body, _udh_fill_bits(udh_length) if udh_length else 0)
    return concat, body.decode(_GSM_CODEC)


def _find_concatenation(elements: bytes) -> Concatenation | None:
    """The 8-bit (IEI 0x00) or 16-bit (IEI 0x08) concatenation element among UDH elements."""
    pos = 0
    while pos + 2 <= len(elements):
        iei, length = elements[pos], elements[pos + 1]
        value = elements[pos + 2 : pos + 2 + length]
        if iei == _IEI_CONCAT_8BIT and length == 3:
            return Concatenation(value[0], value[1], value[2])
        if iei == 0x08 and length == 4:
            return Concatenation(int.from_bytes(value[:2], "big"), value[2], value[3])
        pos += 2 + length
    return None


def reassemble(message: EncodedMessage, *, packed: bool = False) -> str:
    """The text back from an encoded message's parts, ordered by their UDH part numbers."""
    udhi = bool(message.esm_class & ESM_CLASS_UDHI)
    decoded = [
        decode_part(part, message.data_coding, udhi=udhi, packed=packed) for part in message.parts
    ]
    decoded.sort(key=lambda item: item[0].number if item[0] else 0)
    return "".join(text for _, text in decoded)
