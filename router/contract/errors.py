"""Errors the engine answers with: an HTTP status, a code, and a message naming the field."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from router.contract.redact import redact


class RoutingError(Exception):
    """Base of every error a client can cause; nothing is learned or logged from it."""

    status = 400
    code = "bad_request"
    headers: Mapping[str, str] = MappingProxyType({})

    def __init__(
        self, message: str, field: str | None = None, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = dict(details or {})

    def to_dict(self) -> dict[str, Any]:
        """The JSON error body; echoed values that could be phone numbers are hidden."""
        message = self.message
        if self.field and not message.startswith(self.field):
            message = f"{self.field}: {message}"
        body: dict[str, Any] = {"code": self.code, "message": redact(message)}
        if self.field:
            body["field"] = self.field
        if self.details:
            body["details"] = redact(self.details)
        return body


class InvalidRequest(RoutingError):
    """A field is present and well-typed but its value is not acceptable."""

    status = 422
    code = "invalid_request"


class NoEligibleCarrier(RoutingError):
    """No carrier may take this message; `details` says why for each carrier."""

    status = 422
    code = "no_eligible_carrier"


class UnknownDecision(RoutingError):
    """An outcome or lookup names a decision the engine does not know."""

    status = 404
    code = "unknown_decision"


class IdempotencyConflict(RoutingError):
    """An idempotency key reused, while it lives, for a different request."""

    status = 409
    code = "idempotency_conflict"


class IdempotencyInProgress(RoutingError):
    """Another replica holds this idempotency key and has not answered yet: retry shortly."""

    status = 503
    code = "idempotency_in_progress"
    headers: Mapping[str, str] = MappingProxyType({"Retry-After": "1"})


class UnknownCarrier(RoutingError):
    """A carrier id that is not in the catalog."""

    status = 404
    code = "unknown_carrier"


class Forbidden(RoutingError):
    """The tenant is not permitted to do this."""

    status = 403
    code = "forbidden"


class Unauthorized(RoutingError):
    """No API key, or one that is unknown or revoked."""

    status = 401
    code = "unauthorized"
    headers = MappingProxyType({"WWW-Authenticate": "Bearer"})


class RateLimited(RoutingError):
    """A tenant's or a key's rate limit is spent; `Retry-After` says when to come back."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: float, details: Mapping[str, Any]) -> None:
        super().__init__(message, details={**details, "retry_after_seconds": retry_after})
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}


class AuthUnavailable(RoutingError):
    """The key store cannot be read (Redis down since start): fail closed."""

    status = 503
    code = "auth_unavailable"


class PayloadTooLarge(RoutingError):
    """A request larger than the server takes at once (body bytes, or items over a burst)."""

    status = 413
    code = "payload_too_large"


class SharedStateUnavailable(RoutingError):
    """The decision is not known on this replica and Redis, where the other replicas'
    decisions are, cannot be reached: retry (the receipt must not be dropped)."""

    status = 503
    code = "shared_state_unavailable"
    headers: Mapping[str, str] = MappingProxyType({"Retry-After": "1"})
