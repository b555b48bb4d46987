"""Destination context from a phone number: E.164 parsing, country, operator, time zone."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import phonenumbers
from phonenumbers import PhoneNumberType, carrier, timezone

UNKNOWN_OPERATOR = "unknown"
_MOBILE_TYPES = {PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE}


class InvalidNumber(ValueError):
    """The destination is not a valid E.164 mobile number; the message never echoes the number."""


class UnknownMccMnc(ValueError):
    """An `mccmnc` given by the caller is malformed or not in the operator directory."""


@dataclass(frozen=True, slots=True)
class OperatorEntry:
    """A mobile network operator of one country, with its MCC-MNC codes and carrier-name aliases."""

    id: str
    country: str
    name: str
    mccmnc: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class OperatorDirectory:
    """Looks operators up by MCC-MNC or by phonenumbers' carrier name, and a country's time zone."""

    operators: tuple[OperatorEntry, ...] = ()
    timezones: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        by_mccmnc: dict[str, OperatorEntry] = {}
        by_alias: dict[tuple[str, str], str] = {}
        mcc_country: dict[str, str] = {}
        for op in self.operators:
            for code in op.mccmnc:
                by_mccmnc[code] = op
                mcc_country[code[:3]] = op.country
            for alias in (op.name, *op.aliases):
                by_alias[(op.country, alias.casefold())] = op.id
        object.__setattr__(self, "_by_mccmnc", by_mccmnc)
        object.__setattr__(self, "_by_alias", by_alias)
        object.__setattr__(self, "_mcc_country", mcc_country)

    def country_of_mcc(self, mccmnc: str) -> str | None:
        """The country whose operators use this MCC (first three digits), if known."""
        return self._mcc_country.get(mccmnc[:3])  # type: ignore[attr-defined]

    def by_mccmnc(self, mccmnc: str) -> OperatorEntry | None:
        """The operator owning an MCC-MNC code, if known."""
        return self._by_mccmnc.get(mccmnc)  # type: ignore[attr-defined]

    def by_carrier_name(self, country: str, name: str) -> str:
        """Operator id for phonenumbers' carrier name in a country, or `unknown`."""
        if not name:
            return UNKNOWN_OPERATOR
        return self._by_alias.get((country, name.casefold()), UNKNOWN_OPERATOR)  # type: ignore[attr-defined]

    def operators_of(self, country: str) -> Iterable[OperatorEntry]:
        """The known operators of a country."""
        return (op for op in self.operators if op.country == country)


@dataclass(frozen=True, slots=True)
class Destination:
    """What routing needs to know about a number; the number itself is kept only as E.164."""

    e164: str
    country: str
    country_code: int
    operator: str
    mccmnc: str | None
    is_mobile: bool
    timezone: str


def _check_mccmnc(mccmnc: str) -> None:
    if not (mccmnc.isdigit() and len(mccmnc) in (5, 6)):
        raise UnknownMccMnc("mccmnc must be 5 or 6 digits (3-digit MCC then 2- or 3-digit MNC)")


class DestinationParser:
    """Parses destinations with phonenumbers, with an LRU cache (OTP retries repeat numbers)."""

    def __init__(self, directory: OperatorDirectory, cache_size: int = 100_000) -> None:
        self.directory = directory
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Destination] = OrderedDict()

    def parse(self, to: str, mccmnc: str | None = None) -> Destination:
        """Parse `to` (E.164 with '+') and resolve its operator; `mccmnc` overrides the prefix."""
        dest = self._cache.get(to)
        if dest is None:
            dest = self._parse_uncached(to)
            self._cache[to] = dest
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if mccmnc:
            dest = self._with_mccmnc(dest, mccmnc)
        return dest

    def _with_mccmnc(self, dest: Destination, mccmnc: str) -> Destination:
        _check_mccmnc(mccmnc)
        op = self.directory.by_mccmnc(mccmnc)
        mcc_country = self.directory.country_of_mcc(mccmnc)
        if op is None and mcc_country is not None and mcc_country != dest.country:
            raise UnknownMccMnc(
                f"mccmnc {mccmnc} has the MCC of {mcc_country}, but the number is in {dest.country}"
            )
        if op is None:
            return Destination(
                dest.e164,
                dest.country,
                dest.country_code,
                UNKNOWN_OPERATOR,
                mccmnc,
                dest.is_mobile,
                dest.timezone,
            )
        if op.country != dest.country:
            raise UnknownMccMnc(
                f"mccmnc {mccmnc} belongs to an operator in {op.country}, "
                f"but the number is in {dest.country}"
            )
        return Destination(
            dest.e164, dest.country, dest.country_code, op.id, mccmnc, dest.is_mobile, dest.timezone
        )

    def _parse_uncached(self, to: str) -> Destination:
        if not isinstance(to, str) or not to:
            raise InvalidNumber("number is empty")
        if not to.startswith("+"):
            raise InvalidNumber("number must be in E.164 form with a leading '+' and country code")
        digits = to[1:]
        if not (digits.isascii() and digits.isdigit()):
            raise InvalidNumber("number must contain only digits after the leading '+'")
        if not 8 <= len(digits) <= 15:
            raise InvalidNumber(f"number must have 8 to 15 digits, it has {len(digits)}")
        try:
            num = phonenumbers.parse(to, None)
        except phonenumbers.NumberParseException as exc:
            if exc.error_type == phonenumbers.NumberParseException.INVALID_COUNTRY_CODE:
                raise InvalidNumber("the country code after '+' is not a known one") from None
            raise InvalidNumber(f"number cannot be parsed: {exc._msg}") from None
        region = phonenumbers.region_code_for_number(num)
        if region is None or region == "001":
            regions = phonenumbers.region_codes_for_country_code(num.country_code)
            if regions and regions[0] not in ("ZZ", "001"):
                raise InvalidNumber(
                    f"number is not a valid number for country code "
                    f"+{num.country_code} ({'/'.join(regions)})"
                )
            raise InvalidNumber(f"country code +{num.country_code} is not a known country")
        kind = phonenumbers.number_type(num)  # UNKNOWN iff invalid (is_valid_number's own test)
        if kind == PhoneNumberType.UNKNOWN:
            raise InvalidNumber(f"number is not a valid number in {region}")
        e164 = phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)
        if len(e164) - 1 < 8:  # a trunk '0' after the country code ("+43 0 12000") was dropped
            raise InvalidNumber(
                f"number must have 8 to 15 digits, it has {len(e164) - 1} without its trunk prefix"
            )
        is_mobile = kind in _MOBILE_TYPES
        operator = self.directory.by_carrier_name(region, carrier.name_for_number(num, "en"))
        return Destination(
            e164=e164,
            country=region,
            country_code=num.country_code,
            operator=operator,
            mccmnc=None,
            is_mobile=is_mobile,
            timezone=self._timezone(region, num),
        )

    def _timezone(self, region: str, num: phonenumbers.PhoneNumber) -> str:
        configured = self.directory.timezones.get(region)
        zones = [z for z in timezone.time_zones_for_number(num) if z != "Etc/Unknown"]
        if len(zones) == 1:
            return zones[0]
        if configured:
            return configured
        return zones[0] if zones else "UTC"
