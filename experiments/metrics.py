"""Metrics of one simulated run, from the frame `play()` returns (one row per routing attempt).

Everything is ground truth from the world (true delivery, latency, cost), except the
DLR-reported delivery rate, which is what the receipts claimed. Pure functions, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from bandit.reward import MessageClass
from experiments.world import OUTAGES, EventSpec, World

REACTION_SHARE = 0.10  # reacted: the failed route gets under this share of its traffic...
REACTION_MIN_DECISIONS = 50  # ...over the rest of the outage, judged on at least this many


def routed(frame: pd.DataFrame) -> pd.DataFrame:
    """The attempts that got a carrier."""
    return frame[frame["carrier"].notna()]


def utilities(frame: pd.DataFrame, classes: Mapping[str, MessageClass]) -> pd.Series:
    """True utility per attempt: value·success − cost − latency penalty (for delivered ones)."""
    mc = frame["message_class"].map(classes)
    value = mc.map(lambda c: c.value).astype(float)
    sla = mc.map(lambda c: c.sla_seconds).astype(float)
    rate = mc.map(lambda c: c.latency_penalty_per_second).astype(float)
    latency = frame["latency_s"].astype(float).fillna(0.0).clip(upper=sla)
    success = frame["success"].astype(bool)
    return value * success - frame["cost"].astype(float) - rate * latency


def run_metrics(
    frame: pd.DataFrame, world: World, classes: Mapping[str, MessageClass]
) -> dict[str, float]:
    """Per-run metrics (every value finite, except a reaction time that never came: NaN)."""
    df = routed(frame)
    delivered = int(df["delivered"].sum())
    conv = df[df["tenant"].map(world.catalog.conversion_tenants().__contains__)]
    out = {
        "messages": float(frame["index"].nunique()),
        "attempts": float(len(df)),
        "unrouted": float(len(frame) - len(df)),
        "success_within_sla_rate": _rate(df.groupby("index")["success"].any()),
        "attempt_success_rate": _rate(df["success"]),
        "dlr_delivered_rate": _rate(df["receipt"] == "DELIVRD"),
        "true_delivered_rate": _rate(df["delivered"]),
        "cost_total": float(df["cost"].sum()),
        "cost_per_delivered": float(df["cost"].sum()) / delivered if delivered else math.nan,
        "utility": float(utilities(df, classes).sum()),
        "conversion_rate": _rate(conv["converted"]),
        "expected_regret": (
            float(df["expected_regret"].sum()) if "expected_regret" in df else math.nan
        ),
    }
    reactions = reaction_times(frame, world)
    if reactions:
        out["outage_reaction_s"] = max(reactions.values())
    return out


def _rate(values: pd.Series) -> float:
    return float(values.mean()) if len(values) else math.nan


def regret(metrics: Mapping[str, float], oracle: Mapping[str, float]) -> dict[str, float]:
    """Regret vs the oracle on the same traffic: absolute and % of the oracle's utility, and the
    luck-free (expected) regret as a % of it too."""
    absolute = oracle["utility"] - metrics["utility"]
    scale = 100 / abs(oracle["utility"])
    return {
        "regret": absolute,
        "regret_pct": scale * absolute,
        "expected_regret_pct": scale * metrics.get("expected_regret", math.nan),
    }


def reaction_times(frame: pd.DataFrame, world: World) -> dict[str, float]:
    """Per outage ("carrier/country"): event seconds from its start until the failed route's
    share of its country's first attempts, from then to the outage's end, is under
    `REACTION_SHARE` (judged on at least `REACTION_MIN_DECISIONS`); NaN if it never is."""
    first = routed(frame)
    first = first[first["attempt"] == 1].sort_values("at")
    return {
        f"{ev.carrier}/{ev.country}": reaction_time(first, world, ev)
        for ev in world.spec.events
        if ev.kind in OUTAGES
    }


def reaction_time(first: pd.DataFrame, world: World, ev: EventSpec) -> float:
    """One outage's reaction time (see `reaction_times`), from the routed first attempts sorted
    by time."""
    start = world.start + 60 * ev.at_minute
    end = min(world.end, start + 60 * ev.minutes)
    countries = list(world.catalog.carriers[ev.carrier].coverage)
    mine = first[first["country"].isin(countries if ev.country == "*" else [ev.country])]
    mine = mine[(mine["at"] >= start) & (mine["at"] < end)]
    to_failed = (mine["carrier"] == ev.carrier).to_numpy(dtype=float)
    rest = np.arange(len(to_failed), 0, -1)
    share_of_rest = np.cumsum(to_failed[::-1])[::-1] / rest
    hits = np.flatnonzero((share_of_rest < REACTION_SHARE) & (rest >= REACTION_MIN_DECISIONS))
    at = mine["at"].to_numpy()
    return float(at[hits[0]] - start) if hits.size else math.nan


def cumulative_regret(
    frame: pd.DataFrame,
    oracle: pd.DataFrame,
    world: World,
    classes: Mapping[str, MessageClass],
    bin_seconds: float = 60.0,
) -> pd.Series:
    """Cumulative regret vs the oracle by event minute (utility summed per time bin)."""
    mine, best = routed(frame), routed(oracle)
    return _cumulative(
        _binned(best, utilities(best, classes), world, bin_seconds)
        - _binned(mine, utilities(mine, classes), world, bin_seconds),
        world,
        bin_seconds,
    )


def cumulative_luck_free_regret(
    frame: pd.DataFrame, world: World, bin_seconds: float = 60.0
) -> pd.Series:
    """Cumulative luck-free (expected) regret by event minute, from each attempt's own."""
    df = routed(frame)
    return _cumulative(
        _binned(df, df["expected_regret"].astype(float).fillna(0.0), world, bin_seconds),
        world,
        bin_seconds,
    )


def _binned(df: pd.DataFrame, values: pd.Series, world: World, bin_seconds: float) -> np.ndarray:
    """`values` of the attempts summed per time bin from the world's start (a retry sent after
    the world's end counts in the last bin, so the curve ends at the run's total)."""
    edges = _edges(world, bin_seconds)
    at = np.clip(df["at"].to_numpy(dtype=float), edges[0], np.nextafter(edges[-1], -np.inf))
    sums, _ = np.histogram(at, bins=edges, weights=values)
    return sums


def _edges(world: World, bin_seconds: float) -> np.ndarray:
    return np.arange(world.start, world.end + bin_seconds, bin_seconds)


def _cumulative(per_bin: np.ndarray, world: World, bin_seconds: float) -> pd.Series:
    minutes = (_edges(world, bin_seconds)[1:] - world.start) / 60
    return pd.Series(np.cumsum(per_bin), index=minutes, name="regret")


def traffic_split(frame: pd.DataFrame, world: World, bin_seconds: float = 300.0) -> pd.DataFrame:
    """Share of first attempts per carrier in each time bin (rows: bin start minute)."""
    df = routed(frame)
    df = df[df["attempt"] == 1]
    minute = ((df["at"] - world.start) // bin_seconds * bin_seconds / 60).rename("minute")
    counts = df.groupby([minute, df["carrier"]]).size().unstack(fill_value=0)
    return counts.div(counts.sum(axis=1), axis=0)
