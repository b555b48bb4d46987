"""Message classes and the reward the engine optimises: value·success − cost − latency penalty."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class MessageClass:
    """What a delivered message of one class is worth and how fast it must arrive.

    `success` is "delivered within `sla_seconds`" (or "converted", for tenants that report
    conversions). The learner knows the answer at `sla_seconds + grace_seconds`; the record stays
    open for late receipts until `dlr_timeout_seconds`, and for conversions until
    `conversion_window_seconds`.
    """

    name: str
    value: float
    sla_seconds: float
    latency_penalty_per_second: float = 0.0
    grace_seconds: float = 10.0
    conversion_window_seconds: float = 600.0
    dlr_timeout_seconds: float = 48 * 3600.0

    def __post_init__(self) -> None:
        for field in (
            "value",
            "sla_seconds",
            "latency_penalty_per_second",
            "grace_seconds",
            "conversion_window_seconds",
            "dlr_timeout_seconds",
        ):
            if getattr(self, field) < 0:
                raise ValueError(f"message class {self.name!r}: {field} must be >= 0")
        if self.sla_seconds <= 0:
            raise ValueError(f"message class {self.name!r}: sla_seconds must be > 0")
        if self.dlr_timeout_seconds < self.sla_seconds + self.grace_seconds:
            raise ValueError(
                f"message class {self.name!r}: dlr_timeout_seconds must be at least "
                "sla_seconds + grace_seconds"
            )

    @property
    def learner_deadline_seconds(self) -> float:
        """Seconds after the decision at which the learner's answer is known."""
        return self.sla_seconds + self.grace_seconds

    def reward(self, success: float, cost: float, latency_s: float | None) -> float:
        """Reward of one message; the latency penalty counts only for a delivered message."""
        penalty = 0.0
        if latency_s is not None:
            penalty = self.latency_penalty_per_second * min(latency_s, self.sla_seconds)
        return self.value * success - cost - penalty


def reward_array(
    value: np.ndarray,
    success: np.ndarray,
    cost: np.ndarray,
    latency_s: np.ndarray,
    sla_seconds: np.ndarray,
    latency_penalty_per_second: np.ndarray,
) -> np.ndarray:
    """Vectorised `MessageClass.reward`; NaN latency means "not delivered" (no penalty)."""
    lat = np.where(np.isnan(latency_s), 0.0, np.minimum(latency_s, sla_seconds))
    return value * success - cost - latency_penalty_per_second * lat


DEFAULT_CLASSES: dict[str, MessageClass] = {
    "otp": MessageClass(
        "otp",
        value=0.10,
        sla_seconds=60,
        latency_penalty_per_second=0.0002,
        grace_seconds=10,
        conversion_window_seconds=600,
    ),
    "transactional": MessageClass(
        "transactional",
        value=0.06,
        sla_seconds=300,
        latency_penalty_per_second=0.00002,
        grace_seconds=30,
    ),
    "marketing": MessageClass(
        "marketing", value=0.03, sla_seconds=3600, latency_penalty_per_second=0.0, grace_seconds=60
    ),
}


def classes_from_config(raw: Mapping[str, Mapping[str, Any]]) -> dict[str, MessageClass]:
    """Build message classes from a mapping such as the policy file's `message_classes`."""
    classes: dict[str, MessageClass] = {}
    for name, spec in raw.items():
        if not isinstance(spec, Mapping):
            raise ValueError(f"message class {name!r}: expected a mapping of settings")
        unknown = set(spec) - (set(MessageClass.__dataclass_fields__) - {"name"})
        if unknown:
            raise ValueError(f"message class {name!r}: unknown setting(s) {sorted(unknown)}")
        try:
            classes[name] = MessageClass(name=name, **{k: float(v) for k, v in spec.items()})
        except TypeError as exc:
            raise ValueError(f"message class {name!r}: {exc}") from exc
    return classes
