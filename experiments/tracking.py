"""MLflow helpers shared by the experiment runners: the experiment to log under, and a run's
params and finite metrics in one batch."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient


def mlflow_experiment(client: MlflowClient, name: str, artifact_location: str) -> str:
    """The id of the named experiment: created, or restored if it was deleted."""
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name, artifact_location=artifact_location)
    if found.lifecycle_stage == "deleted":
        client.restore_experiment(found.experiment_id)
    return found.experiment_id


def log_values(
    client: MlflowClient, run_id: str, params: Mapping[str, Any], metrics: Mapping[str, float]
) -> None:
    """Params and the finite metrics of a run, in one batch."""
    stamp = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), stamp, 0) for k, v in metrics.items() if math.isfinite(v)],
        params=[Param(k, str(v)[:6000]) for k, v in params.items()],
    )
