"""What API keys and rate limits add to a request: authenticate (key store check, SHA-256,
constant-time compare) and charge (token buckets in-process, or a Lua call on Redis).

    .venv/bin/python bench/auth_bench.py [--redis-url redis://127.0.0.1:6379/0] [--n 20000]

Prints the median over 7 rounds of microseconds per call (the machine is shared: read ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from router.contract.errors import Unauthorized
from router.http.auth import Auth
from router.http.keys import KEYS_FILE, FileKeyStore, KeySet, Limit, new_key
from router.http.ratelimit import RedisBuckets, TokenBuckets


def per_call_us(fn: Callable[[], object], n: int, rounds: int = 7) -> float:
    """Median over rounds of the mean time per call, in microseconds."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(times)


def refused(auth: Auth, raw: str) -> None:
    """Authenticate a key that must be refused."""
    try:
        auth.authenticate(raw)
    except Unauthorized:
        return
    raise AssertionError("an unknown key was accepted")


def main() -> None:
    """Run the measurements and print a small table."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    p.add_argument("--n", type=int, default=20_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        records = [new_key(f"tenant{i % 50}", ("route", "outcomes")) for i in range(1000)]
        keys = KeySet({r.id: r for _, r in records}, {})  # a store with a thousand keys
        (Path(tmp) / KEYS_FILE).write_text(json.dumps(keys.to_json()))
        store = FileKeyStore(Path(tmp))
        raw = records[0][0]
        huge = Limit.of(1e12, 1e12)
        rows = [
            ("authenticate (file store, valid key)", lambda: auth.authenticate(raw)),
            ("authenticate (unknown key: 401)", lambda: refused(auth, "rk_nope_x")),
            ("charge, in-process buckets", lambda: local.take([("key k", huge)], 1)),
        ]
        auth = Auth(store, "auto", Limit.of(1e12, 1e12))
        local = TokenBuckets()
        if args.redis_url:
            shared = RedisBuckets(args.redis_url, prefix="bench")
            shared.take([("key k", huge)], 1)  # loads the script
            rows.append(("charge, Redis Lua bucket", lambda: shared.take([("key k", huge)], 1)))
        print(f"{'operation':40} us/call (median of 7 rounds)")
        for name, fn in rows:
            n = args.n if "Redis" not in name else max(1, args.n // 10)
            print(f"{name:40} {per_call_us(fn, n):8.2f}")
        if args.redis_url and shared._local_until:
            print("(Redis timed out during the run: part of its figure is in-process)")


if __name__ == "__main__":
    main()
