"""How the serving process itself behaves, read from the environment once at start.

utils/config/settings.py owns the models and their limits; these few knobs belong to the HTTP layer
(main.py, app.py, the gunicorn worker) and are kept apart so they can be read without models.yaml.
A bad value raises ConfigError naming the variable (main.py exits 2 with it).

| variable         | meaning                                                                    | default |
|------------------|----------------------------------------------------------------------------|---------|
| `BODY_TIMEOUT`   | seconds a request body may take to arrive in full; then 408 and the        | 30      |
|                  | connection closes (a slow client cannot hold a request thread longer)      |         |
| `SHUTDOWN_GRACE` | seconds requests in flight may take to finish after SIGTERM (new requests  | 30      |
|                  | get 503 meanwhile); streams still open then are ended with a last event   |         |
| `METRICS_TOKEN`  | bearer token for GET /metrics; unset or empty = /metrics is open          | unset   |
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Mapping

from utils.errors import ConfigError


@dataclass(frozen=True)
class RuntimeSettings:
    body_timeout: float = 30.0
    shutdown_grace: float = 30.0
    metrics_token: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "RuntimeSettings":
        env = os.environ if env is None else env
        defaults = cls()
        return cls(
            body_timeout=seconds(env, "BODY_TIMEOUT", defaults.body_timeout, minimum=0.1),
            shutdown_grace=seconds(env, "SHUTDOWN_GRACE", defaults.shutdown_grace, minimum=0.0),
            metrics_token=env.get("METRICS_TOKEN") or None,
        )


def seconds(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0,
            maximum: float = 86400.0) -> float:
    """A duration in seconds from `env[name]`; unset or empty gives `default`."""
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or not minimum <= value <= maximum:
        raise ConfigError(f"{name}: must be between {minimum:g} and {maximum:g} seconds, got {raw!r}")
    return value
