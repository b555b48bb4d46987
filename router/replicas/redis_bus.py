"""The replicas' shared event log on Redis: sharded streams, decision records, idempotency.

Keys are shaped for Redis Cluster: everything about one decision lives under the hash tag of
its shard (`<prefix>:{sNN}:events`, `<prefix>:{sNN}:d:<decision_id>`), so every Lua script
touches one slot. A decision record is a hash with the decision's row (`r`) and one field per
outcome signature already published (`s:<signature>`); it expires after the DLR timeout.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError
from redis.retry import Retry

# Publish a decision once: its record and its stream entry, or nothing if already published.
_PUBLISH_DECISION = """
if redis.call('HSETNX', KEYS[1], 'r', ARGV[1]) == 0 then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('XADD', KEYS[2], '*', 'k', 'd', 'o', ARGV[2], 'p', ARGV[1])
return 1
"""

# Publish outcome events of one decision: each signature once across all replicas. The field
# holds the origin that recorded it: 1 new, 2 recorded before by this same origin (a journal
# replayed after a crash, a retry after a cut connection), 0 recorded by another origin.
_PUBLISH_OUTCOMES = """
local out = {}
for i = 3, #ARGV, 2 do
  local field = 's:' .. ARGV[i]
  if redis.call('HSETNX', KEYS[1], field, ARGV[1]) == 1 then
    redis.call('XADD', KEYS[2], '*', 'k', 'o', 'o', ARGV[1], 'p', ARGV[i + 1])
    out[#out + 1] = 1
  elseif redis.call('HGET', KEYS[1], field) == ARGV[1] then
    out[#out + 1] = 2
  else
    out[#out + 1] = 0
  end
end
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return out
"""

# Route idempotency keys (`<prefix>:idem:<tenant>:<key>`, a hash: request digest `h`, expiry in
# event time `e`, holder `o`, decision `d` once answered). Reserve: a live key's digest, expiry
# and decision (nil while its holder is still deciding) are returned; else it is taken.
_RESERVE_KEY = """
local cur = redis.call('HMGET', KEYS[1], 'h', 'e', 'd')
if cur[1] and tonumber(cur[2]) > tonumber(ARGV[2]) then return {cur[1], cur[2], cur[3]} end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'h', ARGV[1], 'e', ARGV[3], 'o', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 0
"""

# The holder's decision under its key (or, with an empty decision, the key given back).
_FINISH_KEY = """
if redis.call('HGET', KEYS[1], 'o') ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) return 1 end
redis.call('HSET', KEYS[1], 'd', ARGV[2], 'e', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# A decision made under a key while Redis was away: stored unless the key is live already.
_PUT_KEY = """
local cur = redis.call('HMGET', KEYS[1], 'h', 'e')
if cur[1] and tonumber(cur[2]) > tonumber(ARGV[2]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'h', ARGV[1], 'e', ARGV[3], 'd', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""


REPEAT, NEW, MINE = 0, 1, 2  # publish verdicts (see RedisBus.publish_verdicts)


@dataclass(frozen=True, slots=True)
class HeldKey:
    """A live idempotency key found in Redis: its request digest, its expiry (event time) and
    its decision (None while the replica holding it is still deciding)."""

    digest: str
    expires: float
    decision: bytes | None


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry: kind `d` (decision), `o` (outcome) or `a` (operator's action), its
    origin instance, payload."""

    shard: int
    id: str
    kind: str
    origin: str
    payload: bytes

    @property
    def millis(self) -> int:
        """The entry's Redis time (milliseconds since the epoch), from its id."""
        return int(self.id.split("-", 1)[0])


Client = redis.Redis | RedisCluster


def connect(url: str, timeout: float = 0.5, cluster: bool = False) -> Client:
    """A client that fails fast: short socket timeouts and no silent retries; with `cluster`,
    a Redis Cluster client that learns the slot map from the node at `url`."""
    if cluster:
        return RedisCluster.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
        )
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


class RedisBus:
    """Publishes decisions and outcomes, reads the streams, keeps the checkpoint."""

    def __init__(self, client: Client, prefix: str = "router", shards: int = 8) -> None:
        if not 1 <= shards <= 1024:
            raise ValueError("shards must be between 1 and 1024")
        self.client = client
        self.prefix = prefix
        self.shards = shards
        self._decision = client.register_script(_PUBLISH_DECISION)
        self._outcomes = client.register_script(_PUBLISH_OUTCOMES)
        self._reserve_key = client.register_script(_RESERVE_KEY)
        self._finish_key = client.register_script(_FINISH_KEY)
        self._put_key = client.register_script(_PUT_KEY)

    # ---- keys ------------------------------------------------------------------------------

    def shard_of(self, decision_id: str) -> int:
        """The shard of a decision (stable across replicas and restarts)."""
        return zlib.crc32(decision_id.encode()) % self.shards

    def stream_key(self, shard: int) -> str:
        """The event stream of one shard."""
        return f"{self.prefix}:{{s{shard:02d}}}:events"

    def record_key(self, decision_id: str) -> str:
        """The record of one decision, in its shard's slot."""
        return f"{self.prefix}:{{s{self.shard_of(decision_id):02d}}}:d:{decision_id}"

    @property
    def checkpoint_key(self) -> str:
        """The learned-state checkpoint."""
        return f"{self.prefix}:checkpoint"

    # ---- publishing ------------------------------------------------------------------------

    def check_layout(self) -> None:
        """Record the shard count on first use; refuse a replica configured differently."""
        key = f"{self.prefix}:shards"
        self.client.set(key, self.shards, nx=True)
        stored = int(self.client.get(key) or self.shards)
        if stored != self.shards:
            raise ValueError(
                f"Redis holds {stored} shards under {self.prefix!r}, not {self.shards}"
            )

    def publish(self, batch: Sequence[tuple[str, str, str, bytes]], ttl_ms: int) -> list[bool]:
        """Publish (kind, origin, key id, payload) items in one pipeline per node, in order;
        per item, whether it was new. Kinds: `d` decision, `o` outcome (payload: signature, a
        NUL byte, body), `a` an operator's action (key id: the carrier). Items refused because
        Redis lost its scripts (a restart, SCRIPT FLUSH) are retried once the scripts are
        loaded again; the others' answers stand (they ran)."""
        return [v == NEW for v in self.publish_verdicts(batch, ttl_ms)]

    def publish_verdicts(
        self, batch: Sequence[tuple[str, str, str, bytes]], ttl_ms: int
    ) -> list[int]:
        """As `publish`, per item: NEW, REPEAT (recorded by another origin) or MINE (an
        outcome recorded before by this same origin: its earlier publish ran)."""
        answers = self._publish(batch, range(len(batch)), ttl_ms)
        missing = [i for i, a in enumerate(answers) if isinstance(a, NoScriptError)]
        if missing:
            self.load_scripts()
            for i, answer in zip(missing, self._publish(batch, missing, ttl_ms), strict=True):
                answers[i] = answer
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        return [int(a[0] if isinstance(a, list) else bool(a)) for a in answers]

    def load_scripts(self) -> None:
        """Load the Lua scripts (on every primary of a cluster)."""
        for script in (
            self._decision,
            self._outcomes,
            self._reserve_key,
            self._finish_key,
            self._put_key,
        ):
            script.sha = self.client.script_load(script.script)

    def _publish(
        self, batch: Sequence[tuple[str, str, str, bytes]], which: Sequence[int], ttl_ms: int
    ) -> list[Any]:
        """EVALSHA per item, one pipeline per node (no per-pipeline SCRIPT EXISTS round trip;
        a cluster client's own pipeline refuses scripts); answers or errors, per item."""
        groups: dict[int, tuple[Any, list[int]]] = {}
        for i in which:
            node = self._node(self.stream_key(self.shard_of(batch[i][2])))
            groups.setdefault(id(node), (node.pipeline(transaction=False), []))[1].append(i)
        answers: dict[int, Any] = {}
        for pipe, items in groups.values():
            for i in items:
                self._queue(pipe, *batch[i], ttl_ms)
            answers.update(zip(items, pipe.execute(raise_on_error=False), strict=True))
        return [answers[i] for i in which]

    def _node(self, key: str) -> redis.Redis:
        """The client of the node holding `key` (the client itself without a cluster)."""
        if isinstance(self.client, RedisCluster):
            return self.client.get_redis_connection(self.client.get_node_from_key(key))
        return self.client

    def _queue(
        self, pipe: Any, kind: str, origin: str, did: str, payload: bytes, ttl_ms: int
    ) -> None:
        """Queue one item's script (or XADD) on a node's pipeline."""
        keys = (self.record_key(did), self.stream_key(self.shard_of(did)))
        if kind == "d":
            pipe.evalsha(self._decision.sha, 2, *keys, payload, origin, ttl_ms)
        elif kind == "a":  # an operator's pause/resume: repeating it is harmless
            pipe.xadd(keys[1], {"k": "a", "o": origin, "p": payload})
        else:
            sig, body = payload.split(b"\0", 1)
            pipe.evalsha(self._outcomes.sha, 2, *keys, origin, ttl_ms, sig, body)

    def record(self, decision_ids: Iterable[str]) -> dict[str, bytes]:
        """The published rows of these decisions (those found)."""
        ids = list(dict.fromkeys(decision_ids))
        pipe = self.client.pipeline(transaction=False)
        for did in ids:
            pipe.hget(self.record_key(did), "r")
        return {did: row for did, row in zip(ids, pipe.execute(), strict=True) if row}

    # ---- idempotency keys of route requests ------------------------------------------------

    def key_name(self, tenant: str, key: str) -> str:
        """The Redis key of a tenant's idempotency key (tenant ids hold no ':')."""
        return f"{self.prefix}:idem:{tenant}:{key}"

    def reserve_keys(
        self, items: Sequence[tuple[str, str, str, float, float, str]], pending_ms: int
    ) -> list[HeldKey | None]:
        """Per (tenant, key, digest, now, expires, holder): None if this holder now holds the
        key (absent, or expired at `now`, event time) for `pending_ms`, else the live key."""
        answers = self._eval(
            [
                (
                    self._reserve_key,
                    self.key_name(tenant, key),
                    (digest, repr(now), repr(expires), holder, pending_ms),
                )
                for tenant, key, digest, now, expires, holder in items
            ]
        )
        return [
            None
            if not isinstance(a, list)
            else HeldKey(a[0].decode(), float(a[1]), a[2] if a[2] else None)
            for a in answers
        ]

    def finish_keys(
        self, items: Sequence[tuple[str, str, str, bytes, float]], ttl_ms: int
    ) -> list[bool]:
        """Per (tenant, key, holder, decision, expires): store the holder's decision under its
        key (an empty decision gives the key back); False if the holder lost it meanwhile."""
        answers = self._eval(
            [
                (self._finish_key, self.key_name(t, k), (holder, body, repr(expires), ttl_ms))
                for t, k, holder, body, expires in items
            ]
        )
        return [bool(a) for a in answers]

    def put_keys(
        self, items: Sequence[tuple[str, str, str, float, float, bytes]], ttl_ms: int
    ) -> list[bool]:
        """Per (tenant, key, digest, at, expires, decision) made while Redis was away: stored
        unless the key is live in Redis already (another replica's answer stands there)."""
        answers = self._eval(
            [
                (self._put_key, self.key_name(t, k), (digest, repr(at), repr(exp), body, ttl_ms))
                for t, k, digest, at, exp, body in items
            ]
        )
        return [bool(a) for a in answers]

    def _eval(self, calls: Sequence[tuple[Any, str, tuple[Any, ...]]]) -> list[Any]:
        """Run one-key scripts, one pipeline per node; reload the scripts once if Redis lost
        them; raises the first error."""
        answers = self._eval_once(calls, range(len(calls)))
        missing = [i for i, a in enumerate(answers) if isinstance(a, NoScriptError)]
        if missing:
            self.load_scripts()
            for i, answer in zip(missing, self._eval_once(calls, missing), strict=True):
                answers[i] = answer
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        return answers

    def _eval_once(
        self, calls: Sequence[tuple[Any, str, tuple[Any, ...]]], which: Sequence[int]
    ) -> list[Any]:
        groups: dict[int, tuple[Any, list[int]]] = {}
        for i in which:
            node = self._node(calls[i][1])
            groups.setdefault(id(node), (node.pipeline(transaction=False), []))[1].append(i)
        answers: dict[int, Any] = {}
        for pipe, items in groups.values():
            for i in items:
                script, key, args = calls[i]
                pipe.evalsha(script.sha, 1, key, *args)
            answers.update(zip(items, pipe.execute(raise_on_error=False), strict=True))
        return [answers[i] for i in which]

    # ---- reading ---------------------------------------------------------------------------

    def read(self, positions: dict[int, str], count: int = 500) -> list[Entry]:
        """Entries after each shard's position (one XREAD per shard, one pipeline), merged in
        Redis time order; no blocking, so it works the same on a Redis Cluster."""
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.shards):
            pipe.xread({self.stream_key(shard): positions.get(shard, "0-0")}, count=count)
        entries = []
        for shard, answer in enumerate(pipe.execute()):
            for _, items in answer or ():
                for entry_id, fields in items:
                    entries.append(
                        Entry(
                            shard,
                            entry_id.decode(),
                            fields[b"k"].decode(),
                            fields[b"o"].decode(),
                            fields[b"p"],
                        )
                    )
        entries.sort(key=lambda e: _id(e.id))
        return entries

    # ---- checkpoints -----------------------------------------------------------------------

    def try_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        """Take (or keep) a named lock for ttl_ms; True if this owner holds it."""
        key = f"{self.prefix}:lock:{name}"
        if self.client.set(key, owner, nx=True, px=ttl_ms):
            return True
        if self.client.get(key) == owner.encode():
            self.client.pexpire(key, ttl_ms)
            return True
        return False

    def write_checkpoint(self, state: dict, positions: dict[int, str]) -> int:
        """Store the learned state with the stream positions it covers; returns its size."""
        blob = zlib.compress(
            orjson.dumps(
                {"positions": {str(k): v for k, v in positions.items()}, "state": state},
                option=orjson.OPT_SERIALIZE_NUMPY,
            ),
            1,
        )
        self.client.set(self.checkpoint_key, blob)
        return len(blob)

    def read_checkpoint(self) -> tuple[dict, dict[int, str]] | None:
        """The last checkpoint's state and positions, or None."""
        blob = self.client.get(self.checkpoint_key)
        if blob is None:
            return None
        doc = orjson.loads(zlib.decompress(blob))
        return doc["state"], {int(k): v for k, v in doc["positions"].items()}

    def trim(self, positions: dict[int, str], keep_ms: int) -> None:
        """Drop stream entries older than `keep_ms` before the checkpoint's positions; the
        trim points are recorded first, so a replica that was away can tell it missed some."""
        points = {}
        for shard, pos in positions.items():
            ms = int(pos.split("-", 1)[0]) - keep_ms
            if ms > 0:
                points[shard] = f"{ms}-0"
        if not points:
            return
        self.client.hset(self.trimmed_key, mapping={str(k): v for k, v in points.items()})
        pipe = self.client.pipeline(transaction=False)
        for shard, minid in points.items():
            pipe.xtrim(self.stream_key(shard), minid=minid, approximate=True)
        pipe.execute()

    @property
    def trimmed_key(self) -> str:
        """Per shard, the id before which entries may have been trimmed."""
        return f"{self.prefix}:trimmed"

    def missed(self, positions: dict[int, str]) -> list[int]:
        """The shards whose entries after these positions may have been trimmed away."""
        points = self.client.hgetall(self.trimmed_key)
        return [
            int(shard)
            for shard, point in points.items()
            if _id(positions.get(int(shard), "0-0")) < _id(point.decode())
        ]


def _id(stream_id: str) -> tuple[int, int]:
    """A stream id as a comparable (milliseconds, sequence) pair."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)
