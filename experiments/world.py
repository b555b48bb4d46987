"""A simulated world of carriers in event time: true delivery, latency, receipts and conversions.

A scenario file says how each carrier really behaves per country (and what scripted events
change that); `World` turns one sent message into the outcome events a real carrier and a real
user would produce, with the times they would arrive. Deterministic given the seed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import phonenumbers
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from carriers.catalog import Carrier, Catalog, Coverage
from features import to_epoch

SCENARIOS = Path(__file__).parent / "scenarios"
REJECT_AFTER_S = 0.05  # a rejected submit is answered at once
# A lost message's receipt (when it has one): UNDELIV within seconds, else EXPIRED after hours.
UNDELIV_SHARE = 0.75
UNDELIV_DELAY_S = (5.0, 30.0)
# Draws every send takes, used or not, so all carriers share them (see World.send).
_UNIFORMS, _NORMALS = 8, 2


class ScenarioError(ValueError):
    """A scenario file is malformed; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RouteSpec(_Strict):
    """True behaviour of a carrier's route into a country."""

    deliver: float = Field(0.9, ge=0, le=1, description="P(message reaches the handset)")
    latency_median_s: float = Field(6.0, gt=0)
    latency_sigma: float = Field(0.6, ge=0)
    no_dlr: float = Field(0.02, ge=0, le=1, description="P(no receipt at all)")
    fake_dlr: float = Field(0.0, ge=0, le=1, description="P(DELIVRD receipt for a lost message)")
    submit_reject: float = Field(0.0, ge=0, le=1)
    night_drop: float = Field(0.0, ge=0, le=1, description="delivery lost at local night (0-6h)")
    undeliv_share: float = Field(
        UNDELIV_SHARE, ge=0, le=1, description="P(UNDELIV, not EXPIRED | a lost message's receipt)"
    )


OUTAGES = ("outage", "loud_outage", "silent_outage")
# A silent outage: the carrier accepts (and bills) every submit, delivers a few, sends no receipt
# for most of the rest and EXPIRED hours later for the others, so no sender retries.
SILENT_DELIVER, SILENT_NO_DLR = 0.03, 0.8


class EventSpec(_Strict):
    """A scripted change on one route: an outage, a degradation, a price change, or a new
    carrier (unavailable, i.e. paused in the engine, until `at_minute`).

    `outage`: nothing delivered, mostly no receipts; `loud_outage`: nothing delivered, every
    loss answered by a quick UNDELIV (senders retry); `silent_outage`: see SILENT_DELIVER. A
    price change is told to the engine (a new catalog) unless `announced` is false."""

    at_minute: float = Field(ge=0)
    carrier: str
    country: str | Literal["*"] = "*"
    kind: Literal["outage", "loud_outage", "silent_outage", "degrade", "price", "new_carrier"]
    minutes: float = Field(float("inf"), gt=0)
    deliver: float | None = Field(None, ge=0, le=1, description="delivery during a degrade")
    price: float | None = Field(None, ge=0, description="price per part during a price change")
    announced: bool = Field(True, description="a price change reaches the engine's catalog")

    @model_validator(mode="after")
    def _fields_of_kind(self) -> EventSpec:
        needs = {"degrade": "deliver", "price": "price"}.get(self.kind)
        if needs is not None and getattr(self, needs) is None:
            raise ValueError(f"a {self.kind} event needs {needs!r}")
        if self.kind == "new_carrier" and (self.country != "*" or self.minutes != float("inf")):
            raise ValueError("a new_carrier event takes neither country nor minutes")
        return self

    def active(self, minute: float) -> bool:
        """Whether the event is in force `minute` minutes into the scenario."""
        return self.at_minute <= minute < self.at_minute + self.minutes


class TrafficSpec(_Strict):
    """The message stream: rate with a diurnal shape, and the mix."""

    rate_per_second: float = Field(gt=0)
    diurnal_amplitude: float = Field(0.3, ge=0, lt=1)
    countries: dict[str, float]
    tenants: dict[str, float] = Field(default_factory=lambda: {"default": 1.0})
    classes: dict[str, float] = Field(default_factory=lambda: {"otp": 1.0})
    retry: bool = True
    # The senders report each bill (`cost` on the event the carrier bills on), as a billing
    # integration would; off, the engine prices from the catalog alone (an SMPP worker today).
    report_cost: bool = False


class ScenarioSpec(_Strict):
    """A whole scenario file."""

    name: str
    description: str = ""
    seed: int = 0
    start: datetime
    duration_minutes: float = Field(gt=0)
    conversion_rate: float = Field(0.85, ge=0, le=1)
    conversion_delay_median_s: float = Field(15.0, gt=0)
    traffic: TrafficSpec
    defaults: RouteSpec = Field(default_factory=RouteSpec)
    routes: dict[str, dict[str, RouteSpec]] = Field(default_factory=dict)
    events: list[EventSpec] = Field(default_factory=list)


def load_scenario(path: str | Path, catalog: Catalog | None = None) -> ScenarioSpec:
    """Load and validate a scenario (a path, or the name of a shipped scenario).

    With a catalog, carriers and countries are also checked against it.
    """
    path = Path(path)
    if not path.exists() and (SCENARIOS / f"{path}.yaml").exists():
        path = SCENARIOS / f"{path}.yaml"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML: {exc}") from None
    try:
        spec = ScenarioSpec.model_validate(raw)
    except ValidationError as exc:
        msgs = [
            f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors(include_input=False, include_url=False)
        ]
        raise ScenarioError(f"{path}: " + "; ".join(msgs)) from None
    problems = catalog_problems(spec, catalog) if catalog is not None else []
    if problems:
        raise ScenarioError(f"{path}: " + "; ".join(problems))
    return spec


def catalog_problems(spec: ScenarioSpec, catalog: Catalog) -> list[str]:
    """What in the scenario the catalog does not know, each naming the field."""
    known = set(catalog.carriers)
    problems = [f"routes.{c}: unknown carrier {c!r}" for c in spec.routes if c not in known]
    problems += [
        f"events.{i}.carrier: unknown carrier {e.carrier!r}"
        for i, e in enumerate(spec.events)
        if e.carrier not in known
    ]
    covered = set(catalog.countries())
    problems += [
        f"traffic.countries.{c}: no carrier covers {c}"
        for c in spec.traffic.countries
        if c not in covered
    ]
    return problems


@dataclass(frozen=True, slots=True)
class Message:
    """One message to send: who, where, when (event time)."""

    at: float
    to: str
    country: str
    mccmnc: str
    tenant: str
    message_class: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """An outcome event the world will produce at event time `at`."""

    at: float
    event: str
    status: str | None = None


@dataclass(frozen=True, slots=True)
class Truth:
    """Ground truth of one sent message (for true success rates and regret)."""

    delivered: bool
    latency_s: float | None
    converted: bool


@dataclass
class World:
    """Carriers' true behaviour over time, for one scenario and one catalog."""

    spec: ScenarioSpec
    catalog: Catalog
    numbers: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.start = to_epoch(self.spec.start)
        self.end = self.start + self.spec.duration_minutes * 60
        self._check()
        rng = np.random.default_rng(self.spec.seed)
        for country in self.spec.traffic.countries:
            if country not in self.numbers:  # a generated world brings its own pools
                self.numbers[country] = _number_pool(country, self.catalog, rng)
        # Routes given per operator ("CC/operator" keys), e.g. by experiments.worldgen.
        self._by_operator = any("/" in c for by in self.spec.routes.values() for c in by)

    def _check(self) -> None:
        problems = catalog_problems(self.spec, self.catalog)
        if problems:
            raise ScenarioError(f"scenario {self.spec.name}: " + "; ".join(problems))

    def minute(self, at: float) -> float:
        """Minutes from the scenario's start to event time `at`."""
        return (at - self.start) / 60

    def _events(
        self, carrier: str, country: str, at: float, kinds: tuple[str, ...]
    ) -> Iterator[EventSpec]:
        minute = self.minute(at)
        for ev in self.spec.events:
            if (
                ev.kind in kinds
                and ev.carrier == carrier
                and ev.country in ("*", country)
                and ev.active(minute)
            ):
                yield ev

    def price(self, carrier: str, country: str, operator: str, at: float) -> float:
        """The price per part the carrier really charges at `at`, after price changes."""
        change = self._price_change(carrier, country, at, announced_only=False)
        if change is not None:
            return change
        return self.catalog.carriers[carrier].coverage[country].price_for(operator)

    def catalog_at(self, at: float) -> Catalog:
        """The catalog with the prices in force at `at` (what the engine must be told)."""
        carriers = {
            cid: _with_prices(car, {c: self._price_change(cid, c, at) for c in car.coverage})
            for cid, car in self.catalog.carriers.items()
        }
        return dataclasses.replace(self.catalog, carriers=carriers)

    def _price_change(
        self, carrier: str, country: str, at: float, announced_only: bool = True
    ) -> float | None:
        prices = [
            ev.price
            for ev in self._events(carrier, country, at, ("price",))
            if ev.announced or not announced_only
        ]
        return prices[-1] if prices else None

    def controls(self) -> list[tuple[float, str, str]]:
        """Changes the engine must be told of, in time order: (at, "pause"|"resume"|"catalog",
        carrier). A new carrier is paused from the start until it arrives; a price change
        (start and end) replaces the engine's catalog."""
        out: list[tuple[float, str, str]] = []
        for ev in self.spec.events:
            at = self.start + 60 * ev.at_minute
            if ev.kind == "new_carrier":
                out += [(self.start, "pause", ev.carrier), (at, "resume", ev.carrier)]
            elif ev.kind == "price" and ev.announced:
                out.append((at, "catalog", ev.carrier))
                if math.isfinite(ev.minutes):
                    out.append((at + 60 * ev.minutes, "catalog", ev.carrier))
        return sorted(out)

    def billed_on(self, carrier: str) -> tuple[str, str]:
        """The outcome event the carrier bills on: an accepted submit, or a DELIVRD receipt
        for carriers billing on delivery."""
        on_delivery = self.catalog.carriers[carrier].bills_on_delivery
        return ("dlr", "DELIVRD") if on_delivery else ("submit", "ACCEPTED")

    def cost(self, carrier: str, msg: Message, operator: str, events: list[Outcome]) -> float:
        """What sending `msg` really cost (per part, at the price in force when it was sent),
        if one of its events is the one the carrier bills on; else 0."""
        billed = self.billed_on(carrier)
        if not any((e.event, e.status) == billed for e in events):
            return 0.0
        return self.price(carrier, msg.country, operator, msg.at)

    def route(
        self, carrier: str, country: str, at: float, operator: str | None = None
    ) -> RouteSpec:
        """The route's true behaviour at event time `at`, after scripted events (a
        "country/operator" route, where the scenario has one, before the country's)."""
        by_country = self.spec.routes.get(carrier, {})
        spec = (
            (self._by_operator and by_country.get(f"{country}/{operator}"))
            or by_country.get(country)
            or by_country.get("*")
            or self.spec.defaults
        )
        events = self._events(carrier, country, at, (*OUTAGES, "degrade"))
        for ev in sorted(events, key=lambda ev: ev.kind in OUTAGES):  # an outage overrides
            if ev.kind == "outage":
                spec = replace_spec(spec, deliver=0.0, no_dlr=0.9)
            elif ev.kind == "loud_outage":
                spec = replace_spec(spec, deliver=0.0, no_dlr=0.0, fake_dlr=0.0, undeliv_share=1.0)
            elif ev.kind == "silent_outage":
                spec = replace_spec(
                    spec,
                    deliver=SILENT_DELIVER,
                    no_dlr=SILENT_NO_DLR,
                    fake_dlr=0.0,
                    submit_reject=0.0,
                    undeliv_share=0.0,
                )
            else:
                spec = replace_spec(spec, deliver=ev.deliver or 0.0, no_dlr=spec.no_dlr)
        return spec

    def send(
        self,
        carrier: str,
        msg: Message,
        local_hour: int,
        rng: np.random.Generator,
        operator: str | None = None,
    ) -> tuple[list[Outcome], Truth]:
        """The outcome events of sending `msg` through `carrier`, and what truly happened.

        Every send takes the same fixed set of draws in the same order, whatever its carrier and
        branch, so two policies sending one message through different carriers with the same
        `rng` face coupled outcomes (with equal submit rejection rates, delivered on the worse
        route implies delivered on the better one): common random numbers across carriers, not
        only within one. `operator` (as the engine resolved it) picks a per-operator route."""
        r = self.route(carrier, msg.country, msg.at, operator)
        u = rng.random(_UNIFORMS).tolist()  # Python floats: the truths below are plain bools
        z = rng.standard_normal(_NORMALS).tolist()
        t = msg.at
        if u[0] < r.submit_reject:
            return [Outcome(t + REJECT_AFTER_S, "submit", "REJECTED")], Truth(False, None, False)
        events = [Outcome(t + 0.05 + 0.2 * u[1], "submit", "ACCEPTED")]
        deliver = r.deliver * (1 - r.night_drop if local_hour < 6 else 1.0)
        latency = r.latency_median_s * math.exp(r.latency_sigma * z[0])
        delivered = u[2] < deliver
        receipt = u[3] >= r.no_dlr
        converted = False
        if delivered:
            if receipt:
                events.append(Outcome(t + latency + 0.5 * u[4], "dlr", "DELIVRD"))
            reports = self.catalog.tenants.get(msg.tenant)
            if (
                reports is not None
                and reports.reports_conversions
                and u[5] < self.spec.conversion_rate
            ):
                delay = self.spec.conversion_delay_median_s * math.exp(0.5 * z[1])
                events.append(Outcome(t + latency + delay, "conversion"))
                converted = True
        elif u[6] < r.fake_dlr:
            events.append(Outcome(t + latency, "dlr", "DELIVRD"))
        elif receipt:
            if u[7] < r.undeliv_share:
                lo, hi = UNDELIV_DELAY_S
                events.append(Outcome(t + lo + (hi - lo) * u[4], "dlr", "UNDELIV"))
            else:
                events.append(Outcome(t + 3600 * (1 + 5 * u[4]), "dlr", "EXPIRED"))
        return sorted(events, key=lambda e: e.at), Truth(
            delivered, latency if delivered else None, converted
        )

    def messages(self, rng: np.random.Generator) -> list[Message]:
        """The scenario's message stream: Poisson arrivals with a diurnal rate, in time order."""
        tr = self.spec.traffic
        out: list[Message] = []
        t = self.start
        countries, cw = _weights(tr.countries)
        tenants, tw = _weights(tr.tenants)
        classes, kw = _weights(tr.classes)
        peak = tr.rate_per_second * (1 + tr.diurnal_amplitude)
        while True:
            t += rng.exponential(1.0 / peak)
            if t >= self.end:
                return out
            hour = (t / 3600.0) % 24
            rate = tr.rate_per_second * (
                1 + tr.diurnal_amplitude * math.sin((hour - 9) / 24 * 2 * math.pi)
            )
            if rng.random() * peak > rate:
                continue
            country = countries[rng.choice(len(countries), p=cw)]
            tenant = tenants[rng.choice(len(tenants), p=tw)]
            ten = self.catalog.tenants.get(tenant)
            if ten is not None and not ten.may_send_to(country):
                continue
            pool = self.numbers[country]
            to, mccmnc = pool[int(rng.integers(len(pool)))]
            out.append(
                Message(t, to, country, mccmnc, tenant, classes[rng.choice(len(classes), p=kw)])
            )


def replace_spec(spec: RouteSpec, **changes: Any) -> RouteSpec:
    """A copy of a route spec with some fields changed."""
    return spec.model_copy(update=changes)


def _with_prices(carrier: Carrier, changes: Mapping[str, float | None]) -> Carrier:
    """A carrier whose country prices (and operator prices there) are replaced where given."""
    coverage = {
        c: cov
        if changes.get(c) is None
        else Coverage(c, float(changes[c]), {}, cov.excluded_operators)
        for c, cov in carrier.coverage.items()
    }
    return dataclasses.replace(carrier, coverage=coverage)


def _weights(mix: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    names = list(mix)
    w = np.array([mix[n] for n in names], float)
    return names, w / w.sum()


def _number_pool(
    country: str, catalog: Catalog, rng: np.random.Generator, size: int = 400
) -> list[tuple[str, str]]:
    """Valid mobile numbers of a country, each with an operator's MCC-MNC (as from an HLR)."""
    example = phonenumbers.example_number_for_type(country, phonenumbers.PhoneNumberType.MOBILE)
    if example is None:
        raise ScenarioError(f"no example mobile number for {country}")
    base = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
    ops = [op for op in catalog.directory.operators_of(country) if op.mccmnc]
    pool: list[tuple[str, str]] = []
    attempts = 0
    while len(pool) < size and attempts < size * 50:
        attempts += 1
        tail = "".join(str(d) for d in rng.integers(0, 10, 5))
        cand = base[:-5] + tail
        if phonenumbers.is_valid_number(phonenumbers.parse(cand, None)):
            op = ops[int(rng.integers(len(ops)))] if ops else None
            pool.append((cand, op.mccmnc[0] if op else ""))
    if not pool:
        raise ScenarioError(f"could not make valid numbers for {country}")
    return pool
