"""Build the configured policy and its fallback for the daemon.

A learned (ONNX) policy that cannot be loaded — file missing, corrupt, of another
feature schema, unsafe permissions — does not stop the daemon: it runs the fallback
baseline every epoch, and status, metrics and the journal say why. An unknown baseline
name is a configuration error (the operator typed it), reported with the known names.
"""

from __future__ import annotations

from dataclasses import dataclass

from ailfmd.errors import AilfmError, ConfigError
from ailfmd.platform.base import Capabilities, Observation, Topology
from ailfmd.policy.base import Decision, Policy
from ailfmd.policy.baselines import UnknownPolicy, baseline_names, get_baseline
from ailfmd.service.config import PolicySettings
from ailfmd.service.status import PolicyInfo


class PolicyUnavailable(AilfmError):
    """The configured policy could not be loaded; the message says why."""


class UnavailablePolicy:
    """Stands in for a policy that failed to load: every decision fails with the reason,
    so the loop's fallback path (logged, counted, shown) takes over each epoch."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason

    def reset(self, topology: Topology, capabilities: Capabilities) -> None:
        pass

    def decide(self, obs: Observation) -> Decision:
        raise PolicyUnavailable(self.reason)


@dataclass(frozen=True)
class LoadedPolicy:
    policy: Policy
    fallback: Policy
    info: PolicyInfo


def _baseline(settings: PolicySettings, key: str, name: str) -> Policy:
    try:
        return get_baseline(name)
    except UnknownPolicy:
        raise ConfigError("config", f"policy.{key}", name, f"no such baseline; known: {', '.join(baseline_names())}") from None


def _load_onnx(settings: PolicySettings, limit_c: float | None) -> tuple[Policy, str | None]:
    """(policy, feature schema) or an UnavailablePolicy saying why."""
    from ailfmd.policy.onnx_policy import OnnxPolicy  # refuses (AilfmError) without onnxruntime

    path = str(settings.path)
    try:
        pol = OnnxPolicy(path, limit_c=limit_c)
    except (AilfmError, OSError) as e:
        return UnavailablePolicy("onnx", f"cannot load {path}: {e}"), None
    return pol, getattr(pol, "feature_schema", None)


def load_policy(settings: PolicySettings, limit_c: float | None = None) -> LoadedPolicy:
    """The configured policy and its fallback. ``limit_c`` (``[safety] limit_c``) is the
    limit a learned policy measures temperatures from where sensors report a higher one."""
    fallback = _baseline(settings, "fallback", settings.fallback)
    if settings.kind == "baseline":
        pol = _baseline(settings, "baseline", settings.baseline)
        return LoadedPolicy(pol, fallback, PolicyInfo(pol.name, "baseline", None, None, fallback.name))
    pol, schema = _load_onnx(settings, limit_c)
    return LoadedPolicy(pol, fallback, PolicyInfo(pol.name, "onnx", str(settings.path), schema, fallback.name))
