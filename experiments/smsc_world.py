"""A simulated SMSC behaviour built from the simulator world (`experiments.world.World`).

The world says what really happens to a message sent through a carrier: accepted or rejected,
its receipts and their event times, a conversion if the tenant reports them, and the truth
(delivered or not, whatever the receipt says). The SMSC only needs the first two; conversions go
to a hook and the truth is kept per message id, both for the demo to report later.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from carriers.smsc.server import ESME_RINVDSTADR, ESME_RSUBMITFAIL, Fate, PlannedReceipt, Submission
from experiments.world import Message, Truth, World
from features import DestinationParser, InvalidNumber, UnknownMccMnc, local_hour_weekday

# Network error codes the receipts carry per status (GSM MAP-style: 001 unknown subscriber,
# 027 absent subscriber).
ERROR_CODES = {"DELIVRD": "000", "UNDELIV": "001", "EXPIRED": "027"}

ConversionHook = Callable[[str, float], None]


class WorldBehaviour:
    """Answers submits to one carrier as the world would; `truths[message_id]` keeps what
    really happened, and `on_conversion(message_id, at)` hears of each conversion in advance
    (at its future event time)."""

    def __init__(
        self,
        world: World,
        carrier_id: str,
        rng: np.random.Generator,
        *,
        tenant: str = "default",
        message_class: str = "otp",
        on_conversion: ConversionHook | None = None,
        reject_status: int = ESME_RSUBMITFAIL,
    ) -> None:
        if carrier_id not in world.catalog.carriers:
            raise ValueError(f"unknown carrier {carrier_id!r} for this world")
        self.world = world
        self.carrier_id = carrier_id
        self.rng = rng
        self.tenant = tenant
        self.message_class = message_class
        self.on_conversion = on_conversion
        self.reject_status = reject_status
        self.truths: dict[str, Truth] = {}
        self._parser = DestinationParser(world.catalog.directory)
        self._lock = threading.Lock()

    def __call__(self, submission: Submission) -> Fate:
        """The fate of one submitted message (see `carriers.smsc.server.Behaviour`)."""
        to = submission.destination
        try:
            dest = self._parser.parse(to if to.startswith("+") else f"+{to}")
        except (InvalidNumber, UnknownMccMnc):
            return Fate.reject(ESME_RINVDSTADR)
        hour, _ = local_hour_weekday(submission.at, dest.timezone)
        msg = Message(
            submission.at,
            dest.e164,
            dest.country,
            dest.mccmnc or "",
            self.tenant,
            self.message_class,
        )
        with self._lock:
            events, truth = self.world.send(self.carrier_id, msg, hour, self.rng)
            self.truths[submission.message_id] = truth
        if any(e.event == "submit" and e.status == "REJECTED" for e in events):
            return Fate.reject(self.reject_status)
        for e in events:
            if e.event == "conversion" and self.on_conversion is not None:
                self.on_conversion(submission.message_id, e.at)
        return Fate.accept(
            *(
                PlannedReceipt(e.at - submission.at, e.status, ERROR_CODES.get(e.status, "000"))
                for e in events
                if e.event == "dlr" and e.status is not None
            )
        )


def world_behaviour(
    world: World,
    carrier_id: str,
    rng: np.random.Generator,
    *,
    tenant: str = "default",
    message_class: str = "otp",
    on_conversion: ConversionHook | None = None,
    reject_status: int = ESME_RSUBMITFAIL,
) -> WorldBehaviour:
    """The behaviour of `carrier_id` in `world`, for `SimulatedSMSC(carrier_id, behaviour)`."""
    return WorldBehaviour(
        world,
        carrier_id,
        rng,
        tenant=tenant,
        message_class=message_class,
        on_conversion=on_conversion,
        reject_status=reject_status,
    )
