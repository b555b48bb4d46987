"""Tests for features/: E.164 parsing, operator resolution, local time and number privacy."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carriers.catalog import load_catalog
from features import (
    UNKNOWN_OPERATOR,
    Destination,
    DestinationParser,
    InvalidNumber,
    OperatorDirectory,
    UnknownMccMnc,
    ensure_utc,
    from_epoch,
    local_hour_weekday,
    msisdn_hmac,
    time_band,
    to_epoch,
)

DIRECTORY: OperatorDirectory = load_catalog().directory


def _parser() -> DestinationParser:
    """A fresh parser over the example catalog's operator directory (empty cache)."""
    return DestinationParser(DIRECTORY)


def _epoch(iso: str) -> float:
    """Epoch seconds of an ISO-8601 instant."""
    return to_epoch(datetime.fromisoformat(iso))


# ---- valid numbers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "country", "code", "operator", "tz"),
    [
        ("+79031234567", "RU", 7, "beeline", "Europe/Moscow"),
        ("+4915112345678", "DE", 49, "telekom", "Europe/Berlin"),
        ("+2348031234567", "NG", 234, "mtn", "Africa/Lagos"),
        ("+447400123456", "GB", 44, "three", "Europe/London"),
        ("+919812345678", "IN", 91, "vi", "Asia/Calcutta"),
        ("+6281234567890", "ID", 62, "telkomsel", "Asia/Jakarta"),
        ("+905321234567", "TR", 90, "turkcell", "Europe/Istanbul"),
        ("+254712345678", "KE", 254, "safaricom", "Africa/Nairobi"),
        ("+5511912345678", "BR", 55, UNKNOWN_OPERATOR, "America/Sao_Paulo"),
        ("+12015550123", "US", 1, UNKNOWN_OPERATOR, "America/New_York"),
    ],
)
def test_valid_numbers_resolve(
    number: str, country: str, code: int, operator: str, tz: str
) -> None:
    dest = _parser().parse(number)
    assert dest == Destination(
        e164=number,
        country=country,
        country_code=code,
        operator=operator,
        mccmnc=None,
        is_mobile=True,
        timezone=tz,
    )


def test_single_zone_number_wins_over_the_configured_country_zone() -> None:
    # The catalog sets America/New_York for US, but +1 415 has exactly one zone.
    assert _parser().parse("+14155552671").timezone == "America/Los_Angeles"
    # +7 spans eleven zones, so the configured Europe/Moscow is used.
    assert _parser().parse("+79161234567").timezone == "Europe/Moscow"


def test_fixed_line_number_parses_but_is_not_mobile() -> None:
    dest = _parser().parse("+4930123456")
    assert (dest.country, dest.is_mobile, dest.operator) == ("DE", False, UNKNOWN_OPERATOR)


# ---- mccmnc -------------------------------------------------------------------------------


def test_mccmnc_overrides_the_prefix_operator() -> None:
    parser = _parser()
    assert parser.parse("+79161234567").operator == UNKNOWN_OPERATOR
    dest = parser.parse("+79161234567", "25001")
    assert (dest.operator, dest.mccmnc, dest.country) == ("mts", "25001", "RU")
    # beeline by prefix, but the HLR says the number was ported to MegaFon.
    assert parser.parse("+79031234567", "25002").operator == "megafon"
    # Six-digit MNC (India).
    assert parser.parse("+919812345678", "405840").operator == "jio"


def test_mccmnc_does_not_leak_into_the_cache() -> None:
    parser = _parser()
    assert parser.parse("+79031234567", "25001").operator == "mts"
    again = parser.parse("+79031234567")
    assert (again.operator, again.mccmnc) == ("beeline", None)


def test_unlisted_mccmnc_gives_unknown_operator() -> None:
    dest = _parser().parse("+79161234567", "25011")
    assert (dest.operator, dest.mccmnc) == (UNKNOWN_OPERATOR, "25011")


def test_mccmnc_of_another_country_is_an_error() -> None:
    with pytest.raises(UnknownMccMnc) as err:
        _parser().parse("+79161234567", "26201")
    msg = str(err.value)
    assert "26201" in msg and "DE" in msg and "RU" in msg
    assert "9161234567" not in msg


@pytest.mark.parametrize("mccmnc", ["2500", "abcde", "1234567", "250 1", "25O01", "-2500"])
def test_malformed_mccmnc_is_an_error(mccmnc: str) -> None:
    with pytest.raises(UnknownMccMnc, match="5 or 6 digits"):
        _parser().parse("+79161234567", mccmnc)


# ---- invalid numbers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "fragment"),
    [
        ("", "empty"),
        ("79031234567", "leading '+'"),
        ("+7903abc4567", "only digits"),
        ("+7 903 123 45 67", "only digits"),
        ("+79031", "8 to 15 digits, it has 5"),
        ("+1234567", "8 to 15 digits, it has 7"),
        ("+43012000", "8 to 15 digits, it has 7 without its trunk prefix"),  # E.164: +4312000
        ("+1234567890123456", "8 to 15 digits, it has 16"),
        ("+9991234567890", "country code"),
        ("+80012345678", "+800 is not a known country"),
        ("+4900000000", "not a valid number in DE"),
        ("+2340000000000", "not a valid number in NG"),
        ("+79991234567999", "not a valid number in RU"),
    ],
)
def test_invalid_numbers(number: str, fragment: str) -> None:
    with pytest.raises(InvalidNumber) as err:
        _parser().parse(number)
    msg = str(err.value)
    assert fragment in msg
    digits = number.lstrip("+")
    if digits:
        assert digits not in msg, f"error message echoes the number: {msg!r}"
    assert not re.search(r"\d{5,}", msg), f"error message holds a long digit run: {msg!r}"


def test_invalid_number_under_shared_country_code_names_the_real_problem() -> None:
    with pytest.raises(InvalidNumber) as err:
        _parser().parse("+71234567890")
    assert "not a known country" not in str(err.value)


# ---- time ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("iso", "tz", "hour", "weekday"),
    [
        ("2026-11-02T07:00:00+00:00", "Europe/Moscow", 10, 0),
        ("2026-11-02T07:00:00+00:00", "Europe/London", 7, 0),
        ("2026-07-01T07:00:00+00:00", "Europe/London", 8, 2),  # BST
        ("2026-11-02T07:00:00+00:00", "America/Sao_Paulo", 4, 0),
        ("2026-11-02T07:00:00+00:00", "Asia/Calcutta", 12, 0),  # +05:30
        ("2026-11-01T22:30:00+00:00", "Europe/Moscow", 1, 0),  # Sunday UTC, Monday in Moscow
        ("2026-11-02T03:00:00+00:00", "America/New_York", 22, 6),  # still Sunday in New York
    ],
)
def test_local_hour_weekday(iso: str, tz: str, hour: int, weekday: int) -> None:
    assert local_hour_weekday(_epoch(iso), tz) == (hour, weekday)


def test_clock_helpers() -> None:
    naive = datetime(2026, 11, 2, 7, 0)
    aware = ensure_utc(naive)
    assert aware.tzinfo is UTC and aware.hour == 7
    plus3 = datetime(2026, 11, 2, 10, 0, tzinfo=timezone(timedelta(hours=3)))
    assert to_epoch(plus3) == to_epoch(aware) == 1_793_602_800.0
    assert from_epoch(1_793_602_800.0) == datetime(2026, 11, 2, 7, 0, tzinfo=UTC)
    assert [time_band(h, 6) for h in (0, 5, 6, 11, 12, 23)] == [0, 0, 1, 1, 2, 3]


# ---- privacy ------------------------------------------------------------------------------


def test_msisdn_hmac() -> None:
    number = "+79161234567"
    a1 = msisdn_hmac(number, b"key-one")
    assert a1 == msisdn_hmac(number, b"key-one")
    assert re.fullmatch(r"[0-9a-f]{32}", a1)
    assert a1 != msisdn_hmac(number, b"key-two")
    assert a1 != msisdn_hmac("+79161234568", b"key-one")
    assert "9161234567" not in a1 and "79161234567" not in a1
    # The known HMAC-SHA256 test vector prefix (pins the algorithm and the truncation).
    assert (
        msisdn_hmac("what do ya want for nothing?", b"Jefe") == "5bdcc146bf60754e6a042426089575c7"
    )


# ---- property: parse never fails in another way -------------------------------------------

_CODES = ["", "", "1", "7", "44", "49", "55", "62", "90", "91", "234", "254", "39", "33"]
_NUMBERS = st.tuples(st.sampled_from(_CODES), st.text("0123456789", max_size=16)).map(
    lambda t: "+" + t[0] + t[1]
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_NUMBERS)
def test_parse_returns_round_tripping_destination_or_invalid_number(number: str) -> None:
    try:
        dest = _parser().parse(number)
    except InvalidNumber as exc:
        digits = number[1:]
        if len(digits) >= 6:
            assert digits not in str(exc)
        return
    assert re.fullmatch(r"\+[1-9]\d{6,14}", dest.e164)
    assert dest.e164.startswith(f"+{dest.country_code}")
    again = _parser().parse(dest.e164)
    assert again == dest
    assert again.e164 == dest.e164
