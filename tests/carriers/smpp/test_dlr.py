"""Delivery receipts: real-world strings, generated variants (hypothesis), TLVs on real PDUs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from smpplib import smpp
from smpplib.client import SimpleSequenceGenerator

from carriers.smpp.dlr import (
    MESSAGE_STATES,
    STATUSES,
    Receipt,
    ReceiptError,
    format_receipt_text,
    message_id_keys,
    parse_receipt_text,
    receipt_from_pdu,
)


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


# Receipt texts as seen in public projects, issues and docs (source in the comment), with the
# parse we expect: (message_id, status, error_code, submit_date, done_date).
REAL_WORLD = [
    # ksmppd issue #108: an operator's receipt without the `stat:` key
    (
        "id:ce5bc5a9-4f7d-4282-9244-2e1022a9335c sub:000 dlvrd:000 submit date:180903120815 "
        "done date:180903120816 DELIVRD err:000 Text:",
        ("ce5bc5a9-4f7d-4282-9244-2e1022a9335c", "DELIVRD", "000"),
        (utc(2018, 9, 3, 12, 8, 15), utc(2018, 9, 3, 12, 8, 16)),
    ),
    # ksmppd issue #108: the same receipt as passed on to the client
    (
        "id:7d093bfa-4d65-4757-b0bb-177fc9d0a038 sub:001 dlvrd:001 submit date:180903120232 "
        "done date:180903121447 stat:DELIVRD err:000 text:",
        ("7d093bfa-4d65-4757-b0bb-177fc9d0a038", "DELIVRD", "000"),
        (utc(2018, 9, 3, 12, 2, 32), utc(2018, 9, 3, 12, 14, 47)),
    ),
    # Apache Camel SMPP tests: a non-numeric err and a capitalised Text:
    (
        "id:2 sub:001 dlvrd:001 submit date:0908312310 done date:0908312311 stat:DELIVRD "
        "err:xxx Text:Hello SMPP world!",
        ("2", "DELIVRD", "xxx"),
        (utc(2009, 8, 31, 23, 10), utc(2009, 8, 31, 23, 11)),
    ),
    # A C# gateway's comment: hex id, 10-digit dates
    (
        "id:483D47F1 sub:001 dlvrd:001 submit date:0905151857 done date:0905151857 "
        "stat:DELIVRD err:000 Text:Dear Godwin Akpabio",
        ("483D47F1", "DELIVRD", "000"),
        (utc(2009, 5, 15, 18, 57), utc(2009, 5, 15, 18, 57)),
    ),
    # Adobe Campaign's SMPP documentation (the SMPP 3.4 Appendix B example)
    (
        "id:1234567890 sub:001 dlvrd:001 submit date:1608011415 done date:1608011417 "
        "stat:DELIVRD err:000 Text:Hello Adobe world",
        ("1234567890", "DELIVRD", "000"),
        (utc(2016, 8, 1, 14, 15), utc(2016, 8, 1, 14, 17)),
    ),
    # A Kannel DLR handler (VipNet, HR): extra fields after err, no text
    (
        "id:40072910491419819 sub:001 dlvrd:001 submit date:1007291049 done date:1007291049 "
        "stat:UNDELIV err:001 IMSI: MSC: ORN:VipNet MCCMNC:",
        ("40072910491419819", "UNDELIV", "001"),
        (utc(2010, 7, 29, 10, 49), utc(2010, 7, 29, 10, 49)),
    ),
    # A jsmpp/cloudhopper-style PDU dump test (Kenya): UNDELIV with the text cut at 20 chars
    (
        "id:0966279342 sub:001 dlvrd:001 submit date:1303060704 done date:1303060705 "
        "stat:UNDELIV err:000 text:INSO ALERT, 1000, Da",
        ("0966279342", "UNDELIV", "000"),
        (utc(2013, 3, 6, 7, 4), utc(2013, 3, 6, 7, 5)),
    ),
    # SmscDeliveryReceipt tests (a Java SMPP library): one-digit dlvrd and err
    (
        "id:bd778cd76ae9e79da2ddc8188c68f8c1 sub:001 dlvrd:0 submit date:0610191533 "
        "done date:0610191539 stat:UNDELIV err:1 text:This is an Acti",
        ("bd778cd76ae9e79da2ddc8188c68f8c1", "UNDELIV", "1"),
        (utc(2006, 10, 19, 15, 33), utc(2006, 10, 19, 15, 39)),
    ),
    (
        "id:b756c4f97aa2e1e67377dffc5e2f7d9b sub:001 dlvrd:0 submit date:0610191211 "
        "done date:0610191211 stat:REJECTD err:1 text:This is an Acti",
        ("b756c4f97aa2e1e67377dffc5e2f7d9b", "REJECTD", "1"),
        (utc(2006, 10, 19, 12, 11), utc(2006, 10, 19, 12, 11)),
    ),
    (
        "id:c449ab9744f47b6af1879e49e75e4f40 sub:001 dlvrd:0 submit date:0610191018 "
        "done date:0610191018 stat:ACCEPTD err:0 text:This is an Acti",
        ("c449ab9744f47b6af1879e49e75e4f40", "ACCEPTD", "0"),
        (utc(2006, 10, 19, 10, 18), utc(2006, 10, 19, 10, 18)),
    ),
    # A receipt from Kannel (somleng tests): 10-digit submit date, 12-digit done date, hex err
    (
        "id:577e505a-dbd7-46ab-a04c-5a927ffb85b1 sub:001 dlvrd:000 submit date:2408201338 "
        "done date:240820093823 stat:REJECTD err:00B text:You",
        ("577e505a-dbd7-46ab-a04c-5a927ffb85b1", "REJECTD", "00B"),
        (utc(2024, 8, 20, 13, 38), utc(2024, 8, 20, 9, 38, 23)),
    ),
    # somleng tests: EXPIRED with mixed date widths
    (
        "id:5516a151-4970-45b6-b73e-95aefdb11cbf sub:001 dlvrd:001 submit date:2302231414 "
        "done date:230223194211 stat:EXPIRED err:000 text:Hello",
        ("5516a151-4970-45b6-b73e-95aefdb11cbf", "EXPIRED", "000"),
        (utc(2023, 2, 23, 14, 14), utc(2023, 2, 23, 19, 42, 11)),
    ),
    # A PHP SMPP client's test: 12-digit dates with seconds
    (
        "id:42 sub:002 dlvrd:002 submit date:160101120015 done date:160101123045 "
        "stat:EXPIRED err:042 text:",
        ("42", "EXPIRED", "042"),
        (utc(2016, 1, 1, 12, 0, 15), utc(2016, 1, 1, 12, 30, 45)),
    ),
    # A Perl gateway's note on Zain (SA): no sub, dlvrd, err or text
    (
        "id:86 submit date:1410160730 done date:1410160730 stat:DELIVRD",
        ("86", "DELIVRD", None),
        (utc(2014, 10, 16, 7, 30), utc(2014, 10, 16, 7, 30)),
    ),
    # A Go SMPP test: ACCEPTD with a padded text
    (
        "id:881444543 sub:001 dlvrd:000 submit date:1512201521 done date:1512201521 "
        "stat:ACCEPTD err:000 text:ACK/OK      ",
        ("881444543", "ACCEPTD", "000"),
        (utc(2015, 12, 20, 15, 21), utc(2015, 12, 20, 15, 21)),
    ),
    # A Java DLR parser test: 12-digit dates as YYYYMMDDhhmm, no sub/dlvrd/text
    (
        "id:6f2929a9-e61a-435f-9c7a-55ccd3f26a7b submit date:201902261755 "
        "done date:201902261756 stat:ACCEPTD err:006",
        ("6f2929a9-e61a-435f-9c7a-55ccd3f26a7b", "ACCEPTD", "006"),
        (utc(2019, 2, 26, 17, 55), utc(2019, 2, 26, 17, 56)),
    ),
    # A vendor simulator (node-smpp): the long word DELIVERED
    (
        "id:7f3a sub:001 dlvrd:001 submit date:2403211200 done date:2403211201 "
        "stat:DELIVERED err:000",
        ("7f3a", "DELIVRD", "000"),
        (utc(2024, 3, 21, 12, 0), utc(2024, 3, 21, 12, 1)),
    ),
    # A Go receipt parser's test: every key capitalised, long status word, hex err
    (
        "ID:0D9A2F Sub:001 Dlvrd:001 Submit Date:2607181200 Done Date:2607181201 "
        "Stat:DELIVERED Err:00A Text:OK",
        ("0D9A2F", "DELIVRD", "00A"),
        (utc(2026, 7, 18, 12, 0), utc(2026, 7, 18, 12, 1)),
    ),
    # An Indian aggregator's log: 12-digit dates, the text cut mid-word
    (
        "id:DA86D4610CE0C0D23B0165A278EC0C43 sub:001 dlvrd:000 submit date:260608095640 "
        "done date:260608155641 stat:EXPIRED err:001 text:Received Rs.648.00 f",
        ("DA86D4610CE0C0D23B0165A278EC0C43", "EXPIRED", "001"),
        (utc(2026, 6, 8, 9, 56, 40), utc(2026, 6, 8, 15, 56, 41)),
    ),
    # A Go SMSC simulator: all-zero dates (no date at all)
    (
        "id:1234567890 sub:001 dlvrd:000 submit date:0000000000 done date:0000000000 "
        "stat:REJECTD err:000 text:",
        ("1234567890", "REJECTD", "000"),
        (None, None),
    ),
    # Another Go parser's exercise: fields in another order, leading zeros in a hex id
    (
        "stat:EXPIRED err:255 id:0000AB12 done date:2607190900",
        ("0000AB12", "EXPIRED", "255"),
        (None, utc(2026, 7, 19, 9, 0)),
    ),
]


@pytest.mark.parametrize(("text", "expected", "dates"), REAL_WORLD)
def test_real_world_receipts(
    text: str, expected: tuple[str, str, str | None], dates: tuple[datetime | None, ...]
) -> None:
    receipt = parse_receipt_text(text)
    assert (receipt.message_id, receipt.status, receipt.error_code) == expected
    assert (receipt.submit_date, receipt.done_date) == dates
    assert parse_receipt_text(text.encode("latin-1")) == receipt


@pytest.mark.parametrize(
    ("text", "says"),
    [
        # A Java gateway's test: no id at all
        (
            "sub:001 dlvrd:001 submit date:2407190905 done date:2407191705 stat:UNDELIV "
            "err:000 text:dlink/veri",
            "no message id",
        ),
        # A cloudhopper-based worker's test: an empty id
        (
            "id: sub:001 dlvrd:000 submit date:2401010000 done date:2401010001 stat:UNDELIV "
            "err:001 text:failed",
            "no message id",
        ),
        ("nothing readable at all", "no message id"),
        ("id:77 sub:001 dlvrd:001 err:000", "no status"),
        # Restcomm's test: an invalid status word
        ("id:77 submit date:invaliddate stat:invalidStat", "unknown receipt status word"),
    ],
)
def test_unreadable_receipts_say_why(text: str, says: str) -> None:
    with pytest.raises(ReceiptError, match=says):
        parse_receipt_text(text)


def test_error_never_echoes_a_number() -> None:
    with pytest.raises(ReceiptError) as info:
        parse_receipt_text("id:9 stat:+447700900123")
    assert "447700900123" not in str(info.value)


def test_final_and_intermediate() -> None:
    assert [s for s in STATUSES if not parse_receipt_text(f"id:1 stat:{s}").final] == [
        "ACCEPTD",
        "ENROUTE",
    ]


def test_text_holding_keys_is_not_misread() -> None:
    r = parse_receipt_text(
        "id:55 sub:001 dlvrd:001 submit date:2401010000 done date:2401010001 stat:DELIVRD "
        "err:000 text:id:99 stat:UNDELIV"
    )
    assert (r.message_id, r.status) == ("55", "DELIVRD")


def test_ucs2_receipt_text() -> None:
    text = "id:abc1 sub:001 dlvrd:001 submit date:2401010000 done date:2401010001 stat:DELIVRD"
    assert parse_receipt_text(text.encode("utf-16-be")).message_id == "abc1"


# --- generated receipts -------------------------------------------------------------------

LONG_FORMS = {
    "DELIVRD": ["DELIVRD", "DELIVERED"],
    "UNDELIV": ["UNDELIV", "UNDELIVERABLE"],
    "EXPIRED": ["EXPIRED"],
    "REJECTD": ["REJECTD", "REJECTED"],
    "DELETED": ["DELETED"],
    "UNKNOWN": ["UNKNOWN"],
    "ACCEPTD": ["ACCEPTD", "ACCEPTED"],
    "ENROUTE": ["ENROUTE"],
}

ids = st.one_of(
    st.integers(0, 2**63).map(str),
    st.integers(0, 2**63).map(lambda n: format(n, "X")),
    st.integers(0, 2**40).map(lambda n: f"{n:012d}"),
    st.uuids().map(str),
    st.text("abcdefABCDEF0123456789-_", min_size=1, max_size=40),
)
dates = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2068, 12, 31), timezones=st.just(UTC)
).map(lambda d: d.replace(microsecond=0))
safe_text = st.text(st.characters(codec="ascii", exclude_characters=":\x00"), max_size=20)


def recase(word: str, style: int) -> str:
    return [word.lower(), word.upper(), word.title(), word][style]


@settings(max_examples=300, deadline=None)
@given(
    ids,
    st.sampled_from(STATUSES),
    st.text("0123456789ABCDEF", min_size=1, max_size=4),
    dates,
    st.integers(0, 3600 * 48),
    st.booleans(),
    st.text(max_size=30),
)
def test_format_parse_round_trip(
    mid: str, status: str, err: str, sub: datetime, delay: int, seconds: bool, text: str
) -> None:
    done = sub + timedelta(seconds=delay)
    formatted = format_receipt_text(
        mid, status, error_code=err, submit_date=sub, done_date=done, text=text, seconds=seconds
    )
    r = parse_receipt_text(formatted)
    trunc = (lambda d: d) if seconds else (lambda d: d.replace(second=0))
    assert r == Receipt(mid, status, err, trunc(sub), trunc(done), 1.0 if seconds else 60.0)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_variants_parse_alike(data: st.DataObject) -> None:
    """Key case, field order, extra and missing fields, date widths, status spellings."""
    mid = data.draw(ids)
    status = data.draw(st.sampled_from(STATUSES))
    word = data.draw(st.sampled_from(LONG_FORMS[status]))
    sub, done = data.draw(dates), data.draw(dates)
    width = data.draw(st.sampled_from([10, 12]))
    fmt = "%y%m%d%H%M%S" if width == 12 else "%y%m%d%H%M"
    style = data.draw(st.integers(0, 3))
    sep = data.draw(st.sampled_from([" ", "  ", " \t"]))
    date_key = data.draw(st.sampled_from(["{} date", "{}_date", "{}date"]))
    fields = {
        "id": mid,
        "sub": "001",
        "dlvrd": "001" if status == "DELIVRD" else "000",
        date_key.format("submit"): sub.strftime(fmt),
        date_key.format("done"): done.strftime(fmt),
        "stat": recase(word, data.draw(st.integers(0, 3))),
        "err": data.draw(st.sampled_from(["000", "0", "001", "00A", "255"])),
    }
    dropped = data.draw(st.sets(st.sampled_from(["sub", "dlvrd", "err"])))
    extra = data.draw(st.dictionaries(st.sampled_from(["imsi", "mcc", "mnc", "smsc"]), ids))
    items = [(k, v) for k, v in fields.items() if k not in dropped] + list(extra.items())
    items = data.draw(st.permutations(items))
    text = data.draw(safe_text)
    body = sep.join(f"{recase(k, style)}:{v}" for k, v in items)
    body += f"{sep}{recase('text', style)}:{text}"

    r = parse_receipt_text(body)
    trunc = (lambda d: d) if width == 12 else (lambda d: d.replace(second=0))
    assert (r.message_id, r.status) == (mid, status)
    assert r.error_code == (None if "err" in dropped else fields["err"])
    assert (r.submit_date, r.done_date) == (trunc(sub), trunc(done))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**64), st.integers(0, 6), st.booleans())
def test_hex_and_decimal_ids_match(n: int, zeros: int, lower: bool) -> None:
    """The id in hex on one side and in decimal (maybe zero-padded) on the other share a key."""
    hexa = format(n, "x" if lower else "X")
    dec = "0" * zeros + str(n)
    for a, b in [(hexa, dec), (dec, hexa), ("0" * zeros + hexa, str(n)), (dec, str(n))]:
        assert set(message_id_keys(a)) & set(message_id_keys(b))
        assert message_id_keys(a)[0] == a


@given(ids)
def test_keys_are_stable_under_case_and_padding(mid: str) -> None:
    assert set(message_id_keys(mid.upper())) & set(message_id_keys(f" {mid.lower()}\x00"))


def test_keys_prefer_the_id_as_is() -> None:
    assert message_id_keys("00AB12") == ("00AB12", "00ab12", "ab12", "43794")
    assert message_id_keys("0001715004")[:3] == ("0001715004", "1715004", "1a2b3c")


# --- receipts on real PDUs ----------------------------------------------------------------


def wire(command: str, **fields: object) -> object:
    """A PDU built, encoded to bytes and decoded again by smpplib, as a client receives it."""
    seq = SimpleSequenceGenerator()
    raw = smpp.make_pdu(command, client=seq, **fields).generate()
    return smpp.parse_pdu(raw, client=seq, allow_unknown_opt_params=True)


TEXT = (
    b"id:0A1B2C sub:001 dlvrd:001 submit date:260610120000 done date:260610120031 "
    b"stat:DELIVRD err:000 text:"
)


def test_receipt_from_deliver_sm_text() -> None:
    r = receipt_from_pdu(wire("deliver_sm", esm_class=0x04, short_message=TEXT))
    assert r == Receipt(
        "0A1B2C", "DELIVRD", "000", utc(2026, 6, 10, 12, 0, 0), utc(2026, 6, 10, 12, 0, 31)
    )


def test_tlvs_win_over_text() -> None:
    pdu = wire(
        "deliver_sm",
        esm_class=0x04,
        short_message=TEXT,
        receipted_message_id="659260",
        message_state=5,
        network_error_code=b"\x03\x00\x22",
    )
    r = receipt_from_pdu(pdu)
    assert r is not None
    assert (r.message_id, r.status, r.error_code) == ("659260", "UNDELIV", "034")
    assert r.done_date == utc(2026, 6, 10, 12, 0, 31)


@pytest.mark.parametrize("state", sorted(MESSAGE_STATES))
def test_tlv_only_data_sm(state: int) -> None:
    pdu = wire("data_sm", esm_class=0x04, receipted_message_id="ff01", message_state=state)
    r = receipt_from_pdu(pdu)
    assert r is not None
    assert (r.message_id, r.status, r.done_date) == ("ff01", MESSAGE_STATES[state], None)


def test_receipt_in_message_payload_and_ucs2() -> None:
    pdu = wire("data_sm", esm_class=0x04, message_payload=TEXT)
    assert receipt_from_pdu(pdu).message_id == "0A1B2C"  # type: ignore[union-attr]
    ucs2 = wire(
        "deliver_sm",
        esm_class=0x04,
        data_coding=8,
        short_message=TEXT.decode().encode("utf-16-be")[:254],
    )
    assert receipt_from_pdu(ucs2).status == "DELIVRD"  # type: ignore[union-attr]


def test_mobile_originated_message_is_not_a_receipt() -> None:
    assert receipt_from_pdu(wire("deliver_sm", esm_class=0, short_message=b"STOP")) is None


def test_receipt_text_without_receipt_bits_is_still_read() -> None:
    r = receipt_from_pdu(wire("deliver_sm", esm_class=0, short_message=TEXT))
    assert r is not None and r.message_id == "0A1B2C"


def test_flagged_receipt_without_status_is_an_error() -> None:
    with pytest.raises(ReceiptError, match="no status"):
        receipt_from_pdu(wire("deliver_sm", esm_class=0x04, short_message=b"id:12 err:000"))
