"""Lifecycle of one serving process: readiness, requests in flight, draining and shutdown.

No Flask, no gunicorn: the WSGI layer (utils/api/wsgi.py) admits and releases requests, the
gunicorn worker (utils/ops/gunicorn_worker.py) starts the drain on SIGTERM and runs the shutdown, and
GET /ready reads `readiness()`.

Shutdown, in order: `begin_drain()` (new requests are refused with 503, /ready answers 503) ->
`wait_idle()` (until the requests admitted before it have finished, or the grace has passed) ->
`shutdown()` (the callbacks create_app registered: stop the sweeper, unload the models, which
stops their engines, remove the temp files). Each step is idempotent.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("model_server.lifecycle")


class Lifecycle:
    def __init__(self, *, grace: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace = grace
        self._clock = clock
        self._cond = threading.Condition()
        self._in_flight = 0
        self._deadline: float | None = None  # set when the drain begins
        self._preload = "not started"          # not started / running / done / failed / skipped
        self._preload_error: str | None = None
        self._callbacks: list[tuple[str, Callable[[], object]]] = []
        self._shut_down = False

    # ------------------------------------------------------------ preload

    def run_preload(self, preload: Callable[[], None]) -> None:
        """Runs the manager's preload (in the caller's thread) and records how it went. A model that
        fails to preload is reported by the manager's own status; this records only that preloading
        is over (or that the preload step itself raised)."""
        with self._cond:
            self._preload = "running"
        try:
            preload()
        except Exception as exc:  # contained: reported by /ready, never fatal
            log.exception("preloading failed")
            with self._cond:
                self._preload, self._preload_error = "failed", f"{type(exc).__name__}: {exc}"
            return
        with self._cond:
            self._preload = "done"

    def skip_preload(self) -> None:
        """Nothing will preload in this process (an app built without background work)."""
        with self._cond:
            if self._preload == "not started":
                self._preload = "skipped"

    @property
    def preload_state(self) -> str:
        return self._preload

    # ------------------------------------------------------------ requests in flight

    def admit(self) -> bool:
        """Counts a new request in, or refuses it (False) once the drain has begun."""
        with self._cond:
            if self._deadline is not None:
                return False
            self._in_flight += 1
            return True

    def release(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # ------------------------------------------------------------ draining

    def begin_drain(self, grace: float | None = None) -> bool:
        """Stops admitting requests; those in flight get `grace` seconds. False if already draining."""
        with self._cond:
            if self._deadline is not None:
                return False
            self._deadline = self._clock() + (self.grace if grace is None else grace)
            in_flight = self._in_flight
            self._cond.notify_all()
        log.info("draining: no new requests; %d in flight get up to %gs", in_flight,
                 self.grace if grace is None else grace)
        return True

    @property
    def draining(self) -> bool:
        return self._deadline is not None

    def seconds_left(self) -> float | None:
        """Seconds until the grace ends (None when not draining)."""
        deadline = self._deadline
        return None if deadline is None else max(0.0, deadline - self._clock())

    def past_deadline(self) -> bool:
        deadline = self._deadline
        return deadline is not None and self._clock() >= deadline

    def wait_idle(self, poll: float = 0.1) -> bool:
        """Blocks until no admitted request is left (True) or the grace has passed (False)."""
        with self._cond:
            while self._in_flight > 0:
                left = None if self._deadline is None else self._deadline - self._clock()
                if left is not None and left <= 0:
                    log.warning("grace over with %d request(s) still in flight", self._in_flight)
                    return False
                self._cond.wait(poll if left is None else min(poll, left))
            return True

    # ------------------------------------------------------------ shutdown

    def on_shutdown(self, name: str, callback: Callable[[], object]) -> None:
        """Registers a step of the shutdown; steps run in the order registered."""
        self._callbacks.append((name, callback))

    def shutdown(self) -> None:
        """Runs every shutdown step once (a step that fails is logged; the next ones still run)."""
        with self._cond:
            if self._shut_down:
                return
            self._shut_down = True
        for name, callback in self._callbacks:
            started = time.perf_counter()
            try:
                callback()
            except Exception:
                log.exception("shutdown step %r failed", name)
            else:
                log.info("shutdown: %s (%.2fs)", name, time.perf_counter() - started)

    # ------------------------------------------------------------ readiness

    def readiness(self, models_dir: Path, preload_failures: dict[str, str]) -> tuple[bool, dict]:
        """(ready, body) for GET /ready. Ready = settings loaded (this process runs with them), the
        models folder readable, preloading over (failures are reported, not waited on) and not
        draining."""
        reasons = []
        models_ok = models_dir.is_dir() and os.access(models_dir, os.R_OK | os.X_OK)
        if not models_ok:
            reasons.append(f"the models folder is not a readable directory: {models_dir.name or models_dir}")
        preload = self._preload
        if preload in ("not started", "running"):
            reasons.append(f"preloading models: {preload}")
        if self.draining:
            reasons.append("draining: the server is shutting down")
        status = "draining" if self.draining else ("not ready" if reasons else "ready")
        checks = {"settings": "loaded", "models_dir": "readable" if models_ok else "unreadable",
                  "preload": preload, "draining": self.draining}
        body = {"status": status, "checks": checks}
        if self._preload_error:
            body["preload_error"] = self._preload_error
        if preload_failures:
            body["preload_failed"] = preload_failures
        if reasons:
            body["reasons"] = reasons
        return not reasons, body
