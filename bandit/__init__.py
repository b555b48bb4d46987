"""Policies, learned carrier model, rewards and (later) off-policy estimators: pure math, no I/O."""

from bandit.model import ArmEstimate, CarrierModel, ModelConfig, Observation, RouteKey
from bandit.policies import (
    POLICIES,
    Arm,
    DecisionContext,
    Distribution,
    Policy,
    arm_prices,
    draw,
    draw_many,
    expected_utility,
    fallback_order,
    make_policy,
    sample_beta,
)
from bandit.reward import DEFAULT_CLASSES, MessageClass, classes_from_config

__all__ = [
    "DEFAULT_CLASSES",
    "POLICIES",
    "Arm",
    "ArmEstimate",
    "CarrierModel",
    "DecisionContext",
    "Distribution",
    "MessageClass",
    "ModelConfig",
    "Observation",
    "Policy",
    "RouteKey",
    "arm_prices",
    "classes_from_config",
    "draw",
    "draw_many",
    "expected_utility",
    "fallback_order",
    "make_policy",
    "sample_beta",
]
