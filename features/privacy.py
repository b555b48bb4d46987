"""Keyed HMAC of phone numbers, so logs can be traced with the key but never hold the number."""

from __future__ import annotations

import hashlib
import hmac


def msisdn_hmac(e164: str, key: bytes) -> str:
    """Hex HMAC-SHA256 (first 128 bits) of an E.164 number under `key`."""
    return hmac.new(key, e164.encode("ascii"), hashlib.sha256).hexdigest()[:32]
