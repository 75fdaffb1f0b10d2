"""Requests of this process that are busy in Python outside any engine: being read, parsed, templated
and tokenized on their way in, or writing their answer on their way out.

Why an engine wants to know: openvino-genai's `ContinuousBatchingPipeline.step()` holds the GIL for the
whole step (its binding does not release it), so while an OpenVINO engine steps no request thread of the
process runs a line of Python. Without a pause, a request that arrives while 7 others decode waits a
step per few lines: its prefill lands many steps after the others' and every wave of a closed loop ends
staggered, with fewer rows per step (c=8: 10-28 % more steps than the same requests in lockstep). The
OpenVINO engine therefore waits, GIL released and bounded, while requests are busy here (see
utils/runtimes/openvino.py). PyTorch releases the GIL inside its ops, so its engines do not wait.

One process-wide tally (`ARRIVALS`): gunicorn's worker opens a `Visit` per request (reading it, the app,
writing the answer), the WSGI middleware one per POST under any other server; a request of another
method never reaches an engine, and the middleware stops counting it (a slow download of a job's
result must not pause an engine). `Engine.submit` marks the calling thread's visit as waiting on an
engine, and the job's end (or a streamed piece) marks it busy again (the thread wakes to write it).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class Visit:
    """One request's passage through the process: busy (in Python) or waiting (on an engine)."""

    __slots__ = ("_tally", "busy", "over")

    def __init__(self, tally: "Arrivals") -> None:
        self._tally, self.busy, self.over = tally, True, False

    def wait_on_engine(self) -> None:
        self._tally._set(self, busy=False)

    def wake(self) -> None:
        self._tally._set(self, busy=True)

    def leave(self) -> None:
        """Counts no more (a request that will not reach an engine)."""
        self._tally._set(self, busy=False)
        self.over = True


class Arrivals:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = 0
        self._local = threading.local()

    @contextmanager
    def visit(self) -> Iterator[Visit]:
        """The calling thread handles one request for the duration (inside one already: that one)."""
        outer = self.current()
        if outer is not None:
            yield outer
            return
        visit = Visit(self)
        with self._cond:
            self._busy += 1
        self._local.visit = visit
        try:
            yield visit
        finally:
            self._local.visit = None
            with self._cond:
                if visit.busy:
                    self._busy -= 1
                visit.over, visit.busy = True, False
                self._cond.notify_all()

    def current(self) -> Visit | None:
        """The calling thread's visit (None off a request thread: a job worker, a test)."""
        return getattr(self._local, "visit", None)

    def busy(self) -> int:
        return self._busy  # a plain int read: a stale value costs one bounded wait or none

    def wait_quiet(self, timeout: float) -> bool:
        """Until no request is busy (True) or `timeout` seconds passed (False). Releases the GIL."""
        with self._cond:
            return self._cond.wait_for(lambda: self._busy == 0, timeout)

    def _set(self, visit: Visit, *, busy: bool) -> None:
        with self._cond:
            if visit.over or visit.busy == busy:
                return
            visit.busy = busy
            self._busy += 1 if busy else -1
            if not self._busy:
                self._cond.notify_all()


ARRIVALS = Arrivals()
