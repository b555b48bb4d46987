"""The wire contract: route requests, decisions and outcome events, as the engine takes them
(frozen dataclasses, epoch seconds) and as they travel over HTTP (pydantic models, RFC 3339),
with their limits and vocabularies.

The API validates with these models, the Python client writes and reads its JSON with them,
and sender workers use them without loading the engine (no numpy, no phonenumbers here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field

from features.clock import from_epoch, to_epoch
from router.contract.errors import InvalidRequest
from router.contract.redact import NoNumber

MAX_BATCH = 1000  # messages per /v1/route/batch, events per /v1/outcomes
ID_PATTERN = r"^[A-Za-z0-9_\-]{1,64}$"  # decision, carrier and tenant ids
SENDER_TYPES = ("alphanumeric", "numeric", "shortcode")
EVENTS = ("submit", "dlr", "conversion")

# Receipt statuses (SMPP 3.4 appendix B): final ones settle a decision.
FINAL_DLR = frozenset({"DELIVRD", "UNDELIV", "EXPIRED", "REJECTD", "DELETED", "UNKNOWN"})
INTERMEDIATE_DLR = frozenset({"ACCEPTD", "ENROUTE"})
DLR_STATUSES = FINAL_DLR | INTERMEDIATE_DLR
# The submit-result vocabulary (event "submit"): these words mean accepted; SMPP command_status
# names (ESME_R…) or numbers other than 0, and the sender's own failure words, mean the submit
# failed; anything else is refused, so a typo (or a receipt word such as ACCEPTD) is never
# learned as a failed submit. UNCONFIRMED (sent, no answer came: the carrier may have it, and
# the sender does not send it again) counts as accepted: the decision awaits its receipt until
# the deadline, and a carrier billing on submit is billed, since it most likely took the
# message; the word stays in the decision log so finance can count such submits.
SUBMIT_OK = frozenset({"ACCEPTED", "OK", "ESME_ROK", "SUCCESS", "0", "0X00000000", "UNCONFIRMED"})
SUBMIT_FAILURE_WORDS = frozenset(
    {
        "FAILED",
        "ERROR",
        "REJECTED",
        "TIMEOUT",
        "THROTTLED",
        "NO_LINK",
        "NOT_CONNECTED",
        "CONNECTION_LOST",
        "THROUGHPUT_CAP",
        "WINDOW_FULL",
        "CLOSED",
        "GENERIC_NACK",
    }
)
_COMMAND_STATUS = re.compile(r"ESME_R[A-Z0-9_]{1,24}|0X[0-9A-F]{1,8}|[0-9]{1,10}")

# Why an outcome's time was adjusted; senders may set the first ones, the router adds the rest.
TIME_FLAGS = frozenset(
    {
        "coarse",  # the carrier's time has minute precision: an interval, not a point
        "clock_offset",  # corrected by the carrier clock's estimated offset or time zone
        "no_date",  # the receipt had no usable date: the time it arrived
        "clamped",  # moved into [submit, arrival] by the sender
        "before_decision",  # the router moved it up to the decision's time
        "future",  # the router moved it back to its own clock (plus the accepted skew)
        "implausible",  # before 2000: the router used the decision's time
    }
)

# Idempotency keys of /v1/route (see router.core.idempotency for what they do).
KEY_FIELD = "idempotency_key"
KEY_HEADER = "Idempotency-Key"
KEY_RULE = "1 to 128 characters of A-Z, a-z, 0-9, '_', '.', ':' and '-'"
_KEY = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")


def submit_accepted(status: str | None) -> bool | None:
    """True (accepted), False (failed) or None (not a submit status word) for an upper-cased
    submit status; no status means accepted."""
    if status is None or status in SUBMIT_OK:
        return True
    if status in SUBMIT_FAILURE_WORDS or _COMMAND_STATUS.fullmatch(status):
        return False
    return None


def check_key(key: object, field: str = KEY_FIELD) -> str:
    """The key if it is well formed, else a 422 naming `field` (the value is not echoed)."""
    if not isinstance(key, str) or _KEY.fullmatch(key) is None:
        raise InvalidRequest(f"an idempotency key must be {KEY_RULE}", field=field)
    return key


# ---- what the engine takes and answers (epoch seconds) ----------------------------------------


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """One message to route; only `to` is required. `at` is event time (epoch seconds)."""

    to: str
    message_class: str = "otp"
    tenant: str | None = None
    sender_type: str = "alphanumeric"
    segments: int = 1
    mccmnc: str | None = None
    exclude: tuple[str, ...] = ()
    attempt: int = 1
    parent_decision_id: str | None = None
    at: float | None = None
    idempotency_key: str | None = None  # same key (per tenant), same decision: see idempotency


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """The engine's answer: a carrier, ranked fallbacks, and the exact propensity of the draw."""

    decision_id: str
    carrier: str
    fallbacks: list[str]
    propensity: float
    policy: str
    context: dict[str, Any]
    at: float

    def to_dict(self) -> dict[str, Any]:
        """The API's JSON body."""
        return {
            "decision_id": self.decision_id,
            "carrier": self.carrier,
            "fallbacks": self.fallbacks,
            "propensity": self.propensity,
            "policy": self.policy,
            "context": self.context,
            "at": from_epoch(self.at).isoformat(),
        }


@dataclass(frozen=True, slots=True)
class OutcomeEvent:
    """A submit result, a delivery receipt, or an OTP conversion for one decision."""

    decision_id: str
    event: str
    status: str | None = None
    error_code: str | None = None
    cost: float | None = None
    currency: str | None = None
    at: float | None = None
    at_earliest: float | None = None  # a coarse time: the event lies in [at_earliest, at_latest]
    at_latest: float | None = None
    source_at: float | None = None  # the time as the carrier stated it, before any adjustment
    at_flag: str | None = None  # how the time was adjusted: comma-separated words (TIME_FLAGS)


# ---- how they travel (JSON) ----------------------------------------------------------------


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


def _key(value: Any) -> Any:
    if isinstance(value, str):
        try:
            check_key(value)
        except InvalidRequest:
            raise ValueError(f"must be {KEY_RULE}") from None
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Number = Annotated[float, BeforeValidator(_not_bool)]
IdempotencyKey = Annotated[str, BeforeValidator(_key)]


def _epoch(at: datetime | None) -> float | None:
    return None if at is None else to_epoch(at)


def _time(at: float | None) -> datetime | None:
    return None if at is None else from_epoch(at)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class RouteIn(_Body):
    """A message to route. Only `to` is required."""

    to: str = Field(min_length=1, max_length=32, description="Destination in E.164, e.g. +7916…")
    message_class: str = Field("otp", min_length=1, max_length=32)
    tenant: str | None = Field(None, min_length=1, max_length=64)
    sender_type: Literal["alphanumeric", "numeric", "shortcode"] = "alphanumeric"
    segments: Int = Field(1, ge=1, le=255)
    mccmnc: str | None = Field(None, pattern=r"^\d{5,6}$")
    exclude: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=64)
    attempt: Int = Field(1, ge=1, le=20)
    parent_decision_id: str | None = Field(None, pattern=ID_PATTERN)
    at: AwareDatetime | None = Field(None, description="Event time (RFC 3339); default: now")
    idempotency_key: IdempotencyKey | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.:\-]{1,128}$",
        description="The same key (per tenant) gives the same decision, logged once, for the "
        "class's DLR timeout (event time); with another request it is a 409 "
        "idempotency_conflict. Or the Idempotency-Key header (on /v1/route)",
    )

    @classmethod
    def of(cls, r: RouteRequest) -> RouteIn:
        """The body for an engine request, unchecked (the router checks it, and answers which
        field is wrong)."""
        return cls.model_construct(
            to=r.to,
            message_class=r.message_class,
            tenant=r.tenant,
            sender_type=r.sender_type,
            segments=r.segments,
            mccmnc=r.mccmnc or None,
            exclude=list(r.exclude),
            attempt=r.attempt,
            parent_decision_id=r.parent_decision_id or None,
            at=_time(r.at),
            idempotency_key=r.idempotency_key,
        )

    def to_request(self) -> RouteRequest:
        """The engine's request."""
        return RouteRequest(
            self.to,
            self.message_class,
            self.tenant,
            self.sender_type,
            self.segments,
            self.mccmnc,
            tuple(self.exclude),
            self.attempt,
            self.parent_decision_id,
            _epoch(self.at),
            self.idempotency_key,
        )


class RouteContext(BaseModel):
    """The features the decision was made on."""

    country: str
    operator: str
    local_hour: int
    weekday: int
    mccmnc: str | None


class RouteOut(BaseModel):
    """A decision: the carrier, ranked fallbacks, and the exact propensity of the draw."""

    decision_id: str
    carrier: str
    fallbacks: list[str]
    propensity: float
    policy: str
    context: RouteContext
    at: datetime

    def to_decision(self) -> RouteDecision:
        """The engine's decision, as a client holds it."""
        return RouteDecision(
            self.decision_id,
            self.carrier,
            self.fallbacks,
            self.propensity,
            self.policy,
            self.context.model_dump(),
            to_epoch(self.at),
        )


class ErrorBody(BaseModel):
    """What went wrong, naming the field."""

    code: str
    message: str
    field: str | None = None
    details: dict[str, Any] | None = None


class ErrorOut(BaseModel):
    """An error answer."""

    error: ErrorBody


class OutcomeIn(_Body):
    """A submit result, a delivery receipt (SMPP 3.4 status) or an OTP conversion."""

    decision_id: str = Field(pattern=ID_PATTERN)
    event: Literal["submit", "dlr", "conversion"]
    status: NoNumber | None = Field(
        None,
        max_length=32,
        description="dlr: DELIVRD, UNDELIV, EXPIRED, REJECTD, DELETED, "
        "UNKNOWN, ACCEPTD, ENROUTE; submit: ACCEPTED or the error",
    )
    error_code: NoNumber | None = Field(None, max_length=32)
    cost: Number | None = Field(None, ge=0, le=1000, allow_inf_nan=False)
    currency: str | None = Field(None, pattern=r"^[A-Z]{3}$")
    at: AwareDatetime | None = Field(
        None,
        description="Event time (RFC 3339); default: now. Never refused for its value: one "
        "before the decision or past the router's clock is clamped and flagged (at_flag)",
    )
    at_earliest: AwareDatetime | None = Field(
        None, description="With at_latest: a coarse time (a receipt with minute precision)"
    )
    at_latest: AwareDatetime | None = None
    source_at: AwareDatetime | None = Field(
        None, description="The time as the carrier stated it, before the sender adjusted it"
    )
    at_flag: str | None = Field(
        None,
        pattern=r"^[a-z_]{1,24}(,[a-z_]{1,24}){0,7}$",
        description="How the sender adjusted `at`: coarse, clock_offset, no_date, clamped",
    )

    @classmethod
    def of(cls, e: OutcomeEvent) -> OutcomeIn:
        """The body for an engine event, unchecked (the router checks it)."""
        return cls.model_construct(
            decision_id=e.decision_id,
            event=e.event,
            status=e.status,
            error_code=e.error_code,
            cost=e.cost,
            currency=e.currency,
            at=_time(e.at),
            at_earliest=_time(e.at_earliest),
            at_latest=_time(e.at_latest),
            source_at=_time(e.source_at),
            at_flag=e.at_flag,
        )

    def to_event(self) -> OutcomeEvent:
        """The engine's event."""
        return OutcomeEvent(
            self.decision_id,
            self.event,
            self.status,
            self.error_code,
            self.cost,
            self.currency,
            _epoch(self.at),
            _epoch(self.at_earliest),
            _epoch(self.at_latest),
            _epoch(self.source_at),
            self.at_flag,
        )


class OutcomesOut(BaseModel):
    """Per event: recorded, duplicate (changed nothing) or late (recorded, not learned)."""

    recorded: int
    duplicates: int
    late: int
    results: list[Literal["recorded", "duplicate", "late"]]


class PauseIn(_Body):
    """Why a carrier is paused."""

    reason: NoNumber = Field("paused by an operator", max_length=200)
