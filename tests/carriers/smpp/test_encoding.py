"""GSM-7 / UCS-2 choice, concatenated parts with a UDH, septet packing, part counts."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from carriers.smpp.encoding import (
    ESM_CLASS_UDHI,
    GSM7,
    MAX_USER_DATA_OCTETS,
    UCS2,
    MessageTooLong,
    choose_data_coding,
    decode_part,
    encode,
    pack_septets,
    parts_count,
    reassemble,
    split_text,
    text_length,
    unpack_septets,
)

GSM_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM_EXTENSION = "^{}\\[~]|€\f"

gsm_texts = st.text(alphabet=GSM_BASIC + GSM_EXTENSION, max_size=700)
unicode_texts = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=400
).filter(lambda text: choose_data_coding(text) == UCS2)
any_texts = st.one_of(gsm_texts, unicode_texts, st.text(max_size=400))


def _expected_parts(units: int, single: int, per_part: int) -> int:
    """The textbook count, valid when no character costs more than one unit."""
    return 1 if units <= single else math.ceil(units / per_part)


def _air_octets(part: bytes, data_coding: int, udhi: bool) -> int:
    """Octets the part takes in TP-UD once GSM-7 septets are packed (its size on the air)."""
    if data_coding == UCS2:
        return len(part)
    udh_length = part[0] + 1 if udhi else 0
    septets = len(part) - udh_length
    fill = (7 - (udh_length * 8) % 7) % 7 if udh_length else 0
    return udh_length + math.ceil((fill + 7 * septets) / 8)


@given(any_texts, st.booleans())
@settings(max_examples=300, deadline=None)
def test_split_and_reassemble_round_trip(text: str, packed: bool) -> None:
    """Every text comes back unchanged from its encoded parts, packed or not."""
    if packed:
        assume(not text.endswith("\r"))  # 23.038's CR padding makes a final CR ambiguous
    message = encode(text, packed=packed)
    assert reassemble(message, packed=packed) == text
    assert len(message.parts) == parts_count(text)


@given(any_texts)
@settings(max_examples=300, deadline=None)
def test_parts_never_exceed_140_octets(text: str) -> None:
    """Unpacked GSM-7 parts fit 140 octets once packed; packed and UCS-2 parts fit as they are."""
    unpacked = encode(text)
    packed = encode(text, packed=True)
    udhi = bool(unpacked.esm_class & ESM_CLASS_UDHI)
    for part in unpacked.parts:
        assert _air_octets(part, unpacked.data_coding, udhi) <= MAX_USER_DATA_OCTETS
    for part in packed.parts:
        assert len(part) <= MAX_USER_DATA_OCTETS


@given(st.text(alphabet=GSM_BASIC, max_size=2000))
@settings(max_examples=200, deadline=None)
def test_gsm7_part_count_follows_160_153(text: str) -> None:
    """Basic-alphabet texts: one part up to 160 septets, then ceil(n / 153)."""
    assert parts_count(text) == _expected_parts(len(text), 160, 153)


@given(st.text(alphabet="абвгдежзийклмнопрстуфхцчшщъыьэюя 0123456789中文", max_size=1000))
@settings(max_examples=200, deadline=None)
def test_ucs2_part_count_follows_70_67(text: str) -> None:
    """BMP texts outside GSM: one part up to 70 characters, then ceil(n / 67)."""
    assume(choose_data_coding(text) == UCS2)
    assert parts_count(text) == _expected_parts(len(text), 70, 67)


@pytest.mark.parametrize(
    ("length", "parts"), [(160, 1), (161, 2), (306, 2), (307, 3), (459, 3), (460, 4)]
)
def test_gsm7_boundaries(length: int, parts: int) -> None:
    """The known boundaries of GSM-7 concatenation."""
    assert parts_count("a" * length) == parts


@pytest.mark.parametrize(("length", "parts"), [(70, 1), (71, 2), (134, 2), (135, 3)])
def test_ucs2_boundaries(length: int, parts: int) -> None:
    """The known boundaries of UCS-2 concatenation."""
    assert parts_count("ж" * length) == parts


def test_extension_characters_count_double() -> None:
    """`€` and `{` take ESC + code: 80 of them fill one message, 81 need two parts."""
    assert choose_data_coding("€{}[]~^|\\") == GSM7
    assert text_length("€" * 80) == 160
    assert parts_count("€" * 80) == 1
    assert parts_count("€" * 81) == 2
    assert encode("€").parts == (b"\x1be",)


@given(st.text(alphabet="ab€{", min_size=161, max_size=800))
@settings(max_examples=200, deadline=None)
def test_escape_sequence_never_split(text: str) -> None:
    """No part ends on a lone ESC; each part is at most 153 septets of whole characters."""
    message = encode(text)
    for part in message.parts:
        body = part[6:]
        assert not body.endswith(b"\x1b")
        assert len(body) <= 153
        assert decode_part(part, GSM7, udhi=True)[1]


@given(st.text(alphabet="ж😀", min_size=71, max_size=400))
@settings(max_examples=200, deadline=None)
def test_surrogate_pair_never_split(text: str) -> None:
    """An emoji is two UTF-16 units and stays in one part; no part exceeds 67 units."""
    _, chunks = split_text(text)
    assert "".join(chunks) == text
    for chunk in chunks:
        assert text_length(chunk, UCS2) <= 67
    for part in encode(text).parts:
        part.decode("utf-16-be")  # raises on a split surrogate pair


def test_udh_carries_reference_total_and_number() -> None:
    """Three parts share the reference and number themselves 1..3 in a 6-octet UDH."""
    message = encode("x" * 400, reference=0x1A7)
    assert message.esm_class == ESM_CLASS_UDHI
    assert message.reference == 0xA7
    headers = [decode_part(part, GSM7, udhi=True)[0] for part in message.parts]
    assert [(h.reference, h.total, h.number) for h in headers] == [(0xA7, 3, n) for n in (1, 2, 3)]
    assert all(part[:6] == bytes([5, 0, 3, 0xA7, 3, n]) for n, part in enumerate(message.parts, 1))


def test_single_part_has_no_udh() -> None:
    """A short text goes as it is: no UDH, esm_class 0."""
    message = encode("Your code is 123456")
    assert message.esm_class == 0
    assert message.parts == (b"Your code is 123456",)
    assert encode("Код 123456").data_coding == UCS2
    assert encode("Код 123456").parts[0] == "Код 123456".encode("utf-16-be")


def test_known_packing() -> None:
    """'hellohello' packs to the textbook octets (GSM 03.38 §6.1.2.1)."""
    assert pack_septets(b"hellohello").hex() == "e8329bfd4697d9ec37"
    assert unpack_septets(bytes.fromhex("e8329bfd4697d9ec37")) == b"hellohello"


def test_seven_spare_bits_carry_cr_not_at_sign() -> None:
    """Seven septets leave 7 spare bits: padded with CR and dropped again on unpacking."""
    packed = pack_septets(b"1234567")
    assert len(packed) == 7
    assert packed[-1] >> 1 == 0x0D
    assert unpack_septets(packed) == b"1234567"


def test_escape_character_itself_is_not_gsm() -> None:
    """A raw ESC in the text is not a character GSM can show: the text goes as UCS-2."""
    assert choose_data_coding("a\x1bb") == UCS2


def test_too_many_parts_rejected() -> None:
    """More than 255 parts cannot be numbered by an 8-bit UDH."""
    assert parts_count("a" * 153 * 256) == 256
    with pytest.raises(MessageTooLong):
        encode("a" * 153 * 256)
