"""The serving process: engine, decision log, MLflow run, snapshots and the event-time clock."""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from carriers.catalog import EXAMPLE_CATALOG, load_catalog
from router.contract.errors import RoutingError
from router.contract.messages import OutcomeEvent, RouteDecision, RouteRequest
from router.core.config import DEFAULT_POLICY_FILE, load_config
from router.core.engine import EngineOptions, RoutingEngine
from router.log.decision_log import DecisionLog
from router.log.snapshot import read_snapshot, write_snapshot
from router.log.tracking import (
    RunLocks,
    ServingRun,
    default_artifact_location,
    default_tracking_uri,
)
from router.replicas.capacity import SharedCaps
from router.replicas.identity import cluster_hmac_key, configured_key
from router.replicas.redis_bus import connect
from router.replicas.shared_state import SharedSettings, SharedState

log = logging.getLogger(__name__)


@dataclass
class ServiceSettings:
    """What `router serve` is started with."""

    data_dir: Path = Path("data")
    catalog: Path = EXAMPLE_CATALOG
    policy_file: Path = DEFAULT_POLICY_FILE
    policy: str | None = None
    tracking_uri: str | None = None
    experiment: str = "sms-routing-serving"
    mlflow: bool = True
    seed: int | None = None
    snapshot_seconds: float = 30.0
    metrics_seconds: float = 60.0
    log_max_rows: int = 50_000
    log_max_age_seconds: float = 300.0
    max_future_skew_seconds: float | None = 300.0
    hmac_key: bytes | None = field(default=None, repr=False)
    shared: SharedSettings | None = None  # replicas sharing state on Redis; None: embedded


def load_hmac_key(data_dir: Path) -> bytes:
    """The key for phone-number HMACs: $ROUTER_HMAC_KEY, else a key file made on first start."""
    env = os.environ.get("ROUTER_HMAC_KEY")
    if env:
        return env.encode()
    path = data_dir / "hmac.key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_hex(32).encode())
    return path.read_bytes().strip()


class RouterService:
    """Owns one engine and everything around it; `tick()` is called periodically by the server."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = s = settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        catalog = load_catalog(s.catalog)
        config = load_config(s.policy_file)
        if s.policy and s.policy != config.policy:
            config = config.with_policy(s.policy)
        if s.seed is not None:
            config = config.with_seed(s.seed)
        self.run: ServingRun | None = None
        self.run_locks = RunLocks(s.data_dir / "runs")
        # segments rolled before the MLflow run exists: dead writers' journals recovered below
        self._early_segments: list[tuple[str, Path]] | None = []
        self.log = DecisionLog(
            s.data_dir / "decision_log",
            max_rows=s.log_max_rows,
            max_age_seconds=s.log_max_age_seconds,
            on_roll=self._on_roll,
            validate=False,  # rows built by the engine itself; their shape is under test
        )
        self.shared = SharedState(s.shared, s.data_dir) if s.shared else None
        self.caps: SharedCaps | None = None  # carrier caps shared by the replicas (issue 13.5)
        options = EngineOptions(
            hmac_key=self._hmac_key(),
            max_future_skew_seconds=s.max_future_skew_seconds,
            replica=self.shared.replica if self.shared else "",
            id_seed=self.shared.id_seed if self.shared else None,
        )
        self.engine = RoutingEngine(
            catalog,
            config,
            options,
            log_decision=self._log_decision if self.shared else self.log.log_decision,
            log_outcome=self.log.log_outcome,
        )
        self.snapshot_path = s.data_dir / "state.json"
        state = None if self.shared else read_snapshot(self.snapshot_path)
        if self.shared:
            self.shared.start(self.engine)
            self.caps = self._start_shared_caps()
        elif state is not None:
            self.engine.load_state(state)
            log.info(
                "restored %d decisions in flight from %s",
                len(self.engine.inflight),
                self.snapshot_path,
            )
        self.tracking_uri = s.tracking_uri or default_tracking_uri(s.data_dir)
        if s.mlflow:
            self.run = ServingRun(
                tracking_uri=self.tracking_uri,
                experiment=s.experiment,
                run_name=f"serve-{self.engine.policy_label}",
                params={
                    "policy": config.policy,
                    "policy_version": self.engine.policy.version,
                    **{f"policy.{k}": v for k, v in self.engine.policy.params().items()},
                    **{f"model.{k}": v for k, v in vars(config.model).items()},
                    "catalog": str(s.catalog),
                    "catalog_version": catalog.version,
                },
                tags={"role": "serving"},
                artifact_location=None if s.tracking_uri else default_artifact_location(s.data_dir),
            )
            self._attach_recovered()
        self._early_segments = None
        now = time.monotonic()
        self._anchor = (self.engine.clock, now)
        self._last_snapshot = now
        self._last_metrics = now
        self._metrics_step = 0

    def _start_shared_caps(self) -> SharedCaps:
        """Carrier throughput caps as one budget for the cluster (router.replicas.capacity)."""
        shared, s = self.shared, self.settings.shared
        assert shared is not None and s is not None
        caps = SharedCaps(
            connect(s.url, s.socket_timeout, s.cluster),
            s.prefix,
            shared.instance,
            self.settings.data_dir,
        )
        caps.start(lambda: list(self.engine.catalog.carriers.values()))
        self.engine.eligibility.shared_caps = caps
        return caps

    def _hmac_key(self) -> bytes:
        """The phone-number HMAC key: configured, else the cluster's from Redis (one identity
        per cluster, router.replicas.identity), else (embedded) the data folder's key file."""
        s = self.settings
        if self.shared is None or s.shared is None:
            return s.hmac_key or load_hmac_key(s.data_dir)
        return cluster_hmac_key(
            self.shared.bus.client, s.shared.prefix, s.data_dir, s.hmac_key or configured_key()
        )

    def _log_decision(self, row: dict) -> None:
        """Log a decision and queue it for the other replicas."""
        self.log.log_decision(row)
        if self.shared is not None:
            self.shared.on_decision(row)

    def route(self, req: RouteRequest) -> RouteDecision:
        """One decision; a keyed request goes through the shared state (the key is shared by
        the replicas), any other straight to the engine (no Redis on its path)."""
        if self.shared is not None and req.idempotency_key is not None:
            answer = self.shared.route_batch([req])[0]
            if isinstance(answer, RoutingError):
                raise answer
            return answer
        return self.engine.route(req)

    def route_batch(self, reqs: list[RouteRequest]) -> list[RouteDecision | RoutingError]:
        """Decisions (or per-message errors); keyed requests as in `route`."""
        if self.shared is not None and any(r.idempotency_key for r in reqs):
            return self.shared.route_batch(reqs)
        return self.engine.route_batch(reqs)

    def record_outcomes(self, events: list[OutcomeEvent], tenant: str | None = None) -> list[str]:
        """Accept outcome events: on the engine, or through the shared state with replicas."""
        if self.shared is not None:
            return self.shared.record_outcomes(events, tenant)
        return self.engine.record_outcomes(events, tenant)

    def pause(self, carrier_id: str, reason: str) -> None:
        """Take a carrier out of every eligible set, on every replica."""
        self.engine.pause(carrier_id, reason)
        if self.shared is not None:
            self.shared.on_action(carrier_id, True, reason)

    def resume(self, carrier_id: str) -> None:
        """Put a paused carrier back, on every replica."""
        self.engine.resume(carrier_id)
        if self.shared is not None:
            self.shared.on_action(carrier_id, False)

    def health(self) -> dict:
        """`ok`, or `degraded` with the reason (Redis away: decisions still served locally)."""
        if self.shared is None:
            return {"status": "ok"}
        shared = self.shared.health()
        if self.caps is not None:
            shared["carrier_caps"] = self.caps.health()
        return {"status": "ok" if shared["redis"] == "up" else "degraded", "shared": shared}

    def _on_roll(self, stream: str, path: Path) -> None:
        if self.run is not None:
            self.run.log_segment(path, stream)
        elif self._early_segments is not None:
            self._early_segments.append((stream, path))

    def _attach_recovered(self) -> None:
        """Crash recovery reaches MLflow (issue 13.2). The decision log turns dead writers'
        journals into segments before this process's run exists; each such segment goes to
        the run of the process that wrote it (named in the journal's owner file), else (a
        writer that declared none) to this run. Runs of dead processes (their lock in
        `<data-dir>/runs/` held by nobody) are ended KILLED and tagged
        `router.recovered_by=<this run>`; this run is tagged `router.recovered_from`."""
        run = self.run
        if run is None or run.run_id is None:
            return
        own = run.run_id
        dead = set(self.run_locks.dead())
        self.run_locks.hold(own)
        self.log.set_owner(own)
        for stream, path in self._early_segments or []:
            owner = self.log.recovered_owner(path)
            if owner is not None and owner != own:
                run.log_segment_to(owner, path, stream)
                dead.add(owner)
            else:
                run.log_segment(path, stream)
        for run_id in sorted(dead):
            log.warning("MLflow run %s belonged to a process that died: ending it KILLED", run_id)
            run.end_dead_run(
                run_id, {"router.recovered_by": own, "router.end": "process died; recovered"}
            )
        if dead:
            run.set_tags({"router.recovered_from": ",".join(sorted(dead))})

    def event_clock(self) -> float:
        """Event time now: the latest event's time, moved on by the wall time since it came."""
        anchor_event, anchor_mono = self._anchor
        projected = anchor_event + (time.monotonic() - anchor_mono)
        if self.engine.clock > projected or anchor_event <= 0:
            self._anchor = (self.engine.clock, time.monotonic())
            return self.engine.clock
        return projected

    def tick(self) -> None:
        """Fire due timers, roll due log segments, snapshot and log metrics when due."""
        clock = self.event_clock()
        if clock > 0:
            self.engine.advance(clock)
        self.log.roll_due()
        now = time.monotonic()
        if now - self._last_snapshot >= self.settings.snapshot_seconds:
            self.snapshot()
        if self.run is not None and now - self._last_metrics >= self.settings.metrics_seconds:
            self.log_metrics()

    def snapshot(self) -> None:
        """Write the engine's state to the snapshot file (with stream positions when shared)."""
        if self.shared is not None:
            self.shared.write_local_snapshot()
        else:
            write_snapshot(self.snapshot_path, self.engine.state_dict())
        self._last_snapshot = time.monotonic()

    def log_metrics(self) -> None:
        """Send the serving totals to the MLflow run."""
        self._last_metrics = time.monotonic()
        if self.run is not None:
            self._metrics_step += 1
            self.run.log_metrics(self.engine.stats.metrics(), step=self._metrics_step)

    def close(self) -> None:
        """Flush everything: the open log segments, a last snapshot, the MLflow run."""
        if self.shared is not None:
            # first: publishing what is queued writes the rows of outcomes that waited for
            # Redis's verdict into the log
            try:
                if self.caps is not None:
                    self.caps.stop()
                self.shared.close()  # publishes what is queued and snapshots locally
            finally:
                self.log.close()
        else:
            self.log.close()
            self.snapshot()
        if self.run is not None:
            self.log_metrics()
            self.run.close()
            self.run_locks.release()
