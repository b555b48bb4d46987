"""API keys of tenants and operators: made at random, shown once, stored only as a hash.

A key reads `rk_<id>_<secret>`: the id finds the record, the secret (256 random bits) proves it.
The store keeps SHA-256 of the whole key. A slow or salted hash (scrypt, bcrypt) defends guessable
passwords against a stolen store; a 256-bit random secret cannot be guessed or looked up in a
table, so a plain SHA-256 already makes a stolen store useless, costs microseconds per request
instead of tens of milliseconds, and needs no server secret that the CLI and every replica would
have to share. Comparison is constant-time (`hmac.compare_digest`).

Two stores with one interface: a JSON file in the data dir (written atomically under a lock,
re-read when it changes, so the worker processes on one host share it) and a Redis hash (so the
replicas on several hosts share it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

SCOPES = ("route", "outcomes", "admin")
KEY_PREFIX = "rk_"
KEYS_FILE = "api_keys.json"
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


class KeyStoreError(ValueError):
    """A key operation that cannot be done (unknown id, bad scope, admin for a tenant)."""


@dataclass(frozen=True, slots=True)
class Limit:
    """A token bucket: `rate` items per second on average, at most `burst` at once."""

    rate: float
    burst: float

    @classmethod
    def of(cls, rate: float, burst: float | None = None) -> Limit:
        """A limit with a burst of one second's worth (at least 1) unless given."""
        if not rate > 0 or (burst is not None and not burst >= 1):
            raise KeyStoreError("rate must be > 0 and burst >= 1")
        return cls(float(rate), float(burst if burst is not None else max(rate, 1.0)))


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key's record; `tenant` None is an operator key (acts for every tenant)."""

    id: str
    tenant: str | None
    scopes: tuple[str, ...]
    created: str
    key_hash: str
    revoked: str | None = None
    limit: Limit | None = None

    def public(self) -> dict[str, Any]:
        """What `keys list` shows: everything but the hash."""
        out = asdict(self)
        del out["key_hash"]
        return out

    def to_json(self) -> dict[str, Any]:
        """The stored form."""
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ApiKey:
        """Read the stored form."""
        limit = d.get("limit")
        return cls(
            id=d["id"],
            tenant=d.get("tenant"),
            scopes=tuple(d["scopes"]),
            created=d["created"],
            key_hash=d["key_hash"],
            revoked=d.get("revoked"),
            limit=Limit(float(limit["rate"]), float(limit["burst"])) if limit else None,
        )


@dataclass(frozen=True, slots=True)
class KeySet:
    """What a store holds at one moment: keys by id and per-tenant limits."""

    keys: Mapping[str, ApiKey]
    tenant_limits: Mapping[str, Limit]

    def to_json(self) -> dict[str, Any]:
        """The file's content."""
        return {
            "format": 1,
            "keys": {k: v.to_json() for k, v in self.keys.items()},
            "tenant_limits": {t: asdict(v) for t, v in self.tenant_limits.items()},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> KeySet:
        """Read the file's content."""
        if d.get("format") != 1:
            raise ValueError("unsupported key store format")
        return cls(
            {k: ApiKey.from_json(v) for k, v in d.get("keys", {}).items()},
            {
                t: Limit(float(v["rate"]), float(v["burst"]))
                for t, v in d.get("tenant_limits", {}).items()
            },
        )


EMPTY = KeySet({}, {})


# Letters only: a key id must never look like a phone number, which redaction would hide.
KEY_ID_LETTERS = "abcdefghijkmnpqrstuvwxyz"


def hash_key(raw: str) -> str:
    """The stored hash of a raw key."""
    return hashlib.sha256(raw.encode()).hexdigest()


def new_key(
    tenant: str | None, scopes: tuple[str, ...], limit: Limit | None = None
) -> tuple[str, ApiKey]:
    """A fresh random key and its record; the raw key exists only in the return value."""
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise KeyStoreError(f"scopes must be among {', '.join(SCOPES)} (got {', '.join(scopes)})")
    if "admin" in scopes and tenant is not None:
        raise KeyStoreError("admin is an operator scope: create admin keys without --tenant")
    key_id = "".join(secrets.choice(KEY_ID_LETTERS) for _ in range(12))
    raw = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    created = datetime.now(UTC).isoformat(timespec="seconds")
    record = ApiKey(
        key_id, tenant, tuple(dict.fromkeys(scopes)), created, hash_key(raw), None, limit
    )
    return raw, record


def verify(keys: KeySet, raw: str) -> ApiKey | None:
    """The live record of a presented key, or None (unknown, malformed, wrong secret, revoked)."""
    key_id = raw[len(KEY_PREFIX) :].split("_", 1)[0] if raw.startswith(KEY_PREFIX) else ""
    record = keys.keys.get(key_id)
    ok = hmac.compare_digest(hash_key(raw), record.key_hash if record else _DUMMY_HASH)
    if not ok or record is None or record.revoked is not None:
        return None
    return record


class KeyStore(Protocol):
    """Where keys live; `current()` is called per request and must be cheap."""

    def current(self) -> KeySet:
        """The keys as of now (re-read when changed)."""
        ...

    def add(self, record: ApiKey) -> None:
        """Store a new key."""
        ...

    def revoke(self, key_id: str) -> ApiKey:
        """Mark a key revoked (kept, so `auto` mode stays on and the id stays reserved)."""
        ...

    def set_tenant_limit(self, tenant: str, limit: Limit | None) -> None:
        """Set or clear a tenant's rate limit."""
        ...


def _revoked(record: ApiKey | None, key_id: str) -> ApiKey:
    if record is None:
        raise KeyStoreError(f"unknown key id {key_id!r}")
    if record.revoked is not None:
        return record
    return replace(record, revoked=datetime.now(UTC).isoformat(timespec="seconds"))


class FileKeyStore:
    """Keys in `<data dir>/api_keys.json`, mode 0600; every change is read-modify-write under
    an exclusive lock and replaces the file atomically; readers re-read it when it changes."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / KEYS_FILE
        self._lock_path = self.path.with_suffix(".lock")
        self._seen: tuple[int, int, int] | None = None
        self._keys = EMPTY

    def current(self) -> KeySet:
        """The keys, re-read when the file's inode, mtime or size changed (one stat per call)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._seen, self._keys = None, EMPTY
            return EMPTY
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        if sig != self._seen:
            self._keys = KeySet.from_json(json.loads(self.path.read_bytes()))
            self._seen = sig
        return self._keys

    @contextlib.contextmanager
    def _change(self) -> Iterator[list[KeySet]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._seen = None
            box = [self.current()]
            yield box
            self._write(box[0])
        finally:
            os.close(fd)

    def _write(self, keys: KeySet) -> None:
        data = json.dumps(keys.to_json(), indent=2, sort_keys=True).encode()
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".api_keys.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def add(self, record: ApiKey) -> None:
        """Store a new key."""
        with self._change() as box:
            box[0] = KeySet({**box[0].keys, record.id: record}, box[0].tenant_limits)

    def revoke(self, key_id: str) -> ApiKey:
        """Mark a key revoked."""
        with self._change() as box:
            record = _revoked(box[0].keys.get(key_id), key_id)
            box[0] = KeySet({**box[0].keys, key_id: record}, box[0].tenant_limits)
        return record

    def set_tenant_limit(self, tenant: str, limit: Limit | None) -> None:
        """Set or clear a tenant's rate limit."""
        with self._change() as box:
            limits = dict(box[0].tenant_limits)
            if limit is None:
                limits.pop(tenant, None)
            else:
                limits[tenant] = limit
            box[0] = KeySet(box[0].keys, limits)


class RedisKeyStore:
    """Keys in a Redis hash shared by every replica. Each process keeps a copy that a background
    thread re-reads when the store's version counter moves (checked every `refresh_seconds`), so a
    revocation reaches every replica within that time and no request ever waits on Redis, slow or
    gone: the last copy keeps serving. Before a first copy, requests fail closed."""

    def __init__(self, url: str, prefix: str = "router", refresh_seconds: float = 1.0) -> None:
        import redis

        self.redis = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        tag = f"{prefix}:{{auth}}"  # one hash slot: the MULTI below stays legal on a cluster
        self.k_keys, self.k_limits = f"{tag}:keys", f"{tag}:limits"
        self.k_version = f"{tag}:version"
        self.refresh_seconds = refresh_seconds
        self._keys: KeySet | None = None
        self._version: bytes | None = None
        self._tried = -refresh_seconds
        self._lock = threading.Lock()
        self._refresher: threading.Thread | None = None

    def current(self) -> KeySet:
        """The copy; the first call (and, until one succeeds, one call per `refresh_seconds`)
        reads Redis and raises `ConnectionError` if it cannot."""
        keys = self._keys
        if keys is not None:
            return keys
        with self._lock:
            if self._keys is None:
                if time.monotonic() - self._tried < self.refresh_seconds:
                    raise ConnectionError("key store unreachable")
                self._tried = time.monotonic()
                try:
                    self._refresh()
                except Exception as exc:  # redis errors of every kind
                    raise ConnectionError(f"key store unreachable: {type(exc).__name__}") from None
                self._refresher = threading.Thread(
                    target=self._refresh_forever, name="key-store-refresh", daemon=True
                )
                self._refresher.start()
            return self._keys  # type: ignore[return-value]

    def _refresh(self) -> None:
        version = self.redis.get(self.k_version)
        if self._keys is None or version != self._version:
            self._keys = self._read()
            self._version = version

    def _refresh_forever(self) -> None:
        while True:
            time.sleep(self.refresh_seconds)
            try:
                self._refresh()
            except Exception as exc:  # keep serving the last copy
                log.warning("key store unreachable (%s); serving the last copy", type(exc).__name__)

    def _read(self) -> KeySet:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hgetall(self.k_keys)
        pipe.hgetall(self.k_limits)
        keys, limits = pipe.execute()
        return KeySet(
            {k.decode(): ApiKey.from_json(json.loads(v)) for k, v in keys.items()},
            {
                t.decode(): Limit(float(d["rate"]), float(d["burst"]))
                for t, d in ((t, json.loads(v)) for t, v in limits.items())
            },
        )

    def _write(self, key: str, field: str, value: dict[str, Any] | None) -> None:
        pipe = self.redis.pipeline(transaction=True)
        if value is None:
            pipe.hdel(key, field)
        else:
            pipe.hset(key, field, json.dumps(value, sort_keys=True))
        pipe.incr(self.k_version)
        pipe.execute()

    def add(self, record: ApiKey) -> None:
        """Store a new key."""
        self._write(self.k_keys, record.id, record.to_json())

    def revoke(self, key_id: str) -> ApiKey:
        """Mark a key revoked."""
        raw = self.redis.hget(self.k_keys, key_id)
        record = _revoked(ApiKey.from_json(json.loads(raw)) if raw else None, key_id)
        self._write(self.k_keys, key_id, record.to_json())
        return record

    def set_tenant_limit(self, tenant: str, limit: Limit | None) -> None:
        """Set or clear a tenant's rate limit."""
        self._write(self.k_limits, tenant, asdict(limit) if limit else None)


def open_store(data_dir: Path, redis_url: str | None = None, prefix: str = "router") -> KeyStore:
    """The Redis store when a URL is given (replicas share it), else the data dir's file."""
    return RedisKeyStore(redis_url, prefix) if redis_url else FileKeyStore(data_dir)
