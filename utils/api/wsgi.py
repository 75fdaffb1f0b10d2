"""The WSGI layer under the Flask app: request bodies, admission while draining, requests in flight.

`ServingMiddleware` wraps `app.wsgi_app` (create_app). For every request it
- puts SCRIPT_NAME back into PATH_INFO (`mounted_path`: a client's header must not reroute it);
- replaces `wsgi.input` with a `BodyGuard`, which answers for the body whatever the framing:
  more than MAX_CONTENT_LENGTH_MB (as now configured; a route may lower it: jobs) -> 413 (chunked bodies included: werkzeug's own cap stops reading
  at the limit and passes what it read as the whole body), fewer bytes than Content-Length before
  the client's end of stream -> 400, a body that has not arrived within BODY_TIMEOUT -> 408 (under
  gunicorn, whose socket it bounds), broken chunked framing -> 400. The error is raised inside the
  read, so the app's error handlers answer it as JSON;
- counts the request in flight (`Lifecycle.admit` / `release`) until its response is closed, streams
  included; once the drain has begun it admits nothing but /health, /ready and /metrics, and marks
  the request (`environ[REFUSED]`) so a before_request hook answers 503;
- closes the connection after the response when the body was refused or cut short (what follows on
  the socket is not a request), or while draining (gunicorn: `Response.force_close`);
- ends an event stream still open when the drain's grace runs out: its generation is cancelled
  (the inner response is closed) and the client gets `stream_end(path)` (an error event, [DONE]).
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterable

from utils.engine.arrivals import ARRIVALS
from utils.errors import BodyTimeout, InvalidInput, PayloadTooLarge, ServerError
from utils.hub.model_folder import one_snapshot
from utils.ops.lifecycle import Lifecycle

REFUSED = "model_server.refused"          # environ key: set on requests refused while draining
OPEN_WHILE_DRAINING = frozenset({"/health", "/ready", "/metrics"})
_CHUNK = 64 * 1024


try:  # gunicorn's body errors: broken chunked framing or trailers; the connection ending mid-chunk
    from gunicorn.http.errors import NoMoreData as _NoMoreData, ParseException as _FramingError
except ImportError:  # pragma: no cover - served by another WSGI server
    class _NoMoreData(Exception):
        pass

    class _FramingError(Exception):
        pass


class BodyGuard:
    """`wsgi.input` as the app reads it (read, readline, iteration). A refusal is raised from the read
    that finds it, and again from any later read."""

    def __init__(self, stream, *, content_length: int | None, max_bytes: int | None, timeout: float | None,
                 sock=None, clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self.content_length = content_length
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._sock = sock if timeout is not None and hasattr(sock, "settimeout") else None
        self._clock = clock
        self._deadline = None if self._sock is None else clock() + timeout
        self._buffer = b""
        self._eof = False
        self.received = 0
        self.error: ServerError | None = None
        self.cap_name = "MAX_CONTENT_LENGTH_MB"  # what a 413 names
        self.oversized = content_length is not None and max_bytes is not None and content_length > max_bytes

    def lower_cap(self, max_bytes: int, name: str) -> None:
        """A route's own, lower cap for this body (jobs.max_body_mb), before the body is read."""
        if self.max_bytes is None or max_bytes < self.max_bytes:
            self.max_bytes, self.cap_name = max_bytes, name
            self.oversized = self.oversized or (self.content_length is not None and self.content_length > max_bytes)

    # ---- the WSGI input interface

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = [self._take(len(self._buffer))]
            while data := self._pull(_CHUNK):
                parts.append(data)
            return b"".join(parts)
        if size == 0:
            return b""
        if self._buffer:
            return self._take(size)
        return self._pull(size)

    def readline(self, size: int | None = -1) -> bytes:
        limit = None if size is None or size < 0 else size
        while b"\n" not in self._buffer and (limit is None or len(self._buffer) < limit):
            data = self._pull(_CHUNK)
            if not data:
                break
            self._buffer += data
        end = self._buffer.find(b"\n") + 1 or len(self._buffer)
        return self._take(end if limit is None else min(end, limit))

    def readlines(self, hint: int = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self):
        return iter(self.readline, b"")

    def close(self) -> None:
        pass  # the server owns the socket

    # ---- internals

    def _take(self, size: int) -> bytes:
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _pull(self, size: int) -> bytes:
        """One read from the server's stream, checked."""
        if self.error is not None:
            raise self.error
        if self._eof:
            return b""
        want = size
        if self.content_length is not None:  # never past the announced length (a bare socket would block)
            want = min(size, self.content_length - self.received)
            if want <= 0:
                self._eof = True
                return b""
        elif self.max_bytes is not None:
            room = self.max_bytes - self.received
            if size >= room:  # one byte past the cap tells a body over it from a body that ends at it
                want = room + 1
        try:
            with self._bounded():
                data = self._stream.read(want)
        except TimeoutError:
            self._fail(BodyTimeout(f"the request body did not arrive within BODY_TIMEOUT ({self.timeout:g} s); "
                                   f"{self.received} bytes came"))
        except _NoMoreData:
            self._fail(InvalidInput(f"the connection ended in the middle of the chunked body after "
                                    f"{self.received} bytes", error="incomplete body"))
        except _FramingError as exc:
            self._fail(InvalidInput(f"invalid chunked body: {exc}", error="invalid chunked encoding"))
        self.received += len(data)
        if self.max_bytes is not None and self.received > self.max_bytes:
            self._fail(PayloadTooLarge(f"the request body exceeds {self.cap_name} ({self.max_bytes / 2**20:g} MB)"))
        if not data:
            self._eof = True
            if self.content_length is not None and self.received < self.content_length:
                self._fail(InvalidInput(f"the body ended after {self.received} of the {self.content_length} "
                                        f"bytes its Content-Length announced", error="incomplete body"))
        return data

    @contextmanager
    def _bounded(self):
        """Bounds the socket reads of this read by what is left of BODY_TIMEOUT (gunicorn only)."""
        if self._sock is None:
            yield
            return
        left = self._deadline - self._clock()
        if left <= 0:
            raise TimeoutError
        prior = self._sock.gettimeout()
        self._sock.settimeout(left)
        try:
            yield
        finally:
            try:
                self._sock.settimeout(prior)
            except OSError:
                pass

    def _fail(self, error: ServerError) -> None:
        self.error = error
        self.mark_unusable()
        raise error

    def mark_unusable(self) -> None:
        """What follows on the connection is not the next request: gunicorn must not drain it."""
        if hasattr(self._stream, "failed"):
            self._stream.failed = True


def _content_length(environ) -> int | None:
    try:
        value = int(environ.get("CONTENT_LENGTH") or "")
    except ValueError:
        return None
    return value if value >= 0 else None


def _force_close(start_response) -> None:
    """gunicorn passes its Response's bound start_response: ask it for Connection: close."""
    response = getattr(start_response, "__self__", None)
    if callable(getattr(response, "force_close", None)):
        response.force_close()


def body_guard(environ) -> BodyGuard | None:
    """The guard of this request's body (None under another WSGI stack)."""
    guard = environ.get("wsgi.input")
    return guard if isinstance(guard, BodyGuard) else None


def mounted_path(environ) -> None:
    """SCRIPT_NAME back into PATH_INFO: this app is mounted at the root, and SCRIPT_NAME is not ours to
    trust. gunicorn sets it from a client's `SCRIPT_NAME` header and strips it from the path, so
    `GET /admin/jobs` with `SCRIPT_NAME: /admin` would route as `/jobs` (main.py also drops that header,
    by forwarder_headers; this holds under any server)."""
    script_name = environ.get("SCRIPT_NAME", "")
    if script_name:
        environ["PATH_INFO"] = script_name + environ.get("PATH_INFO", "")
        environ["SCRIPT_NAME"] = ""


def _visit(environ) -> Any:
    """A POST (the requests that reach an engine) is busy in Python until its view returns, but for
    the time it waits on an engine (utils/engine/arrivals.py); a request of another method is not
    counted (it leaves the visit gunicorn's worker opened)."""
    if environ.get("REQUEST_METHOD") == "POST":
        return ARRIVALS.visit()
    visit = ARRIVALS.current()
    if visit is not None:
        visit.leave()
    return nullcontext()


class ServingMiddleware:
    def __init__(self, app, *, lifecycle: Lifecycle, max_bytes: Callable[[], int | None],
                 body_timeout: float | None, stream_end: Callable[[str], bytes]) -> None:
        self.app = app
        self.lifecycle = lifecycle
        self.max_bytes = max_bytes  # read per request: a config reload may raise or lower it
        self.body_timeout = body_timeout
        self.stream_end = stream_end

    def __call__(self, environ, start_response):
        mounted_path(environ)
        guard = BodyGuard(environ["wsgi.input"], content_length=_content_length(environ),
                          max_bytes=self.max_bytes(), timeout=self.body_timeout, sock=environ.get("gunicorn.socket"))
        environ["wsgi.input"] = guard
        path = environ.get("PATH_INFO", "")
        tracked = path not in OPEN_WHILE_DRAINING
        admitted = self.lifecycle.admit() if tracked else False
        if tracked and not admitted:
            environ[REFUSED] = True
        stream = []

        def start(status, headers, exc_info=None):
            if guard.error is not None or guard.oversized:
                guard.mark_unusable()
                _force_close(start_response)
            elif self.lifecycle.draining:
                _force_close(start_response)
            if any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in headers):
                stream.append(True)
            return start_response(status, headers, exc_info)

        try:
            with one_snapshot(), _visit(environ):  # one read of the model folder's files; busy in Python
                result = self.app(environ, start)
        except BaseException:
            if admitted:
                self.lifecycle.release()
            raise
        if not admitted:
            return result
        return _InFlight(result, self.lifecycle, lambda: bool(stream), lambda: self.stream_end(path))


class _InFlight:
    """The response iterable of an admitted request: released when closed; an event stream still
    open when the drain's grace runs out ends with `end()`."""

    def __init__(self, result: Iterable[bytes], lifecycle: Lifecycle, is_stream: Callable[[], bool],
                 end: Callable[[], bytes]) -> None:
        self._result, self._lifecycle, self._is_stream, self._end = result, lifecycle, is_stream, end
        self._closed = False

    def __iter__(self):
        for chunk in self._result:
            yield chunk
            if self._lifecycle.past_deadline() and self._is_stream():
                yield self._end()
                return

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            self._lifecycle.release()
