"""Seeded random worlds: a catalog and a scenario the runner already plays, drawn from a seed.

A generated world has real countries (their country codes, mobile prefixes and operators as
phonenumbers knows them, each operator with an MCC-MNC-like code under the country's real MCC),
carriers of three kinds (tier-1 aggregators covering everything, local direct routes, cheap
wholesale routes), prices and billing bases, true delivery per carrier × country (× operator
where it differs) with losses at local night, latency tails, receipt behaviours (honest, grey
routes faking DELIVRD, no receipts at all for some operators) and scripted events drawn at
random: loud and silent outages of a country's best route, slow degradations, price rises the
catalog does not announce, and new carriers. Nothing here simulates: `GeneratedWorld.world()` is
an ordinary `experiments.world.World`. Same seed and config, same world.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import phonenumbers
import yaml
from phonenumbers import PhoneNumberType
from phonenumbers import carrier as pn_carrier

from carriers.catalog import Catalog, parse_catalog
from experiments.world import EventSpec, RouteSpec, ScenarioSpec, World

# Countries to draw from: ISO code -> (real MCC, time zone for numbers spanning several).
COUNTRIES: dict[str, tuple[str, str | None]] = {
    "AE": ("424", None),
    "AU": ("505", "Australia/Sydney"),
    "BD": ("470", None),
    "DE": ("262", None),
    "EG": ("602", None),
    "ES": ("214", "Europe/Madrid"),
    "FR": ("208", None),
    "GB": ("234", "Europe/London"),
    "GH": ("620", None),
    "ID": ("510", "Asia/Jakarta"),
    "IN": ("404", None),
    "IT": ("222", "Europe/Rome"),
    "KE": ("639", None),
    "KR": ("450", None),
    "MA": ("604", None),
    "MY": ("502", None),
    "NG": ("621", None),
    "NL": ("204", None),
    "PE": ("716", None),
    "PH": ("515", None),
    "PK": ("410", None),
    "PL": ("260", None),
    "RU": ("250", "Europe/Moscow"),
    "SA": ("420", None),
    "TH": ("520", None),
    "TR": ("286", None),
    "VN": ("452", None),
    "ZA": ("655", None),
}
_NAME_HEADS = ("nova", "tele", "prime", "swift", "zen", "metro", "blue", "apex", "orbit", "vega")
_NAME_TAILS = ("link", "route", "net", "wave", "connect", "path", "gate", "cell", "sms", "hub")
EVENT_KINDS = ("loud_outage", "silent_outage", "degrade", "price", "new_carrier")
OTP_VALUE = 0.5  # the value used to rank routes when choosing an event's target


@dataclass(frozen=True)
class WorldGenConfig:
    """What a generated world may contain. Event probabilities are per world; with
    `at_least_one_outage`, a world drawing neither outage kind gets one of them anyway."""

    countries: int = 4
    operators: tuple[int, int] = (2, 4)  # per country, inclusive range
    carriers: int = 5
    hours: float = 5.0
    rate_per_second: float = 0.2
    grey_routes: tuple[int, int] = (0, 2)
    no_receipt_route: float = 0.5  # P(one carrier sends no receipts for one operator)
    events: Mapping[str, float] = field(
        default_factory=lambda: {
            "loud_outage": 0.5,
            "silent_outage": 0.5,
            "degrade": 0.5,
            "price": 0.5,
            "new_carrier": 0.35,
        }
    )
    at_least_one_outage: bool = True
    outage_minutes: tuple[float, float] = (30.0, 90.0)


@dataclass
class GeneratedWorld:
    """A generated world: the scenario, the catalog (and its document), the number pools, and
    what it holds (grey routes, events) for the tables."""

    id: str
    seed: int
    spec: ScenarioSpec
    catalog_doc: dict[str, Any]
    catalog: Catalog
    numbers: dict[str, list[tuple[str, str]]]
    grey: list[tuple[str, str, str | None]]  # (carrier, country, operator or None = all)
    no_receipt: list[tuple[str, str, str]]  # (carrier, country, operator)
    tiers: dict[str, str]

    def world(self) -> World:
        """A fresh World to play (its number pools copied)."""
        return World(self.spec, self.catalog, numbers={c: list(p) for c, p in self.numbers.items()})

    def event_labels(self) -> list[str]:
        """Short labels of what the world holds, e.g. 'silent FR/novalink 45m'."""
        out = []
        for ev in self.spec.events:
            where = f"{ev.country}/{ev.carrier}"
            span = "" if math.isinf(ev.minutes) else f" {ev.minutes:.0f}m"
            if ev.kind in ("loud_outage", "silent_outage"):
                out.append(f"{ev.kind.split('_')[0]} {where}{span}")
            elif ev.kind == "price":
                base = self.catalog.carriers[ev.carrier].coverage[ev.country].price
                note = "" if ev.announced else " unannounced"
                out.append(f"price {where} {ev.price / base - 1:+.0%}{note}")
            elif ev.kind == "new_carrier":
                out.append(f"new {ev.carrier}")
        degrades = sorted(
            {f"{e.country}/{e.carrier}" for e in self.spec.events if e.kind == "degrade"}
        )
        out += [f"degrade {d}" for d in degrades]
        out += [f"grey {c}/{k}" + (f"/{o}" if o else "") for k, c, o in self.grey]
        out += [f"no-DLR {c}/{o}/{k}" for k, c, o in self.no_receipt]
        return out

    def save(self, directory: Path) -> tuple[Path, Path]:
        """Write the scenario and catalog as YAML files (for reading; the number pools are
        drawn again from the catalog when such a scenario is loaded)."""
        directory.mkdir(parents=True, exist_ok=True)
        scenario = directory / f"{self.id}.yaml"
        catalog = directory / f"{self.id}.catalog.yaml"
        scenario.write_text(
            yaml.safe_dump(self.spec.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
        )
        catalog.write_text(yaml.safe_dump(self.catalog_doc, sort_keys=False), encoding="utf-8")
        return scenario, catalog


def generate_world(seed: int, config: WorldGenConfig | None = None) -> GeneratedWorld:
    """The world of `seed` under `config` (deterministic)."""
    return _Builder(seed, config or WorldGenConfig()).build()


# ---- numbering ----------------------------------------------------------------------------


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.casefold()).strip("_") or "op"


def operators_and_numbers(
    country: str, rng: np.random.Generator, n_operators: int, per_operator: int = 60
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Up to `n_operators` real operators of the country (by the mobile prefixes phonenumbers
    assigns them) with MCC-MNC-like codes, and valid mobile numbers of each with its code."""
    mcc = COUNTRIES[country][0]
    example = phonenumbers.example_number_for_type(country, PhoneNumberType.MOBILE)
    nsn = str(example.national_number)
    code = example.country_code
    by_name: dict[str, list[str]] = {}
    for _ in range(6000):
        digits = "".join(map(str, rng.integers(0, 10, len(nsn) - 1).tolist()))
        e164 = f"+{code}{nsn[0]}{digits}"
        num = phonenumbers.parse(e164, None)
        if phonenumbers.number_type(num) != PhoneNumberType.MOBILE:
            continue  # also rules out invalid numbers
        name = pn_carrier.name_for_number(num, "en")
        if name:
            by_name.setdefault(name, []).append(e164)
        if sum(min(len(v), per_operator) for v in by_name.values()) >= per_operator * 6:
            break
    counts = Counter({n: len(v) for n, v in by_name.items()})
    total = sum(counts.values())
    names = [n for n, k in counts.most_common() if k >= max(5, 0.05 * total)][:n_operators]
    operators, pool, seen = [], [], set()
    for j, name in enumerate(names):
        slug = _slug(name)
        while slug in seen:
            slug += "x"
        seen.add(slug)
        mccmnc = f"{mcc}{j + 1:02d}"
        operators.append({"id": slug, "name": name, "mccmnc": [mccmnc]})
        pool += [(n, mccmnc) for n in by_name[name][:per_operator]]
    return operators, pool


# ---- the builder --------------------------------------------------------------------------


class _Builder:
    def __init__(self, seed: int, config: WorldGenConfig) -> None:
        self.seed = seed
        self.cfg = config
        self.rng = np.random.default_rng([seed, 14])

    def u(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def build(self) -> GeneratedWorld:
        cfg, rng = self.cfg, self.rng
        pickable = sorted(COUNTRIES)
        self.countries: list[str] = []
        self.ops: dict[str, list[dict[str, Any]]] = {}
        numbers: dict[str, list[tuple[str, str]]] = {}
        for country in rng.permutation(pickable).tolist():
            if len(self.countries) == cfg.countries:
                break
            n_ops = int(rng.integers(cfg.operators[0], cfg.operators[1] + 1))
            ops, pool = operators_and_numbers(country, rng, n_ops)
            if len(ops) < min(2, cfg.operators[0]):
                continue
            self.countries.append(country)
            self.ops[country] = ops
            numbers[country] = pool
        self.base_price = {
            c: math.exp(self.u(math.log(0.006), math.log(0.07))) for c in self.countries
        }
        self._carriers()
        self._truth()
        self._grey_and_receipts()
        events = self._events()
        weights = rng.dirichlet([3.0] * len(self.countries)) * 0.8 + 0.2 / len(self.countries)
        start = datetime(2026, 11, 2, tzinfo=UTC) + timedelta(hours=int(rng.integers(0, 24)))
        wid = f"w{self.seed:03d}"
        spec = ScenarioSpec(
            name=wid,
            description=f"generated world {self.seed}",
            seed=self.seed,
            start=start,
            duration_minutes=cfg.hours * 60,
            traffic={
                "rate_per_second": cfg.rate_per_second,
                "diurnal_amplitude": 0.3,
                "countries": {
                    c: round(float(w), 4) for c, w in zip(self.countries, weights, strict=True)
                },
                "tenants": {"acme": 0.4, "default": 0.6},
                "classes": {"otp": 0.85, "transactional": 0.15},
                "report_cost": True,  # unannounced price rises are seen on the bills
            },
            routes=self.routes,
            events=events,
        )
        doc = self._catalog_doc()
        catalog = parse_catalog(doc, f"<generated world {self.seed}>")
        return GeneratedWorld(
            wid, self.seed, spec, doc, catalog, numbers, self.grey, self.no_receipt, self.tiers
        )

    # carriers, coverage and prices
    def _carriers(self) -> None:
        cfg, rng = self.cfg, self.rng
        names = [h + t for h in _NAME_HEADS for t in _NAME_TAILS]
        picked = [names[i] for i in rng.choice(len(names), cfg.carriers + 1, replace=False)]
        self.new_carrier_id = picked[-1]
        kinds = ["tier1"] + ["local", "wholesale"] * cfg.carriers
        kinds = kinds[: cfg.carriers]
        for i in range(3, cfg.carriers):
            kinds[i] = str(rng.choice(["tier1", "local", "wholesale"], p=[0.3, 0.35, 0.35]))
        self.tiers: dict[str, str] = dict(zip(picked, kinds, strict=False))
        self.billing = {c: "submit" if self.chance(0.6) else "delivery" for c in picked}
        self.coverage: dict[str, dict[str, dict[str, Any]]] = {}
        locals_at = iter(rng.permutation(self.countries).tolist() * cfg.carriers)
        for cid, tier in self.tiers.items():
            if tier == "tier1":
                where = list(self.countries)
            elif tier == "local":
                where = [next(locals_at)]
            else:
                where = [c for c in self.countries if self.chance(0.8)] or [self.countries[0]]
            self.coverage[cid] = {c: self._price_entry(c, tier) for c in where}
        for country in self.countries:  # every country gets at least two carriers
            covering = [cid for cid in self.tiers if country in self.coverage[cid]]
            for cid in self.tiers:
                if len(covering) >= 2:
                    break
                if cid not in covering:
                    self.coverage[cid][country] = self._price_entry(country, self.tiers[cid])
                    covering.append(cid)

    def _price_entry(self, country: str, tier: str) -> dict[str, Any]:
        factor = {"tier1": (1.05, 1.35), "local": (0.75, 1.0), "wholesale": (0.45, 0.75)}[tier]
        price = self.base_price[country] * self.u(*factor)
        entry: dict[str, Any] = {"price": round(price, 4)}
        ops = {
            op["id"]: round(price * self.u(0.8, 1.25), 4)
            for op in self.ops[country]
            if self.chance(0.2)
        }
        if ops:
            entry["operators"] = ops
        return entry

    # true behaviour
    def _route(self, tier: str) -> RouteSpec:
        lo, hi = {"tier1": (0.9, 0.96), "local": (0.93, 0.985), "wholesale": (0.72, 0.9)}[tier]
        lat = {"tier1": (3, 6), "local": (2, 5), "wholesale": (6, 16)}[tier]
        sig = {"tier1": (0.4, 0.8), "local": (0.3, 0.7), "wholesale": (0.7, 1.1)}[tier]
        rej = (0.01, 0.05) if tier == "wholesale" else (0.0, 0.015)
        return RouteSpec(
            deliver=round(self.u(lo, hi), 4),
            latency_median_s=round(self.u(*lat), 2),
            latency_sigma=round(self.u(*sig), 2),
            no_dlr=round(self.u(0.005, 0.05), 4),
            submit_reject=round(self.u(*rej), 4),
            night_drop=round(self.u(0.1, 0.4), 3) if self.chance(0.3) else 0.0,
        )

    def _truth(self) -> None:
        self.routes: dict[str, dict[str, RouteSpec]] = {}
        for cid, cov in self.coverage.items():
            by: dict[str, RouteSpec] = {}
            for country in cov:
                base = by[country] = self._route(self.tiers[cid])
                for op in self.ops[country]:
                    if self.chance(0.3):  # this operator fares differently on this carrier
                        by[f"{country}/{op['id']}"] = base.model_copy(
                            update={
                                "deliver": round(
                                    min(0.99, max(0.3, base.deliver + self.u(-0.12, 0.04))), 4
                                ),
                                "latency_median_s": round(
                                    base.latency_median_s * self.u(0.7, 1.6), 2
                                ),
                            }
                        )
            self.routes[cid] = by

    def _grey_and_receipts(self) -> None:
        cfg, rng = self.cfg, self.rng
        self.grey: list[tuple[str, str, str | None]] = []
        self.no_receipt: list[tuple[str, str, str]] = []
        candidates = [
            (cid, c)
            for cid, cov in self.coverage.items()
            if self.tiers[cid] != "tier1"
            for c in cov
        ] or [(cid, c) for cid, cov in self.coverage.items() for c in cov]
        n_grey = min(len(candidates), int(rng.integers(cfg.grey_routes[0], cfg.grey_routes[1] + 1)))
        for i in rng.choice(len(candidates), n_grey, replace=False).tolist():
            cid, country = candidates[i]
            op = None
            if self.chance(0.5):
                op = self.ops[country][int(rng.integers(len(self.ops[country])))]["id"]
            grey = RouteSpec(
                deliver=round(self.u(0.15, 0.4), 4),
                fake_dlr=round(self.u(0.8, 0.95), 4),
                latency_median_s=round(self.u(3, 6), 2),
                latency_sigma=0.5,
                no_dlr=0.01,
            )
            cheap = round(self.base_price[country] * self.u(0.3, 0.5), 4)
            entry = self.coverage[cid][country]
            if op is None:
                self.routes[cid] = {
                    k: v for k, v in self.routes[cid].items() if k.split("/")[0] != country
                }
                self.routes[cid][country] = grey
                self.coverage[cid][country] = {"price": cheap}
            else:
                self.routes[cid][f"{country}/{op}"] = grey
                entry.setdefault("operators", {})[op] = cheap
            self.grey.append((cid, country, op))
        if self.chance(cfg.no_receipt_route):
            greys = {(g[0], g[1]) for g in self.grey}
            pairs = [
                (cid, c) for cid, cov in self.coverage.items() for c in cov if (cid, c) not in greys
            ]
            if pairs:
                cid, country = pairs[int(rng.integers(len(pairs)))]
                op = self.ops[country][int(rng.integers(len(self.ops[country])))]["id"]
                base = self.routes[cid].get(f"{country}/{op}") or self.routes[cid][country]
                self.routes[cid][f"{country}/{op}"] = base.model_copy(update={"no_dlr": 1.0})
                self.no_receipt.append((cid, country, op))

    # events
    def _score(self, cid: str, country: str) -> float:
        r = self.routes[cid][country]
        return OTP_VALUE * r.deliver * (1 - r.submit_reject) - self.coverage[cid][country]["price"]

    def _ranked(self, country: str) -> list[str]:
        greys = {(g[0], g[1]) for g in self.grey if g[2] is None}
        covering = [
            cid
            for cid in self.coverage
            if country in self.coverage[cid] and (cid, country) not in greys
        ]
        covering = covering or [cid for cid in self.coverage if country in self.coverage[cid]]
        return sorted(covering, key=lambda cid: -self._score(cid, country))

    def _events(self) -> list[EventSpec]:
        cfg, rng = self.cfg, self.rng
        dur = cfg.hours * 60
        p = {k: cfg.events.get(k, 0.0) for k in EVENT_KINDS}
        drawn = {k: self.chance(p[k]) for k in EVENT_KINDS}
        if cfg.at_least_one_outage and not (drawn["loud_outage"] or drawn["silent_outage"]):
            drawn[str(rng.choice(["loud_outage", "silent_outage"]))] = True
        events: list[dict[str, Any]] = []
        used: set[str] = set()
        order = rng.permutation(self.countries).tolist()
        for kind in ("silent_outage", "loud_outage"):
            if not drawn[kind]:
                continue
            want = "submit" if kind == "silent_outage" else "delivery"
            free = [c for c in order if c not in used] or order
            country = next((c for c in free if self.billing[self._ranked(c)[0]] == want), free[0])
            used.add(country)
            minutes = round(self.u(*cfg.outage_minutes))
            latest = max(dur * 0.3, dur - minutes - 60)
            at = round(self.u(dur * 0.3, max(dur * 0.3 + 1, min(dur * 0.6, latest))))
            carrier = self._ranked(country)[0]
            events.append(
                dict(at_minute=at, carrier=carrier, country=country, kind=kind, minutes=minutes)
            )
        if drawn["degrade"]:
            country = order[int(rng.integers(len(order)))]
            ranked = self._ranked(country)
            carrier = ranked[int(rng.integers(min(2, len(ranked))))]
            base = self.routes[carrier][country].deliver
            drop = self.u(0.15, 0.3)
            at, span, steps = self.u(dur * 0.15, dur * 0.4), self.u(60, 150), 4
            for k in range(steps):
                last = k == steps - 1
                events.append(
                    dict(
                        at_minute=round(at + k * span / steps, 1),
                        carrier=carrier,
                        country=country,
                        kind="degrade",
                        deliver=round(base - drop * (k + 1) / steps, 4),
                        **({} if last else {"minutes": round(span / steps, 1)}),
                    )
                )
        if drawn["price"]:
            country = order[int(rng.integers(len(order)))]
            carrier = self._ranked(country)[0]
            price = self.coverage[carrier][country]["price"] * self.u(1.3, 1.8)
            events.append(
                dict(
                    at_minute=round(self.u(dur * 0.2, dur * 0.6)),
                    carrier=carrier,
                    country=country,
                    kind="price",
                    price=round(price, 4),
                    announced=False,
                )
            )
        if drawn["new_carrier"]:
            cid = self.new_carrier_id
            self.tiers[cid] = "local"
            self.billing[cid] = "submit" if self.chance(0.6) else "delivery"
            where = rng.choice(self.countries, min(2, len(self.countries)), replace=False).tolist()
            self.coverage[cid] = {}
            self.routes[cid] = {}
            for country in where:
                price = round(self.base_price[country] * self.u(0.7, 0.9), 4)
                self.coverage[cid][country] = {"price": price}
                self.routes[cid][country] = self._route("local")
            events.append(
                dict(at_minute=round(self.u(dur * 0.2, dur * 0.5)), carrier=cid, kind="new_carrier")
            )
        return [EventSpec(**e) for e in events]

    def _catalog_doc(self) -> dict[str, Any]:
        countries = {}
        for c in self.countries:
            entry: dict[str, Any] = {"operators": self.ops[c]}
            if COUNTRIES[c][1]:
                entry["timezone"] = COUNTRIES[c][1]
            countries[c] = entry
        carriers = [
            {
                "id": cid,
                "name": f"{cid} ({self.tiers[cid]})",
                "billing": self.billing[cid],
                "priority": i + 1,
                "coverage": self.coverage[cid],
            }
            for i, cid in enumerate(self.coverage)
        ]
        tenants = [{"id": "default"}, {"id": "acme", "reports_conversions": True}]
        return {
            "version": f"generated-{self.seed}",
            "currency": "USD",
            "countries": countries,
            "carriers": carriers,
            "tenants": tenants,
        }


def world_ids(n: int, first: int = 1) -> list[int]:
    """The seeds of `n` generated worlds from `first`."""
    return list(range(first, first + n))


def replace_config(config: WorldGenConfig, **changes: Any) -> WorldGenConfig:
    """A copy of a generator config with some fields changed."""
    return dataclasses.replace(config, **changes)
