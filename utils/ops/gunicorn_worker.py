"""gunicorn's side of the server: the worker and logger classes main.py runs gunicorn with.

`ModelServerWorker` is gunicorn's threaded worker (one process, many request threads) with three
changes:
- Errors gunicorn answers by itself, before any request reaches the app (a malformed request line or
  header, a request line over `limit_request_line` (414), headers over `limit_request_fields` /
  `limit_request_field_size` (431), an unsupported Transfer-Encoding (501), ...), are JSON
  `{"error", "details"}` with an X-Request-ID, like every other error, instead of gunicorn's HTML
  page. gunicorn still decides the status and writes its log lines.
- SIGTERM drains before it stops: the app's Lifecycle stops admitting requests (503 + Retry-After,
  /ready 503) while the worker keeps accepting connections to say so; requests in flight get
  SHUTDOWN_GRACE seconds to finish (event streams still open then are ended with a last event);
  then gunicorn's own stop runs (kept-alive connections closed, sockets closed).
- When its loop is over it runs the app's shutdown steps (stop the sweeper, unload every model and
  its engine thread, remove the temp files), then exits 0.
The master's `graceful_timeout` (main.py: SHUTDOWN_GRACE + SHUTDOWN_MARGIN) is the hard bound: a
worker still alive then is killed.

`EscapingLogger` writes gunicorn's own lines (stderr) with control characters escaped, as
utils/ops/logging_setup.py does for ours.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import threading
import uuid
from http import HTTPStatus
from pathlib import Path

from gunicorn import glogging, util
from gunicorn.arbiter import Arbiter
from gunicorn.workers.gthread import ThreadWorker

from utils.config.reload import reload_config
from utils.engine.arrivals import ARRIVALS
from utils.errors import ConfigError
from utils.ops.logging_setup import ConsoleFormatter

log = logging.getLogger("model_server.worker")

SHUTDOWN_MARGIN = 15      # seconds the master adds to SHUTDOWN_GRACE: unloading, temp removal, lingering
LINGER_AFTER_GRACE = 2    # seconds gunicorn's own stop may still wait once the grace is over
_MAX_DETAILS = 300


class _Captured:
    """Stands in for the client socket while gunicorn writes its HTML error page."""

    def __init__(self) -> None:
        self.data = b""

    def gettimeout(self) -> float:
        return 0.0

    def setblocking(self, flag) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        self.data += data


def error_response(status: int, exc: BaseException, cfg=None) -> tuple[bytes, str]:
    """The raw HTTP/1.1 JSON answer for an error gunicorn raised; (bytes, request id)."""
    request_id = uuid.uuid4().hex
    try:
        reason = {414: "URI Too Long"}.get(status) or HTTPStatus(status).phrase  # RFC 9110's names
    except ValueError:
        reason = "Error"
    if status >= 500 and status != 501:
        details = f"see the server log for request id {request_id}"
    else:
        details = str(exc) or type(exc).__name__
        if status == 414 and cfg is not None:
            details = f"the request line is over {cfg.limit_request_line} bytes (limit_request_line): {details}"
        elif status == 431 and cfg is not None:
            details = (f"at most {cfg.limit_request_fields} header fields of {cfg.limit_request_field_size} "
                       f"bytes each: {details}")
        if len(details) > _MAX_DETAILS:
            details = details[:_MAX_DETAILS] + "..."
    body = json.dumps({"error": reason.lower(), "details": details}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-ID: {request_id}\r\n\r\n")
    return head.encode("latin-1") + body, request_id


class ModelServerWorker(ThreadWorker):

    def handle(self, conn):
        """One request of a connection: reading it, the app, writing the answer are busy in Python
        (utils/engine/arrivals.py), but for the time the request waits on an engine."""
        with ARRIVALS.visit():
            return super().handle(conn)

    def handle_error(self, req, client, addr, exc):
        captured = _Captured()
        super().handle_error(req, captured, addr, exc)  # gunicorn's status, error line and access line
        try:
            status = int(captured.data.split(b" ", 2)[1])
        except (IndexError, ValueError):
            status = 500
        data, request_id = error_response(status, exc, self.cfg)
        if status >= 500:
            log.error("gunicorn answered %d (request id %s): %s: %s", status, request_id, type(exc).__name__, exc)
        try:
            util.write_nonblock(client, data)
        except Exception:
            self.log.debug("Failed to send error message.")

    # ---- SIGHUP: reload models.yaml in this worker (the master forwards it instead of restarting us)

    def init_signals(self):
        super().init_signals()
        signal.signal(signal.SIGHUP, self.handle_hup)

    def handle_hup(self, sig, frame):
        app = getattr(self, "wsgi", None)
        services = getattr(app, "extensions", {}).get("model_server")
        if services is not None:  # not in the signal handler itself: a reload takes locks
            threading.Thread(target=self._reload, args=(services, app.config), name="reload", daemon=True).start()

    @staticmethod
    def _reload(services, app_config) -> None:
        try:
            reload_config(services, app_config)
        except ConfigError as exc:
            log.error("SIGHUP: the config is invalid, nothing changed: %s", exc)
        except Exception:
            log.exception("SIGHUP: reloading the config failed")

    # ---- draining and shutdown

    def _lifecycle(self):
        services = getattr(getattr(self, "wsgi", None), "extensions", {}).get("model_server")
        return getattr(services, "lifecycle", None)

    def handle_exit(self, sig, frame):
        """SIGTERM (from the master, or sent to the whole process group): drain, then stop."""
        lifecycle = self._lifecycle()
        if lifecycle is None or not self.alive:
            super().handle_exit(sig, frame)
            return
        if lifecycle.begin_drain():
            threading.Thread(target=self._drain_then_stop, args=(lifecycle,), name="drain", daemon=True).start()

    def _drain_then_stop(self, lifecycle) -> None:
        if not lifecycle.wait_idle():
            # Past the grace: gunicorn's own stop waits for connections only briefly more.
            self.cfg.set("graceful_timeout", LINGER_AFTER_GRACE)
        super().handle_exit(None, None)  # alive = False and wake the loop: gunicorn's graceful stop

    def run(self):
        try:
            super().run()
        finally:
            lifecycle = self._lifecycle()
            if lifecycle is not None:
                lifecycle.shutdown()
                if lifecycle.draining and lifecycle.in_flight > 0:
                    # Request threads past the grace would keep the interpreter from exiting until
                    # the master kills this process: leave now, the shutdown steps are done.
                    log.warning("exiting with %d request(s) still running past SHUTDOWN_GRACE", lifecycle.in_flight)
                    logging.shutdown()
                    os._exit(0)


def control_socket_path(log_dir, port: int) -> Path:
    """gunicorn's control socket (gunicornc), one per instance: `<log_dir>/gunicorn-<port>.ctl`.
    gunicorn's default is one path per user, which a second instance takes over (it unlinks the
    socket it finds) and removes when it stops. A unix socket path holds at most 107 bytes: a longer
    one goes to the system's temp folder, still named by the port."""
    path = Path(log_dir or ".").resolve() / f"gunicorn-{port}.ctl"
    if len(os.fsencode(path)) > 100:
        path = Path(tempfile.gettempdir()) / f"model-server-{os.getuid()}-{port}.ctl"
    return path


class ConfigReloadArbiter(Arbiter):
    def handle_hup(self):
        """SIGHUP reloads models.yaml inside the worker, whose models stay loaded; gunicorn's own
        SIGHUP would start a new worker and lose every loaded model."""
        self.log.info("SIGHUP: reloading the model configuration in the worker")
        self.kill_workers(signal.SIGHUP)


class EscapingLogger(glogging.Logger):
    """gunicorn's logger with control characters escaped in every line it writes."""

    def setup(self, cfg):
        super().setup(cfg)
        for logger in (self.error_log, self.access_log):
            for handler in logger.handlers:
                current = handler.formatter
                if current is not None and not isinstance(current, ConsoleFormatter):
                    handler.setFormatter(ConsoleFormatter(current._fmt, current.datefmt))
