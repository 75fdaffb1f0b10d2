"""Which token guards which route: one table, read by app.py's check (the enforcement) and by the
API description (utils/api/openapi), so the two cannot disagree."""
from __future__ import annotations

from typing import Callable, Literal

Guard = Literal["admin", "api", "metrics"]

# The setting that holds each guard's token (ServerSettings or RuntimeSettings) and its env variable.
TOKEN_SETTINGS: dict[Guard, tuple[str, str]] = {"admin": ("admin_token", "ADMIN_TOKEN"),
                                                "api": ("api_token", "API_TOKEN"),
                                                "metrics": ("metrics_token", "METRICS_TOKEN")}


def guard_of(path: str, view: Callable | None = None) -> Guard | None:
    """The guard of a request path (or of a route's rule: the prefixes read the same); None = open.
    Views marked `public` (the dashboard page and its assets, which hold no data) are open."""
    if getattr(view, "public", False):
        return None
    if path.startswith("/admin"):
        return "admin"
    if path.startswith(("/generate", "/v1", "/jobs")) or path in ("/models", "/device"):
        return "api"
    if path == "/metrics":
        return "metrics"
    return None


def token_of(guard: Guard | None, settings, runtime) -> str | None:
    """The configured token of a guard; None when the guard is not set (the route is open)."""
    if guard is None:
        return None
    name = TOKEN_SETTINGS[guard][0]
    return getattr(runtime if guard == "metrics" else settings, name)
