"""Retries (attempt > 1) are evaluated as decisions of their own, over their logged eligible sets
(which lack the carriers the retry excluded), on a simulator log with retries switched on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from carriers.catalog import load_catalog
from router.log.decision_log import (
    DECISION_SCHEMA,
    DECISIONS,
    OUTCOME_SCHEMA,
    OUTCOMES,
    finalized_view,
    read_stream,
)
from router.offline.evaluation import RewardModel, evaluate, make_candidate
from tests.bandit.test_ope import SPEC, simulate

RETRY_SPEC = {**SPEC, "traffic": {**SPEC["traffic"], "retry": True}}


def test_retries_are_their_own_decisions_over_their_logged_eligible_sets(tmp_path: Path) -> None:
    catalog = load_catalog()
    classes = simulate(catalog, "uniform", 2, tmp_path, RETRY_SPEC)
    decisions = read_stream(tmp_path, DECISIONS, DECISION_SCHEMA)
    frame = decisions.to_pandas()
    retries = frame[frame["attempt"] > 1]
    assert len(retries) >= 20
    parents = frame.set_index("decision_id").loc[retries["parent_decision_id"]]
    # The logged eligible set of a retry lacks the carrier its parent failed on.
    for eligible, failed in zip(retries["eligible"], parents["carrier"], strict=True):
        assert failed not in list(eligible)

    results = evaluate(
        tmp_path,
        {"static": make_candidate("static"), "logged": make_candidate("logged")},
        catalog,
        classes,
        reward_model=RewardModel(),
    )
    view = finalized_view(
        decisions,
        read_stream(tmp_path, OUTCOMES, OUTCOME_SCHEMA),
        classes,
        catalog.conversion_tenants(),
    )
    assert results["logged"].accumulator.n == len(frame)  # first attempts and retries alike
    assert results["logged"].estimates()["ips"].value == pytest.approx(view["reward"].mean())

    # static's choice is the best-priority carrier of each decision's own eligible set, so a
    # retry whose parent failed on the overall favourite goes to the next one; IPS by hand:
    priority = {c.id: c.priority for c in catalog.carriers.values()}
    choice = [min(eligible, key=lambda c: priority[c]) for eligible in frame["eligible"]]
    favourite = min(priority, key=priority.get)
    retried_off_favourite = (retries["eligible"].map(lambda e: favourite not in e)).sum()
    assert retried_off_favourite > 0
    hit = (frame["carrier"].to_numpy() == np.array(choice)).astype(float)
    reward = view.set_index("decision_id").loc[frame["decision_id"], "reward"].to_numpy()
    by_hand = pd.Series(hit * reward / frame["propensity"].to_numpy()).mean()
    static = results["static"].estimates()["ips"]
    assert static.n == len(frame)
    assert static.value == pytest.approx(by_hand, rel=1e-12)
