"""`router deadletters list|replay`: read the outcome events the router refused, post them again.

The store is the one `router worker` writes: Redis (`--redis-url`, default $REDIS_URL, keys under
`--outcomes-key`) or the `deadletters.jsonl` file under `--data-dir`. `replay` posts each letter
again: one the router takes (recorded, duplicate or late) leaves the store; one it refuses again
stays, with the new reason and one more attempt. Exit status: 0 when every letter replayed was
taken, 1 when some were refused again or the router could not be reached, 2 on bad options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import redis

from carriers.sender.deadletters import (
    DEAD_LETTER_FILE,
    DeadLetter,
    DeadLetterStore,
    FileDeadLetters,
    RedisDeadLetters,
)
from carriers.sender.journal import DEFAULT_KEY
from router.contract.client import RouterClient
from router.contract.errors import RoutingError


def build_parser(sub: Any) -> None:
    """Add the `deadletters` verb to the `router` command."""
    p = sub.add_parser("deadletters", help="outcome events the router refused: list, replay")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="the dead letters, oldest first")
    replay = actions.add_parser("replay", help="post the dead letters to the router again")
    replay.add_argument("--router-url", required=True)
    replay.add_argument("--api-key", default=os.environ.get("ROUTER_API_KEY"))
    replay.add_argument(
        "--id", action="append", default=[], help="replay only this letter (repeatable)"
    )
    for a in (ls, replay):
        a.add_argument(
            "--redis-url",
            default=os.environ.get("REDIS_URL"),
            help="the workers' Redis (default $REDIS_URL)",
        )
        a.add_argument(
            "--data-dir", help="a worker's data dir (without Redis; default data/worker)"
        )
        a.add_argument("--outcomes-key", default=DEFAULT_KEY, help="Redis key prefix")
        a.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=run_deadletters)


def open_store(args: argparse.Namespace) -> tuple[DeadLetterStore, str]:
    """The store the options name, and a description of where it is."""
    if args.data_dir:  # an explicit data dir wins over $REDIS_URL
        path = Path(args.data_dir) / DEAD_LETTER_FILE
        return FileDeadLetters(path), str(path)
    if args.redis_url:
        client = redis.Redis.from_url(args.redis_url, socket_timeout=10, socket_connect_timeout=5)
        store = RedisDeadLetters(client, args.outcomes_key)
        return store, f"Redis {store.hash}"
    path = Path("data/worker") / DEAD_LETTER_FILE
    return FileDeadLetters(path), str(path)


def run_deadletters(args: argparse.Namespace) -> int:
    """`list` or `replay`."""
    store, where = open_store(args)
    try:
        if args.action == "list":
            return _list(store, where, args.json)
        return _replay(store, where, args)
    except redis.RedisError as exc:
        print(f"router deadletters: Redis unreachable ({exc})", file=sys.stderr)
        return 1


def _list(store: DeadLetterStore, where: str, as_json: bool) -> int:
    letters = store.list()
    if as_json:
        print(json.dumps([d.to_dict() for d in letters], indent=1))
        return 0
    print(f"{len(letters)} dead letter(s) in {where}")
    for d in letters:
        ev = d.event
        field = f" {d.field}" if d.field else ""
        print(
            f"{d.id}  {d.to_dict()['when']}  {d.worker}  {ev.event} {ev.status or '-'} "
            f"decision {ev.decision_id}  tries {d.attempts}  {d.code}{field}: {d.message}"
        )
    return 0


def _replay(store: DeadLetterStore, where: str, args: argparse.Namespace) -> int:
    letters = store.list()
    if args.id:
        wanted = set(args.id)
        letters = [d for d in letters if d.id in wanted]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    router = RouterClient(args.router_url, timeout=30, headers=headers)
    taken: list[tuple[DeadLetter, str]] = []
    refused: list[DeadLetter] = []
    unreachable: str | None = None
    try:
        for d in letters:
            try:
                (result,) = router.record_outcomes([d.event])
            except RoutingError as exc:
                again = d.refused_again(exc)
                store.put(again)
                refused.append(again)
                continue
            except (httpx.TransportError, httpx.HTTPStatusError) as exc:
                unreachable = f"{type(exc).__name__}: {exc}"
                break  # the rest stay as they are
            store.remove([d.id])
            taken.append((d, result))
    finally:
        router.close()
    if isinstance(store, FileDeadLetters):
        store.compact()
    left = store.count()
    summary = {
        "store": where,
        "replayed": len(taken) + len(refused),
        "taken": len(taken),
        "results": {r: sum(1 for _, x in taken if x == r) for r in {x for _, x in taken}},
        "refused_again": [d.to_dict() for d in refused],
        "left": left,
        "router_unreachable": unreachable,
    }
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(
            f"replayed {summary['replayed']} of {len(letters)} dead letter(s) from {where}: "
            f"{len(taken)} taken {summary['results'] or ''}, {len(refused)} refused again; "
            f"{left} left"
        )
        for d in refused:
            field = f" {d.field}" if d.field else ""
            print(f"  {d.id}: {d.code}{field}: {d.message}")
        if unreachable:
            print(f"router unreachable ({unreachable}): the rest were not tried", file=sys.stderr)
    return 1 if refused or unreachable else 0
