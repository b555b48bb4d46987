"""`router keys create|list|revoke|limit`: API keys managed from the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from router.http.keys import KeyStoreError, Limit, new_key, open_store


def _limit(rate: float | None, burst: float | None) -> Limit | None:
    return None if not rate else Limit.of(rate, burst)


def _limit_json(limit: Limit | None) -> dict[str, float] | None:
    return None if limit is None else {"rate": limit.rate, "burst": limit.burst}


def run_keys(args: argparse.Namespace) -> int:
    """Carry out one `router keys` action; the raw key is printed once, on creation."""
    store = open_store(Path(args.data_dir), args.redis_url, args.redis_prefix)
    try:
        if args.action == "create":
            scopes = tuple(s.strip() for s in args.scopes.split(",") if s.strip())
            raw, record = new_key(args.tenant, scopes, _limit(args.rate, args.burst))
            store.add(record)
            print(json.dumps({**record.public(), "key": raw}, indent=2))
            print("store the key now: it is shown only once", file=sys.stderr)
        elif args.action == "list":
            keys = store.current()
            out = {
                "keys": [k.public() for k in keys.keys.values()],
                "tenant_limits": {t: _limit_json(v) for t, v in keys.tenant_limits.items()},
            }
            print(json.dumps(out, indent=2))
        elif args.action == "revoke":
            print(json.dumps(store.revoke(args.key_id).public(), indent=2))
        else:
            limit = _limit(args.rate, args.burst)
            store.set_tenant_limit(args.tenant, limit)
            print(json.dumps({"tenant": args.tenant, "limit": _limit_json(limit)}))
    except KeyStoreError as exc:
        print(f"router: {exc}", file=sys.stderr)
        return 2
    return 0


def add_keys_parser(sub: argparse._SubParsersAction) -> None:
    """The `keys` verb and its actions."""
    keys = sub.add_parser("keys", help="API keys of tenants and operators")
    acts = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = acts.add_parser("create", help="a new key, printed once")
    create.add_argument("--tenant", help="the tenant it acts for (omit: an operator key)")
    create.add_argument("--scopes", default="route,outcomes", help="route,outcomes,admin")
    limit = acts.add_parser("limit", help="set (or with --rate 0 clear) a tenant's rate limit")
    limit.add_argument("tenant")
    revoke = acts.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    listing = acts.add_parser("list", help="every key (never the key itself)")
    for act, kind in ((create, "this key's"), (limit, "the tenant's")):
        act.add_argument("--rate", type=float, help=f"{kind} limit, items per second")
        act.add_argument("--burst", type=float, help="items at once (default: one second's)")
    for act in (create, limit, revoke, listing):
        act.add_argument("--data-dir", default="data", help="where api_keys.json lives")
        act.add_argument(
            "--redis-url",
            default=os.environ.get("REDIS_URL"),
            help="keys in this Redis, shared by replicas (default: $REDIS_URL; else the file)",
        )
        act.add_argument("--redis-prefix", default="router", help="as `router serve`'s")
    keys.set_defaults(func=run_keys)
