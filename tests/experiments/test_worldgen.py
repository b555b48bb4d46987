"""Generated worlds: deterministic, real numbering, every event kind has its effect when played,
and the multi-world table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import phonenumbers
import pytest
from phonenumbers import PhoneNumberType
from phonenumbers import carrier as pn_carrier

from carriers.catalog import load_catalog
from experiments.metrics import routed
from experiments.multiworld import POLICY_HEADERS, play_quiet, write_worlds
from experiments.results_file import MARK_END, MARK_START, splice_section, worlds_section
from experiments.world import Message, World, load_scenario
from experiments.worldgen import COUNTRIES, EVENT_KINDS, WorldGenConfig, generate_world
from router.core.config import load_config

SMALL = WorldGenConfig(
    countries=2, operators=(2, 3), carriers=4, hours=1.5, rate_per_second=0.4, grey_routes=(0, 0)
)


def only(kind: str, **changes) -> WorldGenConfig:
    """A small world config with exactly one event kind drawn."""
    events = {k: float(k == kind) for k in EVENT_KINDS}
    return WorldGenConfig(
        **{**SMALL.__dict__, "events": events, "at_least_one_outage": False, **changes}
    )


def test_same_seed_same_world_and_different_seeds_differ() -> None:
    a, b, c = generate_world(7), generate_world(7), generate_world(8)
    assert a.spec.model_dump() == b.spec.model_dump()
    assert a.catalog_doc == b.catalog_doc
    assert a.numbers == b.numbers
    assert a.spec.model_dump() != c.spec.model_dump()
    assert a.catalog_doc != c.catalog_doc
    # the same messages too (common random numbers start from the world's own seed)
    wa, wb = a.world(), b.world()
    ma, mb = wa.messages(np.random.default_rng(1)), wb.messages(np.random.default_rng(1))
    assert ma == mb and len(ma) > 1000


def test_numbers_are_real_mobiles_of_their_operator() -> None:
    gw = generate_world(3)
    directory = gw.catalog.directory
    assert len(gw.numbers) == 4
    for country, pool in gw.numbers.items():
        assert len(pool) >= 40
        mcc = COUNTRIES[country][0]
        seen_ops = set()
        for e164, mccmnc in pool:
            num = phonenumbers.parse(e164, None)
            assert phonenumbers.is_valid_number(num)
            assert phonenumbers.region_code_for_number(num) == country
            assert phonenumbers.number_type(num) == PhoneNumberType.MOBILE
            assert mccmnc.startswith(mcc) and len(mccmnc) == 5
            op = directory.by_mccmnc(mccmnc)
            assert op is not None and op.country == country
            assert pn_carrier.name_for_number(num, "en") == op.name  # the prefix's real operator
            seen_ops.add(op.id)
        assert len(seen_ops) >= 2


def _first_event(world: World, kind: str):
    return next(ev for ev in world.spec.events if ev.kind == kind)


def _msg(world: World, country: str, minute: float) -> Message:
    to, mccmnc = world.numbers[country][0]
    return Message(world.start + 60 * minute, to, country, mccmnc, "acme", "otp")


@pytest.mark.parametrize("kind", EVENT_KINDS)
def test_each_event_kind_can_be_drawn(kind: str) -> None:
    for seed in range(1, 4):
        kinds = {ev.kind for ev in generate_world(seed, only(kind)).spec.events}
        assert kinds == {kind}


def test_silent_outage_bills_and_stays_silent_and_the_oracle_avoids_it() -> None:
    gw = generate_world(5, only("silent_outage"))
    world = gw.world()
    ev = _first_event(world, "silent_outage")
    assert gw.catalog.carriers[ev.carrier].billing == "submit"  # accepts and bills every submit
    mid = ev.at_minute + ev.minutes / 2
    statuses, delivered, billed = [], 0, 0
    for i in range(2000):
        msg = _msg(world, ev.country, mid)
        events, truth = world.send(ev.carrier, msg, 12, np.random.default_rng([9, i]))
        assert events[0].event == "submit" and events[0].status == "ACCEPTED"
        billed += world.cost(ev.carrier, msg, "x", events) > 0
        delivered += truth.delivered
        for e in events[1:]:
            if e.event == "dlr":
                statuses.append(e.status)
                if e.status == "EXPIRED":
                    assert e.at - msg.at >= 3600  # hours later: no sender retries
    assert billed == 2000
    assert 0.01 < delivered / 2000 < 0.06
    assert "UNDELIV" not in statuses
    assert statuses.count("EXPIRED") > 100
    assert len(statuses) - delivered < 0.25 * 2000  # most failures have no receipt at all
    # played: the oracle sends there before the outage and never during it
    frame = routed(play_quiet("oracle", world, load_config(), 1))
    here = frame[(frame["country"] == ev.country) & (frame["attempt"] == 1)]
    start, end = world.start + 60 * ev.at_minute, world.start + 60 * (ev.at_minute + ev.minutes)
    during = here[(here["at"] >= start) & (here["at"] < end)]
    before = here[here["at"] < start]
    assert (before["carrier"] == ev.carrier).mean() > 0.3
    assert len(during) > 20 and not (during["carrier"] == ev.carrier).any()


def test_loud_outage_fails_fast_and_senders_retry() -> None:
    gw = generate_world(4, only("loud_outage", rate_per_second=0.6))
    world = gw.world()
    ev = _first_event(world, "loud_outage")
    msg = _msg(world, ev.country, ev.at_minute + 1)
    for i in range(200):
        events, truth = world.send(ev.carrier, msg, 12, np.random.default_rng([3, i]))
        assert not truth.delivered
        dlr = [e for e in events if e.event == "dlr"]
        if events[0].status == "ACCEPTED":
            assert [e.status for e in dlr] == ["UNDELIV"] and dlr[0].at - msg.at <= 30
    # a policy still learning sends some there; each such first attempt is retried elsewhere
    frame = routed(play_quiet("uniform", world, load_config(), 1))
    start, end = world.start + 60 * ev.at_minute, world.start + 60 * (ev.at_minute + ev.minutes)
    hit = frame[
        (frame["carrier"] == ev.carrier)
        & (frame["country"] == ev.country)
        & (frame["attempt"] == 1)
        & (frame["at"] >= start)
        & (frame["at"] < end)
    ]
    assert len(hit) > 5 and not hit["delivered"].any()
    retries = frame[(frame["attempt"] == 2) & frame["index"].isin(hit["index"])]
    assert len(retries) >= 0.9 * (hit["receipt"] == "UNDELIV").sum() > 0
    assert (retries["carrier"] != ev.carrier).all()


def test_slow_degradation_steps_down() -> None:
    world = generate_world(2, only("degrade")).world()
    steps = [ev for ev in world.spec.events if ev.kind == "degrade"]
    assert len(steps) >= 3
    ev = steps[0]
    before = world.route(ev.carrier, ev.country, world.start).deliver
    seen = [
        world.route(ev.carrier, ev.country, world.start + 60 * (s.at_minute + 0.1)).deliver
        for s in steps
    ]
    assert before > seen[0] > seen[-1] and seen == sorted(seen, reverse=True)
    assert math.isinf(steps[-1].minutes)  # the last step lasts


def test_an_outage_overrides_a_degradation_of_the_same_route() -> None:
    gw = generate_world(5)  # a loud outage and a slow degradation of FR/primecell
    world = gw.world()
    loud = _first_event(world, "loud_outage")
    steps = [e for e in world.spec.events if e.kind == "degrade" and e.carrier == loud.carrier]
    mid = world.start + 60 * (loud.at_minute + loud.minutes / 2)
    assert any(e.active((mid - world.start) / 60) for e in steps)  # they overlap
    route = world.route(loud.carrier, loud.country, mid)
    assert route.deliver == 0.0 and route.undeliv_share == 1.0


def test_unannounced_price_change_is_billed_but_not_in_the_catalog() -> None:
    world = generate_world(6, only("price")).world()
    ev = _first_event(world, "price")
    assert not ev.announced
    op = next(iter(world.catalog.directory.operators_of(ev.country))).id
    after = world.start + 60 * ev.at_minute + 1
    listed = world.catalog.carriers[ev.carrier].coverage[ev.country].price_for(op)
    assert world.price(ev.carrier, ev.country, op, after) == ev.price > listed
    assert world.catalog_at(after).carriers[ev.carrier].coverage[ev.country].price_for(op) == listed
    assert not [c for c in world.controls() if c[1] == "catalog"]
    frame = routed(play_quiet("thompson", world, load_config(), 1))
    late = frame[(frame["carrier"] == ev.carrier) & (frame["country"] == ev.country)]
    late = late[(late["at"] >= after) & (late["cost"] > 0)]
    assert len(late) and np.allclose(late["cost"], ev.price)


def test_new_carrier_gets_traffic_only_after_it_arrives() -> None:
    world = generate_world(1, only("new_carrier")).world()
    ev = _first_event(world, "new_carrier")
    frame = routed(play_quiet("uniform", world, load_config(), 1))
    mine = frame[frame["carrier"] == ev.carrier]
    assert len(mine) > 20
    assert mine["at"].min() >= world.start + 60 * ev.at_minute


def test_grey_routes_fake_receipts_and_no_receipt_routes_send_none() -> None:
    cfg = WorldGenConfig(**{**SMALL.__dict__, "grey_routes": (1, 1), "no_receipt_route": 1.0})
    gw = generate_world(9, cfg)
    world = gw.world()
    ((carrier, country, operator),) = gw.grey
    op = operator or next(iter(gw.catalog.directory.operators_of(country))).id
    fake = lost = 0
    for i in range(500):
        events, truth = world.send(
            carrier, _msg(world, country, 1), 12, np.random.default_rng([1, i]), op
        )
        lost += not truth.delivered
        fake += (not truth.delivered) and any(e.status == "DELIVRD" for e in events)
    assert lost > 250 and fake > 0.7 * lost
    assert len(gw.no_receipt) == 1
    carrier, country, op = gw.no_receipt[0]
    for i in range(200):
        events, _ = world.send(
            carrier, _msg(world, country, 1), 12, np.random.default_rng([2, i]), op
        )
        assert not [e for e in events if e.event == "dlr"]
    assert world.route(carrier, country, world.start, op).no_dlr == 1.0
    assert world.route(carrier, country, world.start, "someone_else").no_dlr < 1.0


def test_shipped_silent_outage_scenario() -> None:
    cat = load_catalog()
    world = World(load_scenario("silent_outage", cat), cat)
    assert [ev.kind for ev in world.spec.events] == ["silent_outage"]


def test_multiworld_section_and_splice(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# Simulated policy comparisons\n\nkept text\n", encoding="utf-8")
    tiny = WorldGenConfig(countries=2, operators=(2, 2), carriers=3, hours=1.0, rate_per_second=0.3)
    _, results = write_worlds(
        path, worlds=2, seeds=1, policies=["thompson", "vw_cb_adf"], gen=tiny, jobs=1
    )
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Simulated policy comparisons\n\nkept text\n")
    section = worlds_section(text)
    assert section is not None and section.startswith(MARK_START) and section.endswith(MARK_END)
    header = next(line for line in section.splitlines() if line.startswith("| policy"))
    assert [c.strip(" |") for c in header.split(" | ")[1:]] == list(POLICY_HEADERS.values())
    rows = {line.split(" | ")[0][2:]: line for line in section.splitlines() if line[:2] == "| "}
    assert {"oracle", "thompson", "vw_cb_adf"} <= set(rows)
    assert rows["oracle"].split(" | ")[1:3] == ["0.00", "0.00"]  # the oracle has no regret
    world_rows = [line for line in section.splitlines() if line.startswith(("| w001", "| w002"))]
    assert len(world_rows) == 2 and all("vw_cb_adf" in r for r in world_rows)
    assert [r["world"] for r in results] == ["w001", "w002"]
    assert all(r["rows"]["thompson"]["regret_pct"] > -5 for r in results)
    # a second write replaces the section; `router experiment results` keeps it as it is
    again = splice_section(text, f"{MARK_START}\nnew\n{MARK_END}")
    assert again.count(MARK_START) == 1 and "new" in again and "kept text" in again
    assert worlds_section("no section here") is None
