"""The HTTP API (FastAPI): routing decisions, outcomes, explanations, carriers, health, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.contract.errors import InvalidRequest, RoutingError
from router.contract.messages import (
    ID_PATTERN,
    KEY_FIELD,
    KEY_HEADER,
    KEY_RULE,
    MAX_BATCH,
    ErrorOut,
    OutcomeIn,
    OutcomesOut,
    PauseIn,
    RouteDecision,
    RouteIn,
    RouteOut,
    check_key,
)
from router.http.auth import Auth, Principal, open_auth
from router.http.bodylimit import MAX_BODY_BYTES, BodySizeLimit

if TYPE_CHECKING:
    from router.serving.service import RouterService

log = logging.getLogger(__name__)


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _error(exc: RoutingError) -> Response:
    response = _json({"error": exc.to_dict()}, exc.status)
    response.headers.update(exc.headers)
    return response


def _field_path(loc: list[str]) -> str:
    """`["1", "cost"]` -> `[1].cost`, as the engine names list items."""
    path = ""
    for part in loc:
        path += f"[{part}]" if part.isdigit() else (f".{part}" if path else part)
    return path or "body"


def _this_branch(loc: list[str], body: object) -> bool:
    """`/v1/outcomes` takes one event or a list, and pydantic reports both union branches:
    keep the errors of the branch that matches the body's shape."""
    if not loc:
        return True
    if loc[0].startswith("list["):
        return isinstance(body, list)
    if loc[0] == "OutcomeIn":
        return not isinstance(body, list)
    return True


def _validation_message(exc: RequestValidationError) -> Response:
    """422 naming each bad field; the offending values are never echoed (they may be numbers)."""
    body = getattr(exc, "body", None)
    fields = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return _json(
                {"error": {"code": "malformed_json", "message": "request body is not valid JSON"}},
                400,
            )
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if not _this_branch(loc, body):
            continue
        loc = [p for p in loc if p != "OutcomeIn" and not p.startswith("list[")]
        fields.append({"field": _field_path(loc), "message": err.get("msg", "invalid")})
    message = "; ".join(f"{f['field']}: {f['message']}" for f in fields) or "invalid request"
    first = fields[0]["field"] if fields else None
    return _json(
        {
            "error": {
                "code": "invalid_request",
                "message": message,
                "field": first,
                "details": {"fields": fields},
            }
        },
        422,
    )


def create_app(
    service: RouterService,
    tick_seconds: float = 0.5,
    auth: Auth | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The FastAPI application serving one `RouterService`; `auth` checks keys (default: open)."""
    engine = service.engine
    auth = auth or open_auth()
    caller = Depends(auth.need("route"))
    reporter = Depends(auth.need("outcomes"))
    reader = Depends(auth.need("route", "outcomes", "admin"))
    admin = Depends(auth.need("admin"))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async def ticker() -> None:
            while True:
                await asyncio.sleep(tick_seconds)
                try:
                    service.tick()
                except Exception:  # one failed tick must not end the ticking (nor the shutdown)
                    log.exception("periodic tick failed; ticking on")

        task = asyncio.create_task(ticker())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            service.close()

    app = FastAPI(
        title="SMS router",
        version="0.1.0",
        summary="Adaptive SMS routing: learned carrier selection with honest propensities.",
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)

    @app.exception_handler(RoutingError)
    async def _routing_error(_: Request, exc: RoutingError) -> Response:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        engine.metrics.rejected.labels("invalid_request").inc()
        if request.url.path == "/v1/outcomes":
            engine.metrics.outcomes_refused.labels("invalid_request").inc()
        return _validation_message(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        code = {
            400: "malformed_json",
            404: "not_found",
            405: "method_not_allowed",
            413: "payload_too_large",
        }.get(exc.status_code, "http_error")
        return _json({"error": {"code": code, "message": str(exc.detail)}}, exc.status_code)

    errors: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorOut} for s in (400, 401, 403, 404, 413, 422, 429)
    }

    route_errors: dict[int | str, dict[str, Any]] = {
        **errors,
        409: {"model": ErrorOut, "description": "idempotency key used for another request"},
        503: {"model": ErrorOut, "description": "idempotency key held by a replica: retry"},
    }
    key_header = Header(
        None,
        alias=KEY_HEADER,
        description=f"Idempotency key ({KEY_RULE}); the same key (per tenant) gives the same "
        "decision. Or the body's idempotency_key (if both: the same)",
    )

    def _rejected(exc: RoutingError) -> RoutingError:
        engine.metrics.rejected.labels(exc.code).inc()
        return exc

    @app.post("/v1/route", response_model=RouteOut, responses=route_errors, tags=["routing"])
    async def route(
        body: RouteIn, who: Principal = caller, header_key: str | None = key_header
    ) -> Response:
        """Choose a carrier for one message; with an idempotency key, a repeat gets the same
        decision (nothing new logged)."""
        req = body.to_request()
        req = dataclasses.replace(req, tenant=who.tenant_for(req.tenant))
        if header_key is not None:
            try:
                check_key(header_key, KEY_HEADER)
            except InvalidRequest as exc:
                raise _rejected(exc) from None
            if req.idempotency_key not in (None, header_key):
                raise _rejected(
                    InvalidRequest(
                        f"the {KEY_HEADER} header and the {KEY_FIELD} field differ: send one "
                        "of them, or the same key in both",
                        field=KEY_FIELD,
                    )
                )
            req = dataclasses.replace(req, idempotency_key=header_key)
        if service.shared is not None and req.idempotency_key is not None:
            # the key is shared through Redis: off the event loop, so decisions do not wait
            decision = await run_in_threadpool(service.route, req)
        else:
            decision = engine.route(req)
        return _json(decision.to_dict())

    @app.post(
        "/v1/route/batch",
        response_model=list[RouteOut | ErrorOut],
        responses=errors,
        tags=["routing"],
    )
    async def route_batch(
        request: Request,
        body: Annotated[list[RouteIn], Field(min_length=1, max_length=MAX_BATCH)],
        who: Principal = caller,
    ) -> Response:
        """Route up to 1000 messages; each answer is a decision or that message's error. Each
        item may carry its own idempotency_key."""
        if KEY_HEADER in request.headers:
            raise _rejected(
                InvalidRequest(
                    f"a batch takes no {KEY_HEADER} header: give each message its own {KEY_FIELD}",
                    field=KEY_HEADER,
                )
            )
        reqs = [r.to_request() for r in body]
        reqs = [
            dataclasses.replace(r, tenant=who.tenant_for(r.tenant, f"[{i}].tenant"))
            for i, r in enumerate(reqs)
        ]
        if service.shared is not None and any(r.idempotency_key for r in reqs):
            answers = await run_in_threadpool(service.route_batch, reqs)
        else:
            answers = engine.route_batch(reqs)
        return _json(
            [
                a.to_dict() if isinstance(a, RouteDecision) else {"error": a.to_dict()}
                for a in answers
            ]
        )

    @app.post("/v1/outcomes", response_model=OutcomesOut, responses=errors, tags=["outcomes"])
    async def outcomes(
        body: OutcomeIn | Annotated[list[OutcomeIn], Field(min_length=1, max_length=MAX_BATCH)],
        who: Principal = reporter,
    ) -> Response:
        """Report submit results, receipts and conversions: one event or a list, all-or-nothing.
        A tenant's key reaches only that tenant's decisions (others' are unknown to it)."""
        events = [e.to_event() for e in (body if isinstance(body, list) else [body])]
        try:
            if service.shared is None:
                results = engine.record_outcomes(events, tenant=who.tenant)
            else:  # may wait on Redis: off the event loop, so decisions do not wait with it
                results = await run_in_threadpool(service.record_outcomes, events, who.tenant)
        except RoutingError as exc:
            engine.metrics.outcomes_refused.labels(exc.code).inc()
            raise
        return _json(
            {
                "recorded": results.count("recorded"),
                "duplicates": results.count("duplicate"),
                "late": results.count("late"),
                "results": results,
            }
        )

    @app.get("/v1/decisions/{decision_id}", responses=errors, tags=["routing"])
    async def decision(
        decision_id: Annotated[str, Path(pattern=ID_PATTERN)], who: Principal = reader
    ) -> Response:
        """A decision with its context, π over the eligible carriers, scores and outcomes."""
        return _json(engine.decision(decision_id, tenant=who.tenant))

    @app.get("/v1/carriers", tags=["carriers"])
    async def carriers(
        country: Annotated[str | None, Query(pattern=r"^[A-Z]{2}$")] = None,
        who: Principal = reader,
    ) -> Response:
        """The catalog with live scores per carrier and country (a tenant sees its carriers)."""
        tenant = engine.catalog.tenant(who.tenant) if who.tenant else None
        found = [
            c
            for c in engine.carriers(country)
            if who.tenant is None or (tenant is not None and tenant.may_use(c["id"]))
        ]
        return _json({"catalog_version": engine.catalog.version, "carriers": found})

    @app.post("/v1/carriers/{carrier_id}/pause", responses=errors, tags=["admin"])
    async def pause(
        carrier_id: Annotated[str, Path(pattern=ID_PATTERN)],
        body: PauseIn | None = None,
        _: Principal = admin,
    ) -> Response:
        """Take a carrier out of every eligible set."""
        service.pause(carrier_id, (body or PauseIn()).reason)
        return _json({"carrier": carrier_id, "paused": True})

    @app.post("/v1/carriers/{carrier_id}/resume", responses=errors, tags=["admin"])
    async def resume(
        carrier_id: Annotated[str, Path(pattern=ID_PATTERN)], _: Principal = admin
    ) -> Response:
        """Put a paused carrier back."""
        service.resume(carrier_id)
        return _json({"carrier": carrier_id, "paused": False})

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> Response:
        """Liveness and a few vital signs; `degraded` (still HTTP 200: decisions are served from
        the local state) while the shared Redis is away."""
        return _json(
            {
                **service.health(),
                "policy": engine.policy_label,
                "pending": len(engine.inflight),
                "event_clock": engine.clock,
                "catalog_version": engine.catalog.version,
                "auth": auth.status(),
            }
        )

    @app.get("/metrics", tags=["ops"])
    async def metrics(_: Principal = admin) -> Response:
        """Prometheus metrics (spend and traffic per carrier: admin scope when auth is on)."""
        engine.carriers()  # refreshes the per-carrier success gauges
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
