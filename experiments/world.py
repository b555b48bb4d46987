"""A simulated world of carriers in event time: true delivery, latency, receipts and conversions.

A scenario file says how each carrier really behaves per country (and what scripted events
change that); `World` turns one sent message into the outcome events a real carrier and a real
user would produce, with the times they would arrive. Deterministic given the seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import phonenumbers
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from carriers.catalog import Catalog
from features import to_epoch

SCENARIOS = Path(__file__).parent / "scenarios"


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


class EventSpec(_Strict):
    """A scripted change: an outage, a degradation or a price change on one route."""

    at_minute: float = Field(ge=0)
    carrier: str
    country: str | Literal["*"] = "*"
    kind: Literal["outage", "degrade"]
    minutes: float = Field(float("inf"), gt=0)
    deliver: float | None = Field(None, ge=0, le=1, description="delivery during a degrade")


class TrafficSpec(_Strict):
    """The message stream: rate with a diurnal shape, and the mix."""

    rate_per_second: float = Field(gt=0)
    diurnal_amplitude: float = Field(0.3, ge=0, lt=1)
    countries: dict[str, float]
    tenants: dict[str, float] = Field(default_factory=lambda: {"default": 1.0})
    classes: dict[str, float] = Field(default_factory=lambda: {"otp": 1.0})
    retry: bool = True


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


def load_scenario(path: str | Path) -> ScenarioSpec:
    """Load and validate a scenario (a path, or the name of a shipped scenario)."""
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
        return ScenarioSpec.model_validate(raw)
    except ValidationError as exc:
        msgs = [
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        ]
        raise ScenarioError(f"{path}: " + "; ".join(msgs)) from None


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
            self.numbers[country] = _number_pool(country, self.catalog, rng)

    def _check(self) -> None:
        known = set(self.catalog.carriers)
        for carrier in (*self.spec.routes, *(e.carrier for e in self.spec.events)):
            if carrier not in known:
                raise ScenarioError(f"scenario {self.spec.name}: unknown carrier {carrier!r}")
        for country in self.spec.traffic.countries:
            if country not in self.catalog.countries():
                raise ScenarioError(f"scenario {self.spec.name}: no carrier covers {country}")

    def route(self, carrier: str, country: str, at: float) -> RouteSpec:
        """The route's true behaviour at event time `at`, after scripted events."""
        by_country = self.spec.routes.get(carrier, {})
        spec = by_country.get(country) or by_country.get("*") or self.spec.defaults
        minute = (at - self.start) / 60
        for ev in self.spec.events:
            if ev.carrier != carrier or ev.country not in ("*", country):
                continue
            if ev.at_minute <= minute < ev.at_minute + ev.minutes:
                deliver = 0.0 if ev.kind == "outage" else (ev.deliver or 0.0)
                spec = replace_spec(
                    spec, deliver=deliver, no_dlr=0.9 if ev.kind == "outage" else spec.no_dlr
                )
        return spec

    def send(
        self, carrier: str, msg: Message, local_hour: int, rng: np.random.Generator
    ) -> tuple[list[Outcome], Truth]:
        """The outcome events of sending `msg` through `carrier`, and what truly happened."""
        r = self.route(carrier, msg.country, msg.at)
        t = msg.at
        if rng.random() < r.submit_reject:
            return [Outcome(t + 0.05, "submit", "REJECTED")], Truth(False, None, False)
        events = [Outcome(t + 0.05 + 0.2 * rng.random(), "submit", "ACCEPTED")]
        deliver = r.deliver * (1 - r.night_drop if local_hour < 6 else 1.0)
        latency = float(r.latency_median_s * math.exp(r.latency_sigma * rng.standard_normal()))
        delivered = rng.random() < deliver
        receipt = rng.random() >= r.no_dlr
        converted = False
        if delivered:
            if receipt:
                events.append(Outcome(t + latency + 0.5 * rng.random(), "dlr", "DELIVRD"))
            reports = self.catalog.tenants.get(msg.tenant)
            if (
                reports is not None
                and reports.reports_conversions
                and rng.random() < self.spec.conversion_rate
            ):
                delay = self.spec.conversion_delay_median_s * math.exp(0.5 * rng.standard_normal())
                events.append(Outcome(t + latency + delay, "conversion"))
                converted = True
        elif rng.random() < r.fake_dlr:
            events.append(Outcome(t + latency, "dlr", "DELIVRD"))
        elif receipt:
            if rng.random() < 0.75:
                events.append(Outcome(t + 5 + 25 * rng.random(), "dlr", "UNDELIV"))
            else:
                events.append(Outcome(t + 3600 * (1 + 5 * rng.random()), "dlr", "EXPIRED"))
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
