"""Calling an optional observer (the metrics) without letting it break the caller."""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("model_server.observer")


def notify(observer: Any, method: str, *args: Any) -> None:
    """observer.method(*args) when the observer has that method; its failures are logged, never raised."""
    callback = getattr(observer, method, None)
    if callback:
        try:
            callback(*args)
        except Exception:
            log.exception("observer %s failed", method)
