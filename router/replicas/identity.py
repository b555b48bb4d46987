"""One identity per cluster (issue 13.3): every replica hashes a phone number with the same key.

The key of `msisdn_hmac` comes from configuration ($ROUTER_HMAC_KEY, or `ServiceSettings.hmac_key`)
or, when none is configured and replicas share Redis, from Redis, created once. Redis holds one
hash, `<prefix>:hmac`:

* `fp`: the key's fingerprint, HMAC-SHA256(key, a fixed string), recorded by the first replica
  (HSETNX, in one script with the key below, so two replicas starting at once agree);
* `key`: the key itself, only when the cluster made it (no key configured). A configured key is
  never written to Redis: only its fingerprint is.

A replica whose key's fingerprint differs from the cluster's refuses to start, saying so; the key
itself is never compared, logged or shown (a fingerprint reveals nothing of it). Without Redis
(embedded), the key is $ROUTER_HMAC_KEY or `<data-dir>/hmac.key`, made on first start, as before.

A replica that took the cluster's key from Redis keeps a copy (mode 0600) in
`<data-dir>/replicas/cluster-hmac.key`, so it can start while Redis is away, and proposes that
key, not a new one, to a Redis that lost its record; with a configured key it needs none.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import redis

log = logging.getLogger(__name__)

FINGERPRINT_MESSAGE = b"router msisdn_hmac key fingerprint v1"
CACHE_FILE = Path("replicas") / "cluster-hmac.key"

# Record the cluster's key fingerprint (and the key, when the cluster makes it) once; answer
# what is recorded. One key, so legal on a Redis Cluster.
_CLAIM = """
if redis.call('HSETNX', KEYS[1], 'fp', ARGV[1]) == 1 and ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'key', ARGV[2])
end
return redis.call('HMGET', KEYS[1], 'fp', 'key')
"""


class HmacKeyMismatch(RuntimeError):
    """This replica's HMAC key is not the cluster's: it must not start."""


def fingerprint(key: bytes) -> str:
    """HMAC-SHA256 of a fixed string under `key`, hex: tells keys apart, reveals nothing."""
    return hmac.new(key, FINGERPRINT_MESSAGE, hashlib.sha256).hexdigest()


def configured_key() -> bytes | None:
    """$ROUTER_HMAC_KEY, if set."""
    env = os.environ.get("ROUTER_HMAC_KEY")
    return env.encode() if env else None


def cluster_hmac_key(
    client: Any, prefix: str, data_dir: Path, configured: bytes | None = None
) -> bytes:
    """The HMAC key every replica on this Redis uses (see the module's docstring).

    Raises HmacKeyMismatch when `configured` (or, without one, the cached cluster key used while
    Redis is away) cannot be this cluster's key."""
    key_name = f"{prefix}:hmac"
    cache = Path(data_dir) / CACHE_FILE
    made = None
    if not configured:  # propose the key this replica last used (Redis may have lost its own)
        made = cache.read_bytes().strip() if cache.exists() else secrets.token_hex(32).encode()
    own_fp = fingerprint(configured or made)  # type: ignore[arg-type]
    try:
        fp_raw, stored = client.eval(_CLAIM, 1, key_name, own_fp, made or b"")
    except redis.RedisError as exc:
        if configured:
            log.warning(
                "Redis unreachable at start (%s): using the configured HMAC key; its fingerprint "
                "is not checked against the cluster's",
                type(exc).__name__,
            )
            return configured
        if cache.exists():
            log.warning(
                "Redis unreachable at start (%s): using the cluster's HMAC key kept in %s",
                type(exc).__name__,
                cache,
            )
            return cache.read_bytes().strip()
        raise HmacKeyMismatch(
            f"no HMAC key for phone numbers: none is configured ($ROUTER_HMAC_KEY), Redis "
            f"({type(exc).__name__}) cannot give the cluster's, and this data folder holds no "
            "copy of it. Start when Redis answers, or set ROUTER_HMAC_KEY to the cluster's key."
        ) from exc
    cluster_fp = fp_raw.decode() if isinstance(fp_raw, bytes) else str(fp_raw)
    if configured:
        if cluster_fp != own_fp:
            raise HmacKeyMismatch(
                "ROUTER_HMAC_KEY is not this cluster's HMAC key: its fingerprint "
                f"{own_fp[:16]}… differs from the one recorded in Redis ({key_name}, "
                f"{cluster_fp[:16]}…), so this replica would hash phone numbers differently "
                "from the others. Use the cluster's key, or rotate the key for the whole "
                'cluster (README: "HMAC key rotation").'
            )
        return configured
    if stored is None:
        raise HmacKeyMismatch(
            "the cluster's HMAC key is configured on its replicas, not kept in Redis (which "
            f"holds only its fingerprint, {key_name}, {cluster_fp[:16]}…): set "
            "ROUTER_HMAC_KEY to the cluster's key on this replica too."
        )
    key = bytes(stored)
    if fingerprint(key) != cluster_fp:
        raise HmacKeyMismatch(
            f"the HMAC key kept in Redis ({key_name}) does not match its recorded fingerprint: "
            'the record is damaged; see README "HMAC key rotation".'
        )
    _keep_copy(cache, key)
    return key


def _keep_copy(path: Path, key: bytes) -> None:
    """A private copy of the cluster's key, to start while Redis is away."""
    if path.exists() and path.read_bytes().strip() == key:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    os.replace(tmp, path)
