"""HTTP client of the router API, with the engine's own interface (route_batch, record_outcomes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from router.contract.errors import (
    Forbidden,
    IdempotencyConflict,
    InvalidRequest,
    NoEligibleCarrier,
    RoutingError,
    UnknownCarrier,
    UnknownDecision,
)
from router.contract.messages import (
    OutcomeEvent,
    OutcomeIn,
    RouteDecision,
    RouteIn,
    RouteOut,
    RouteRequest,
)

_ERRORS: dict[str, type[RoutingError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        NoEligibleCarrier,
        UnknownDecision,
        UnknownCarrier,
        Forbidden,
        IdempotencyConflict,
    )
}


def _error(body: dict[str, Any]) -> RoutingError:
    err = body.get("error", {})
    cls = _ERRORS.get(err.get("code", ""), RoutingError)
    exc = cls(err.get("message", "error"), err.get("field"), err.get("details"))
    if isinstance(err.get("code"), str) and err["code"] != exc.code:
        exc.code = err["code"]  # the router's own code (unauthorized, …), for dead letters
    return exc


def _body(model: RouteIn | OutcomeIn) -> dict[str, Any]:
    """A request body as the contract writes it (fields left out when not set)."""
    return model.model_dump(mode="json", exclude_none=True)


def _decision(d: dict[str, Any]) -> RouteDecision:
    return RouteOut.model_validate(d).to_decision()


class RouterClient:
    """A sender worker's connection to the router; errors come back as `RoutingError`s."""

    def __init__(
        self, base_url: str, timeout: float = 10.0, headers: dict[str, str] | None = None
    ) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=timeout, headers=headers)

    def _post(self, path: str, body: Any) -> Any:
        resp = self.http.post(path, json=body)
        if resp.status_code == 429 or resp.status_code >= 500:
            resp.raise_for_status()  # busy or failing: the caller may retry, nothing was applied
        data = resp.json()
        if resp.status_code >= 400:
            raise _error(data)
        return data

    def route(self, req: RouteRequest) -> RouteDecision:
        """One decision."""
        return _decision(self._post("/v1/route", _body(RouteIn.of(req))))

    def route_batch(self, reqs: Sequence[RouteRequest]) -> list[RouteDecision | RoutingError]:
        """Decisions (or per-message errors) for many messages in one request."""
        data = self._post("/v1/route/batch", [_body(RouteIn.of(r)) for r in reqs])
        return [_error(d) if "error" in d else _decision(d) for d in data]

    def record_outcomes(self, events: Sequence[OutcomeEvent]) -> list[str]:
        """Report outcome events; all-or-nothing."""
        return self._post("/v1/outcomes", [_body(OutcomeIn.of(e)) for e in events])["results"]

    def get(self, path: str) -> Any:
        """GET a JSON resource."""
        resp = self.http.get(path)
        data = resp.json()
        if resp.status_code >= 400:
            raise _error(data)
        return data

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()
