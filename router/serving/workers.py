"""`router serve --workers N`: N uvicorn worker processes, each a replica on the shared Redis.

Worker processes cannot share one engine in memory, so they share learned state the way separate
hosts do (router.replicas.shared_state); without Redis each would learn alone, which is refused. The
parent prepares what the workers would otherwise race for (the HMAC key file, the MLflow store
and experiment) and passes the parsed options to the workers' app factory in the environment.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from fastapi import FastAPI

ARGS_ENV = "ROUTER_SERVE_ARGS"


class WorkersNeedRedis(SystemExit):
    """More than one worker without Redis: they could not learn as one."""


def serve_workers(args: argparse.Namespace) -> int:
    """Run `args.workers` uvicorn workers of `app_from_env` (needs a Redis URL)."""
    from router.http.server import serve
    from router.serving.app import connection_limits

    if not args.redis_url:
        raise WorkersNeedRedis(
            "router: --workers > 1 needs shared state: give --redis-url (or set REDIS_URL); "
            "worker processes do not share memory, so without Redis each would learn alone"
        )
    _prepare(args)
    os.environ[ARGS_ENV] = json.dumps({k: v for k, v in vars(args).items() if k != "func"})
    return serve(
        "router.serving.workers:app_from_env",
        limits=connection_limits(args),
        factory=True,
        workers=args.workers,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
    )


def app_from_env() -> FastAPI:
    """Each worker's application, from the options the parent left in the environment."""
    from router.serving.app import build_app

    return build_app(argparse.Namespace(**json.loads(os.environ[ARGS_ENV])))


def _prepare(args: argparse.Namespace) -> None:
    """Create once, before the workers start, what they would race to create."""
    from router.log.tracking import default_tracking_uri
    from router.serving.service import load_hmac_key

    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if args.redis_url:  # the cluster's key: checked (or made) once here, refused before forking
        from router.replicas.identity import cluster_hmac_key, configured_key
        from router.replicas.redis_bus import connect

        client = connect(args.redis_url, cluster=args.redis_cluster)
        try:
            cluster_hmac_key(client, args.redis_prefix, data_dir, configured_key())
        finally:
            client.close()
    else:
        load_hmac_key(data_dir)
    if args.no_mlflow:
        return
    from mlflow.tracking import MlflowClient

    # A new SQLite store is migrated on first use: once here, not by every worker at once.
    MlflowClient(args.tracking_uri or default_tracking_uri(data_dir)).search_experiments(
        max_results=1
    )
