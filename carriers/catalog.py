"""The carrier catalog: carriers, coverage and prices, countries' operators, tenants' permissions.

Loaded from a versioned YAML file and validated on load; every error names the file, the entry
and the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import phonenumbers
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from features.numbering import OperatorDirectory, OperatorEntry

EXAMPLE_CATALOG = Path(__file__).parent / "catalogs" / "example.yaml"
SENDER_TYPES = ("alphanumeric", "numeric", "shortcode")
_REGIONS = frozenset(phonenumbers.SUPPORTED_REGIONS)


class CatalogError(ValueError):
    """The catalog file is missing, malformed or inconsistent."""


# ---- file schema (pydantic: validation with field paths) ----------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _OperatorSpec(_Strict):
    id: str = Field(min_length=1, pattern=r"^[a-z0-9_\-]+$")
    name: str = Field(min_length=1)
    mccmnc: list[str] = Field(default_factory=list)
    aliases: list[str] = Field(default_factory=list)

    @field_validator("mccmnc")
    @classmethod
    def _codes(cls, codes: list[str]) -> list[str]:
        for code in codes:
            if not (code.isdigit() and len(code) in (5, 6)):
                raise ValueError(f"mccmnc {code!r} must be 5 or 6 digits")
        return codes


class _CountrySpec(_Strict):
    timezone: str | None = None
    operators: list[_OperatorSpec] = Field(default_factory=list)


class _CoverageSpec(_Strict):
    price: float = Field(ge=0)
    operators: dict[str, float] = Field(default_factory=dict)
    exclude_operators: list[str] = Field(default_factory=list)

    @field_validator("operators")
    @classmethod
    def _prices(cls, prices: dict[str, float]) -> dict[str, float]:
        for op, price in prices.items():
            if price < 0:
                raise ValueError(f"price for operator {op!r} must be >= 0")
        return prices


class _CarrierSpec(_Strict):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_\-]+$")
    name: str = ""
    connection: dict[str, Any] = Field(default_factory=dict)
    billing: Literal["submit", "delivery"] = "submit"
    sender_types: list[Literal["alphanumeric", "numeric", "shortcode"]] = Field(
        default_factory=lambda: list(SENDER_TYPES)
    )
    throughput_mps: float | None = Field(default=None, gt=0)
    priority: int = 100
    coverage: dict[str, _CoverageSpec] = Field(min_length=1)


class _TenantSpec(_Strict):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_\-\.]+$")
    countries: list[str] | Literal["*"] = "*"
    carriers: list[str] | Literal["*"] = "*"
    reports_conversions: bool = False


class _CatalogSpec(_Strict):
    version: str = Field(min_length=1)
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    countries: dict[str, _CountrySpec] = Field(default_factory=dict)
    carriers: list[_CarrierSpec] = Field(min_length=1)
    tenants: list[_TenantSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> _CatalogSpec:
        _check_consistency(self)
        return self


def _check_consistency(spec: _CatalogSpec) -> None:
    for code in spec.countries:
        if code not in _REGIONS:
            raise ValueError(
                f"countries.{code}: not an ISO 3166 country code known to phonenumbers"
            )
    known_ops = {c: {op.id for op in cs.operators} for c, cs in spec.countries.items()}
    seen: set[str] = set()
    for i, car in enumerate(spec.carriers):
        where = f"carriers[{i}] (id={car.id})"
        if car.id in seen:
            raise ValueError(f"{where}.id: duplicate carrier id")
        seen.add(car.id)
        for country, cov in car.coverage.items():
            if country not in _REGIONS:
                raise ValueError(f"{where}.coverage.{country}: unknown country code")
            for op in (*cov.operators, *cov.exclude_operators):
                if op not in known_ops.get(country, set()):
                    raise ValueError(
                        f"{where}.coverage.{country}: operator {op!r} is not listed under "
                        f"countries.{country}.operators"
                    )
    tenant_ids: set[str] = set()
    for i, ten in enumerate(spec.tenants):
        where = f"tenants[{i}] (id={ten.id})"
        if ten.id in tenant_ids:
            raise ValueError(f"{where}.id: duplicate tenant id")
        tenant_ids.add(ten.id)
        if ten.carriers != "*":
            for cid in ten.carriers:
                if cid not in seen:
                    raise ValueError(f"{where}.carriers: unknown carrier {cid!r}")
        if ten.countries != "*":
            for country in ten.countries:
                if country not in _REGIONS:
                    raise ValueError(f"{where}.countries: unknown country code {country!r}")


# ---- the loaded catalog (plain frozen dataclasses) ----------------------------------------


@dataclass(frozen=True, slots=True)
class Coverage:
    """A carrier's reach and price in one country, with per-operator prices and exclusions."""

    country: str
    price: float
    operator_prices: Mapping[str, float]
    excluded_operators: frozenset[str]

    def covers(self, operator: str) -> bool:
        """Whether the carrier reaches this operator in the country."""
        return operator not in self.excluded_operators

    def price_for(self, operator: str) -> float:
        """Price per message part for the operator (the country price unless overridden)."""
        return self.operator_prices.get(operator, self.price)


@dataclass(frozen=True, slots=True)
class Carrier:
    """One carrier connection and its commercial terms."""

    id: str
    name: str
    connection: Mapping[str, Any]
    billing: str
    sender_types: frozenset[str]
    throughput_mps: float | None
    priority: int
    coverage: Mapping[str, Coverage]

    @property
    def bills_on_delivery(self) -> bool:
        """Whether the carrier charges on a DELIVRD receipt rather than on an accepted submit."""
        return self.billing == "delivery"


@dataclass(frozen=True, slots=True)
class Tenant:
    """A business client: where it may send, through which carriers, whether it reports OTP use."""

    id: str
    countries: frozenset[str] | None
    carriers: frozenset[str] | None
    reports_conversions: bool

    def may_send_to(self, country: str) -> bool:
        """Whether the tenant is permitted to send to `country`."""
        return self.countries is None or country in self.countries

    def may_use(self, carrier_id: str) -> bool:
        """Whether the tenant is permitted to use `carrier_id`."""
        return self.carriers is None or carrier_id in self.carriers


DEFAULT_TENANT = Tenant("default", None, None, False)


@dataclass(frozen=True)
class Catalog:
    """The validated catalog; carriers keep the file's order."""

    version: str
    currency: str
    carriers: Mapping[str, Carrier]
    tenants: Mapping[str, Tenant]
    directory: OperatorDirectory
    source: str

    def tenant(self, tenant_id: str | None) -> Tenant | None:
        """The tenant by id; with no tenants configured, every id gets full permissions."""
        if not self.tenants:
            return Tenant(tenant_id or "default", None, None, False)
        return self.tenants.get(tenant_id or "default")

    def conversion_tenants(self) -> frozenset[str]:
        """Ids of tenants that report OTP conversions."""
        return frozenset(t.id for t in self.tenants.values() if t.reports_conversions)

    def countries(self) -> list[str]:
        """Every country some carrier covers, sorted."""
        return sorted({c for car in self.carriers.values() for c in car.coverage})


def _format_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _build(spec: _CatalogSpec, source: str) -> Catalog:
    operators = tuple(
        OperatorEntry(op.id, country, op.name, tuple(op.mccmnc), tuple(op.aliases))
        for country, cs in spec.countries.items()
        for op in cs.operators
    )
    timezones = {c: cs.timezone for c, cs in spec.countries.items() if cs.timezone}
    carriers = {
        c.id: Carrier(
            id=c.id,
            name=c.name or c.id,
            connection=dict(c.connection),
            billing=c.billing,
            sender_types=frozenset(c.sender_types),
            throughput_mps=c.throughput_mps,
            priority=c.priority,
            coverage={
                country: Coverage(
                    country, cov.price, dict(cov.operators), frozenset(cov.exclude_operators)
                )
                for country, cov in c.coverage.items()
            },
        )
        for c in spec.carriers
    }
    tenants = {
        t.id: Tenant(
            id=t.id,
            countries=None if t.countries == "*" else frozenset(t.countries),
            carriers=None if t.carriers == "*" else frozenset(t.carriers),
            reports_conversions=t.reports_conversions,
        )
        for t in spec.tenants
    }
    return Catalog(
        spec.version,
        spec.currency,
        carriers,
        tenants,
        OperatorDirectory(operators, timezones),
        source,
    )


def parse_catalog(raw: Any, source: str = "<catalog>") -> Catalog:
    """Validate an already-parsed catalog document."""
    if not isinstance(raw, dict):
        raise CatalogError(f"{source}: the catalog must be a mapping at the top level")
    try:
        spec = _CatalogSpec.model_validate(raw)
    except ValidationError as exc:
        raise CatalogError(f"{source}: {_format_validation(exc)}") from None
    return _build(spec, source)


def load_catalog(path: str | Path = EXAMPLE_CATALOG) -> Catalog:
    """Load and validate a catalog file (YAML)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read the catalog: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from None
    return parse_catalog(raw, str(path))
