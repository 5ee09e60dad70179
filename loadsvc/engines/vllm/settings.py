"""The vLLM integration's settings, read once from the environment.

vLLM builds the stat logger as ``cls(vllm_config, engine_index)`` and the
middleware as ``cls(app)``: neither can take loadsvc's flags, so both read these
variables (all optional) when they are built:

| variable                        | default  | what |
|---------------------------------|----------|------|
| ``LOADSVC_SHM``                 | ``/dev/shm/loadsvc-default.shm`` | the region file (created with vLLM's DP size) |
| ``LOADSVC_VLLM_PUBLISH``        | ``1``    | ``0`` turns the stat-logger plugin off |
| ``LOADSVC_PUBLISH_INTERVAL_MS`` | ``20``   | least time between publishes when running/waiting did not change |
| ``LOADSVC_HEARTBEAT_MS``        | ``1000`` | an idle engine's rank is re-published this often |
| ``LOADSVC_REGION_MODE``         | ``0600`` | file mode of a region the plugin creates (``0660``: group readers) |
| ``LOADSVC_API_KEY``             | unset    | the middleware's ``/v1/loads`` needs ``Authorization: Bearer KEY`` |
| ``LOADSVC_STALE_AFTER``         | ``3``    | the middleware's freshness bound, seconds |
| ``LOADSVC_UNREACHABLE_AFTER``   | ``30``   | the middleware's unreachable bound, seconds |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from loadsvc._exceptions import SettingsError
from loadsvc.core.region import (
    DEFAULT_STALE_AFTER,
    DEFAULT_UNREACHABLE_AFTER,
    default_path,
)

__all__ = ["VllmSettings", "SettingsError"]


def _number(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number; expected {low:g}..{high:g}") from None
    if not low <= value <= high:  # also refuses nan
        raise SettingsError(f"{name}={raw!r} is outside {low:g}..{high:g}")
    return value


@dataclass(frozen=True)
class VllmSettings:
    """What the stat logger and the middleware need (see the module docstring)."""

    shm: Path
    publish: bool = True
    publish_interval: float = 0.020
    heartbeat: float = 1.0
    region_mode: int = 0o600
    api_key: str | None = None
    stale_after: float = DEFAULT_STALE_AFTER
    unreachable_after: float = DEFAULT_UNREACHABLE_AFTER

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> VllmSettings:
        """Parse the LOADSVC_* variables; SettingsError names the variable and the expected values."""
        env = os.environ if env is None else env
        shm = env.get("LOADSVC_SHM", "").strip()
        publish = env.get("LOADSVC_VLLM_PUBLISH", "1").strip().lower()
        if publish not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise SettingsError(f"LOADSVC_VLLM_PUBLISH={publish!r}; expected 1 or 0")
        mode = env.get("LOADSVC_REGION_MODE", "").strip()
        try:
            region_mode = int(mode, 8) if mode else 0o600
        except ValueError:
            raise SettingsError(f"LOADSVC_REGION_MODE={mode!r} is not an octal mode such as 0600") from None
        if region_mode & ~0o666 or not region_mode & 0o600 == 0o600:
            raise SettingsError(f"LOADSVC_REGION_MODE={mode!r}: the owner needs read and write (0600), "
                                "and no execute bits")
        api_key = env.get("LOADSVC_API_KEY")
        if api_key is not None and not api_key.strip():
            raise SettingsError("LOADSVC_API_KEY is set but empty; unset it to serve without a key")
        stale_after = _number(env, "LOADSVC_STALE_AFTER", DEFAULT_STALE_AFTER, 0.01, 86400)
        unreachable_after = _number(env, "LOADSVC_UNREACHABLE_AFTER",
                                    max(DEFAULT_UNREACHABLE_AFTER, stale_after), stale_after, 86400)
        return cls(
            shm=Path(shm) if shm else default_path(),
            publish=publish in ("1", "true", "yes", "on"),
            publish_interval=_number(env, "LOADSVC_PUBLISH_INTERVAL_MS", 20, 0, 60_000) / 1000,
            heartbeat=_number(env, "LOADSVC_HEARTBEAT_MS", 1000, 10, 3_600_000) / 1000,
            region_mode=region_mode,
            api_key=api_key.strip() if api_key else None,
            stale_after=stale_after,
            unreachable_after=unreachable_after,
        )
