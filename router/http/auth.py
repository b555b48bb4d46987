"""Who may call the API: API keys with scopes, tenant isolation and rate limits, as FastAPI
dependencies.

Modes: `off` (open), `required` (every API call needs a key), `auto` (required as soon as the
key store holds any key, revoked ones included; open before, so the embedded default and the demo
run without keys). A tenant key acts for its tenant only; a key without a tenant is an operator's.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from router.contract.errors import (
    AuthUnavailable,
    Forbidden,
    PayloadTooLarge,
    RateLimited,
    Unauthorized,
)
from router.http.keys import SCOPES, KeySet, KeyStore, Limit, verify
from router.http.ratelimit import Buckets, TokenBuckets

log = logging.getLogger(__name__)

AUTH_MODES = ("auto", "required", "off")

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer rk_…`")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="the same key")


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: its key, its tenant (None: any tenant), scopes and the buckets it spends."""

    key_id: str | None
    tenant: str | None
    scopes: frozenset[str]
    buckets: tuple[tuple[str, Limit], ...] = ()

    def tenant_for(self, requested: str | None, field: str = "tenant") -> str | None:
        """The tenant a request acts for: the key's, which a body may repeat but not change."""
        if self.tenant is None or requested in (None, self.tenant):
            return requested if self.tenant is None else self.tenant
        raise Forbidden(f"this API key acts for tenant {self.tenant!r} only", field=field)


OPEN = Principal(None, None, frozenset(SCOPES))


class Auth:
    """Authenticates requests against a key store and charges their rate limits."""

    def __init__(
        self,
        store: KeyStore | None,
        mode: str = "auto",
        tenant_limit: Limit | None = None,
        buckets: Buckets | None = None,
    ) -> None:
        if mode not in AUTH_MODES:
            raise ValueError(f"auth mode must be one of {', '.join(AUTH_MODES)}")
        if store is None and mode == "required":
            raise ValueError("auth mode 'required' needs a key store")
        self.store = store
        self.mode = mode
        self.tenant_limit = tenant_limit
        self.buckets = buckets or TokenBuckets()

    def _keys(self) -> KeySet | None:
        """The store's keys when auth applies now, else None."""
        if self.mode == "off" or self.store is None:
            return None
        try:
            keys = self.store.current()
        except Exception as exc:  # unreadable file, unreachable Redis: fail closed
            log.error("key store unavailable: %s", exc)
            raise AuthUnavailable("the API key store cannot be read; try again later") from None
        return keys if self.mode == "required" or keys.keys else None

    def status(self) -> str:
        """`on`, `off` or `unavailable`, for /healthz."""
        try:
            return "off" if self._keys() is None else "on"
        except AuthUnavailable:
            return "unavailable"

    def authenticate(self, raw: str | None) -> Principal:
        """The caller behind a raw key (OPEN when auth is off), or 401."""
        keys = self._keys()
        if keys is None:
            return OPEN
        if not raw:
            raise Unauthorized(
                "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key'"
            )
        record = verify(keys, raw)
        if record is None:
            raise Unauthorized("unknown or revoked API key")
        buckets: list[tuple[str, Limit]] = []
        if record.tenant is not None:
            limit = keys.tenant_limits.get(record.tenant, self.tenant_limit)
            if limit is not None:
                buckets.append((f"tenant {record.tenant}", limit))
        if record.limit is not None:
            buckets.append((f"key {record.id}", record.limit))
        return Principal(record.id, record.tenant, frozenset(record.scopes), tuple(buckets))

    def charge(self, who: Principal, items: int) -> None:
        """Spend `items` tokens from every bucket of the caller, or answer 413/429."""
        if not who.buckets or items <= 0:
            return
        for name, limit in who.buckets:
            if items > limit.burst:
                raise PayloadTooLarge(
                    f"{items} items exceed the burst of {limit.burst:g} allowed by the rate "
                    f"limit of {name}; send at most {int(limit.burst)} per request",
                    details={"limit": name, "rate": limit.rate, "burst": limit.burst},
                )
        denied = self.buckets.take(who.buckets, items)
        if denied is not None:
            raise RateLimited(
                f"rate limit of {denied.bucket} exceeded ({denied.limit.rate:g} items/s, "
                f"burst {denied.limit.burst:g}); retry in {denied.retry_after:.2f} s",
                denied.retry_after,
                {"limit": denied.bucket, "rate": denied.limit.rate, "burst": denied.limit.burst},
            )

    def need(self, *scopes: str) -> Callable[..., Awaitable[Principal]]:
        """A dependency: the caller must hold one of `scopes`; a request costs one token per
        item (a batch's length), checked before its body is validated."""
        wanted = frozenset(scopes)

        async def caller(
            request: Request,
            bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
            api_key: Annotated[str | None, Security(_api_key)],
        ) -> Principal:
            who = self.authenticate(bearer.credentials if bearer else api_key)
            if not who.scopes & wanted:
                raise Forbidden(
                    f"this API key lacks the scope {' or '.join(sorted(wanted))}",
                    details={"required": sorted(wanted), "granted": sorted(who.scopes)},
                )
            self.charge(who, await _items(request) if who.buckets else 1)
            return who

        return caller


async def _items(request: Request) -> int:
    """A JSON list body's length, else 1; FastAPI has already read and parsed the body, and
    Starlette caches it on the request, so this costs nothing more."""
    if request.method != "POST":
        return 1
    try:
        body = await request.json()
    except ValueError:
        return 1
    return len(body) if isinstance(body, list) else 1


def open_auth() -> Auth:
    """No keys, no limits: the embedded default when no store is configured."""
    return Auth(None, "off")


def serving_auth(
    store: KeyStore,
    mode: str = "auto",
    tenant_limit: Limit | None = None,
    buckets: Buckets | None = None,
) -> Auth:
    """The server's `Auth`, warning at start when the API is open to anyone who reaches it."""
    auth = Auth(None if mode == "off" else store, mode, tenant_limit, buckets)
    state = auth.status()
    if state == "off":
        why = "--auth off" if mode == "off" else "auto mode and no API key in the store"
        log.warning(
            "auth: off (%s): anyone who reaches this port may route, report outcomes and pause "
            "carriers; `router keys create` turns it on",
            why,
        )
    else:
        log.info("auth: %s (mode %s)", state, mode)
    return auth
