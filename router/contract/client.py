"""HTTP client of the router API, with the engine's own interface (route_batch, record_outcomes)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import httpx

from features import from_epoch, to_epoch
from router.contract.errors import (
    Forbidden,
    IdempotencyConflict,
    InvalidRequest,
    NoEligibleCarrier,
    RoutingError,
    UnknownCarrier,
    UnknownDecision,
)
from router.core.engine import OutcomeEvent, RouteDecision, RouteRequest

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


def _request_json(r: RouteRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "to": r.to,
        "message_class": r.message_class,
        "sender_type": r.sender_type,
        "segments": r.segments,
        "attempt": r.attempt,
    }
    if r.tenant is not None:
        body["tenant"] = r.tenant
    if r.mccmnc:
        body["mccmnc"] = r.mccmnc
    if r.exclude:
        body["exclude"] = list(r.exclude)
    if r.parent_decision_id:
        body["parent_decision_id"] = r.parent_decision_id
    if r.at is not None:
        body["at"] = from_epoch(r.at).isoformat()
    if r.idempotency_key is not None:  # a repeat (a retry after a timeout) gets the same decision
        body["idempotency_key"] = r.idempotency_key
    return body


def _decision(d: dict[str, Any]) -> RouteDecision:
    return RouteDecision(
        d["decision_id"],
        d["carrier"],
        d["fallbacks"],
        d["propensity"],
        d["policy"],
        d["context"],
        to_epoch(datetime.fromisoformat(d["at"])),
    )


def _event_json(e: OutcomeEvent) -> dict[str, Any]:
    body: dict[str, Any] = {"decision_id": e.decision_id, "event": e.event}
    for name in ("status", "error_code", "cost", "currency", "at_flag"):
        value = getattr(e, name)
        if value is not None:
            body[name] = value
    for name in ("at", "at_earliest", "at_latest", "source_at"):
        value = getattr(e, name)
        if value is not None:
            body[name] = from_epoch(value).isoformat()
    return body


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
        return _decision(self._post("/v1/route", _request_json(req)))

    def route_batch(self, reqs: Sequence[RouteRequest]) -> list[RouteDecision | RoutingError]:
        """Decisions (or per-message errors) for many messages in one request."""
        data = self._post("/v1/route/batch", [_request_json(r) for r in reqs])
        return [_error(d) if "error" in d else _decision(d) for d in data]

    def record_outcomes(self, events: Sequence[OutcomeEvent]) -> list[str]:
        """Report outcome events; all-or-nothing."""
        return self._post("/v1/outcomes", [_event_json(e) for e in events])["results"]

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
