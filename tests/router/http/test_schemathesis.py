"""The live server's OpenAPI schema fuzzed with schemathesis (bounded): no 5xx, no crash, with
auth off and with auth on (an operator key holding every scope, so the fuzzing gets past 401)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from router.http.keys import SCOPES, FileKeyStore, new_key
from tests.conftest import LiveServer, start_server

pytestmark = pytest.mark.usefixtures("without_redis_env")


@dataclass
class Target:
    """A live server and the headers every fuzzed request carries."""

    live: LiveServer
    headers: dict[str, str]


@pytest.fixture(scope="module", params=["auth-off", "auth-on"])
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    """A server without keys (auto mode: open), or with one operator key (auth on)."""
    data: Path = tmp_path_factory.mktemp(request.param)
    headers: dict[str, str] = {}
    if request.param == "auth-on":
        raw, record = new_key(None, SCOPES)
        FileKeyStore(data).add(record)
        headers = {"Authorization": f"Bearer {raw}"}
    live = start_server(data, "--no-mlflow")
    assert live.client.get("/healthz").json()["auth"] == request.param.removeprefix("auth-")
    yield Target(live, headers)
    live.stop()


@pytest.fixture(scope="module")
def api_schema(target: Target) -> schemathesis.BaseSchema:
    """The schema the server publishes."""
    return schemathesis.openapi.from_url(f"{target.live.url}/openapi.json", timeout=30)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_gets_a_server_error(
    api_schema: schemathesis.BaseSchema, target: Target, mode: GenerationMode
) -> None:
    """Every operation, inputs that fit its schema and inputs that do not.

    (`schemathesis.pytest.from_fixture` fails on pytest 9, so the operations' Hypothesis
    strategies are driven here directly.)"""
    failures = {}
    statuses: Counter[int] = Counter()
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 8
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=15,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=True,
        )
        def call(case: schemathesis.Case) -> None:
            response = case.call_and_validate(
                base_url=target.live.url,
                headers=target.headers,
                checks=[not_a_server_error],
                timeout=30,
            )
            statuses[response.status_code] += 1

        try:
            call()
        except Unsatisfiable:  # negative mode: an operation with no input has none to break
            assert mode == GenerationMode.NEGATIVE and not operation.body
        except Exception as exc:  # a failed check: collect it, fuzz the other operations
            failures[operation.label] = str(exc)[:2000]
    assert not failures, failures
    assert sum(statuses.values()) > 50 and 401 not in statuses, statuses
    assert (200 in statuses) if mode == GenerationMode.POSITIVE else (422 in statuses), statuses


def test_the_server_survived_the_fuzzing(target: Target) -> None:
    assert target.live.proc.poll() is None
    assert target.live.client.get("/healthz").status_code == 200
    out = target.live.output()
    assert "Traceback" not in out and "Exception in ASGI application" not in out, out[-3000:]
