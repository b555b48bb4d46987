"""The serving policy's MLflow run: decision-log segments and live metrics, logged off-thread.

The run is created up front; every later MLflow call runs on one background thread fed by a
queue, so the decision path never waits for MLflow, and an MLflow outage is logged and counted
but never raised to the caller (the segments stay on disk either way). An explicit
`MlflowClient` is used instead of MLflow's global fluent state, so several runs and tracking URIs
can coexist in one process.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

logger = logging.getLogger(__name__)

_Task = tuple[str, Callable[[], object]]
_TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")


def default_tracking_uri(data_dir: Path) -> str:
    """The embedded default tracking store: a SQLite file in the data directory."""
    return f"sqlite:///{Path(data_dir).resolve() / 'mlflow.db'}"


def default_artifact_location(data_dir: Path) -> str:
    """The embedded default artifact root: `mlartifacts` in the data directory, as a file URI."""
    return (Path(data_dir).resolve() / "mlartifacts").as_uri()


class ServingRun:
    """The serving policy's MLflow run; logs segments, metrics and dicts on a background thread.

    If the run cannot be created (bad URI, store down), the constructor logs the failure and the
    object stays usable: `run_id` is None and every later call fails quietly, counted in `errors`.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        params: Mapping[str, object],
        tags: Mapping[str, str] | None = None,
        artifact_location: str | None = None,
    ) -> None:
        self.errors = 0
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._run_id: str | None = None
        try:
            self._start(tracking_uri, experiment, run_name, params, tags or {}, artifact_location)
        except Exception:
            self.errors += 1
            logger.exception("could not start MLflow run %r at %s", run_name, tracking_uri)
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._pending = 0
        self._idle = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"mlflow-{run_name}", daemon=True)
        self._thread.start()

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None if the run could not be created."""
        return self._run_id

    @property
    def experiment_id(self) -> str | None:
        """The MLflow experiment id; None if it could not be found or created."""
        return self._experiment_id

    def log_segment(self, path: Path, stream: str) -> None:
        """Queue a decision-log segment as an artifact under `decision_log/<stream>`."""
        local = str(path)
        self._submit(
            "log_segment",
            lambda client, run_id: client.log_artifact(
                run_id, local, artifact_path=f"decision_log/{stream}"
            ),
        )

    def log_segment_to(self, run_id: str, path: Path, stream: str) -> None:
        """Queue a segment as an artifact of another run of the same store (a dead process's
        run, whose journal this process turned into a segment)."""
        local = str(path)
        self._submit(
            "log_segment_to",
            lambda client, _: client.log_artifact(
                run_id, local, artifact_path=f"decision_log/{stream}"
            ),
        )

    def end_dead_run(self, run_id: str, tags: Mapping[str, str], status: str = "KILLED") -> None:
        """Queue: tag another run (a dead process's) and end it with `status` if it is still
        RUNNING (a run already ended keeps its status)."""
        values = {k: str(v) for k, v in tags.items()}

        def end(client: MlflowClient, _: str) -> None:
            for key, value in values.items():
                client.set_tag(run_id, key, value)
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status)

        self._submit("end_dead_run", end)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Queue tags for this run."""
        values = {k: str(v) for k, v in tags.items()}
        self._submit(
            "set_tags",
            lambda client, run_id: [client.set_tag(run_id, k, v) for k, v in values.items()],
        )

    def log_metrics(
        self, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None
    ) -> None:
        """Queue metrics at one step (timestamp: now unless given)."""
        stamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        values = dict(metrics)
        self._submit(
            "log_metrics",
            lambda client, run_id: client.log_batch(
                run_id, metrics=[Metric(k, float(v), stamp, step) for k, v in values.items()]
            ),
        )

    def log_dict(self, obj: Mapping[str, Any], artifact_file: str) -> None:
        """Queue a JSON or YAML artifact (by the file's extension) of a copy of `obj`."""
        snapshot = copy.deepcopy(obj)
        self._submit(
            "log_dict", lambda client, run_id: client.log_dict(run_id, snapshot, artifact_file)
        )

    def flush(self, timeout: float = 30) -> bool:
        """Wait until everything queued so far is done; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, status: str = "FINISHED", timeout: float = 30) -> None:
        """Flush, mark the run terminated with `status`, and stop the background thread."""
        if status not in _TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {_TERMINAL_STATUSES}, got {status!r}")
        with self._idle:
            if self._closed:
                return
            self._enqueue(
                "set_terminated", lambda client, run_id: client.set_terminated(run_id, status)
            )
            self._closed = True
            self._queue.put(None)
        if not self.flush(timeout):
            logger.warning(
                "MLflow run %s: %d call(s) still pending at close", self._run_id, self._pending
            )
        self._thread.join(timeout)

    def _start(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        params: Mapping[str, object],
        tags: Mapping[str, str],
        artifact_location: str | None,
    ) -> None:
        """Create (or reuse) the experiment, create the run, log its params."""
        self._client = MlflowClient(tracking_uri)
        self._experiment_id = _experiment_id(self._client, experiment, artifact_location)
        run = self._client.create_run(
            self._experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()}
        )
        self._run_id = run.info.run_id
        self._client.log_batch(
            self._run_id, params=[Param(str(k), _param_value(v)) for k, v in params.items()]
        )

    def _submit(self, name: str, call: Callable[[MlflowClient, str], object]) -> None:
        """Queue one MLflow call; dropped with a warning once the run is closed."""
        with self._idle:
            if self._closed:
                logger.warning("MLflow run %s is closed; dropping %s", self._run_id, name)
                return
            self._enqueue(name, call)

    def _enqueue(self, name: str, call: Callable[[MlflowClient, str], object]) -> None:
        """Put a call on the queue (caller holds the lock), bound to the client and run."""
        self._pending += 1
        self._queue.put((name, lambda: call(*self._target())))

    def _target(self) -> tuple[MlflowClient, str]:
        """The client and run id, or an error if the run was never created."""
        if self._client is None or self._run_id is None:
            raise RuntimeError("no MLflow run: creating it failed")
        return self._client, self._run_id

    def _work(self) -> None:
        """The background thread: run queued calls in order until the stop marker."""
        while (task := self._queue.get()) is not None:
            name, call = task
            try:
                call()
            except Exception as exc:
                self.errors += 1
                logger.error(
                    "MLflow %s failed for run %s: %s",
                    name,
                    self._run_id,
                    exc,
                    exc_info=self._run_id is not None,  # without a run, the cause is known
                )
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()


class RunLocks:
    """Which serving runs of a data folder belong to live processes: each live process holds an
    exclusive `flock` on `<folder>/<run_id>.lock` for its lifetime, so a lock file nobody holds
    names a run whose process died (SIGKILL, OOM, power) and was never ended."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None

    def hold(self, run_id: str) -> None:
        """Mark `run_id` live until this process exits (or `release`)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"{run_id}.lock"
        tmp = self.folder / f".{run_id}.{os.getpid()}.tmp"  # locked before it has its name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(tmp, final)
        self._fd = fd

    def dead(self) -> list[str]:
        """Claim and remove the lock files of dead processes; their run ids."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in sorted(self.folder.glob("*.lock")):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live process's
            else:
                if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
                    path.unlink(missing_ok=True)
                    found.append(path.stem)
            finally:
                os.close(fd)
        return found

    def release(self) -> None:
        """Remove this process's lock file (a clean stop: its run is ended by `close`)."""
        if self._fd is None:
            return
        for path in self.folder.glob("*.lock"):
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == os.fstat(self._fd).st_ino:
                    path.unlink()
        os.close(self._fd)
        self._fd = None


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of the named experiment, created (or restored) if needed."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # created by a concurrent process
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def _param_value(value: object) -> str:
    """A parameter value as a string within MLflow's length limit."""
    text = str(value)
    return text if len(text) <= MAX_PARAM_VAL_LENGTH else text[: MAX_PARAM_VAL_LENGTH - 3] + "..."
