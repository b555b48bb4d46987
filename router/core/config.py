"""Engine configuration: the policy file (policy, parameters, model, message classes)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from bandit.model import ModelConfig
from bandit.reward import MessageClass, classes_from_config

DEFAULT_POLICY_FILE = Path(__file__).parents[1] / "defaults" / "policy.yaml"


class ConfigError(ValueError):
    """The policy file is malformed; the message names the file and the setting."""


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes decisions and learning, loaded from the policy file."""

    policy: str = "thompson"
    params: Mapping[str, Any] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    message_classes: Mapping[str, MessageClass] = field(default_factory=dict)
    pending_stale_fraction: float = 0.25
    seed: int | None = None

    def with_policy(self, policy: str, params: Mapping[str, Any] | None = None) -> EngineConfig:
        """A copy serving another policy (parameters reset unless given)."""
        return replace(self, policy=policy, params=dict(params or {}))

    def with_seed(self, seed: int | None) -> EngineConfig:
        """A copy with another random seed."""
        return replace(self, seed=seed)


_KEYS = {"policy", "params", "model", "message_classes", "pending_stale_fraction", "seed"}


def parse_config(raw: Any, source: str = "<policy>") -> EngineConfig:
    """Validate a parsed policy document."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    unknown = set(raw) - _KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {sorted(unknown)}; known: {sorted(_KEYS)}")
    try:
        model = ModelConfig(**(raw.get("model") or {}))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: model: {exc}") from None
    try:
        classes = classes_from_config(raw.get("message_classes") or {})
    except ValueError as exc:
        raise ConfigError(f"{source}: message_classes: {exc}") from None
    if not classes:
        raise ConfigError(f"{source}: message_classes: at least one class is required")
    frac = float(raw.get("pending_stale_fraction", 0.25))
    if not 0 < frac <= 1:
        raise ConfigError(f"{source}: pending_stale_fraction must be in (0, 1]")
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: params must be a mapping")
    seed = raw.get("seed")
    return EngineConfig(
        str(raw.get("policy", "thompson")),
        params,
        model,
        classes,
        frac,
        None if seed is None else int(seed),
    )


def load_config(path: str | Path = DEFAULT_POLICY_FILE) -> EngineConfig:
    """Load the policy file (YAML)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(raw, str(path))
