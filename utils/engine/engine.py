"""One engine per loaded model: the only thread that runs that model's forward passes.

Requests submit a Job and wait for its result (or iterate its pieces); the worker takes what is
queued, up to max_batch_size rows that can share a call, and runs one padded `generate` over them.
An idle engine never waits for company: the first request starts at once, and whatever arrives
while a batch runs forms the next batch.

Why one thread: request threads that each called `generate` on the same model oversubscribed
torch's intra-op pool and fought over the GIL (8 clients got a third of what 1 got).
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator

from utils.engine.arrivals import ARRIVALS
from utils.engine.phases import phase
from utils.engine.rows import batch_key
from utils.engine.types import GenerationParams, GenerationResult
from utils.errors import ModelUnavailable, OutOfMemory, RequestTimeout
from utils.observer import notify
from utils.serving.memory import is_out_of_memory, release_cached_memory

log = logging.getLogger("model_server.engine")

_ids = itertools.count(1)
_END = object()
POLL_SECONDS = 0.2  # how often a waiting request checks whether its client is still there


class QueueFull(ModelUnavailable):
    error = "queue full"


class QueueTimeout(ModelUnavailable):
    error = "queue timeout"


class Job:
    """One request inside an engine: a batch row to the worker, a future (or a stream) to the caller."""

    def __init__(self, prepared: Any, params: GenerationParams, *, streaming: bool,
                 timeout: float | None = None, pieces: Any = None) -> None:
        self.id = next(_ids)
        self.prepared, self.params, self.streaming = prepared, params, streaming
        self.submitted_at = time.monotonic()
        self.deadline = self.submitted_at + timeout if timeout else None  # the request's own `timeout`
        self.started_at: float | None = None
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self.emitted_any = False
        self.step: tuple[int, int] | None = None  # (steps done, steps in all) of a stepped job (images)
        self._cancelled = threading.Event()
        self._started = threading.Event()
        self._done = threading.Event()
        self._pieces: Any = pieces if pieces is not None else queue.SimpleQueue()  # a JobGroup's shares one
        self.visit = ARRIVALS.current()  # the submitting request's (utils/engine/arrivals.py); None off one

    # -- the worker's side (BatchRow)
    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def emit(self, piece: str) -> None:
        self.emitted_any = True
        if self.visit is not None:  # its request thread wakes to write the piece
            self.visit.wake()
        self._pieces.put(piece)

    def progress(self, step: int, total: int) -> None:
        """A family that runs in steps (diffusion) reports each one; readers poll `step`."""
        self.step = (step, total)

    def finish(self, result: GenerationResult) -> None:
        if not self._done.is_set():
            self.result = result
            self._ended()

    def fail(self, error: BaseException) -> None:
        if not self._done.is_set():
            self.error = error
            self._ended()

    def _ended(self) -> None:
        if self.visit is not None:  # its request thread wakes to write the answer
            self.visit.wake()
        self._done.set()
        self._pieces.put(_END)

    def mark_started(self) -> None:
        self.started_at = time.monotonic()
        self._started.set()

    # -- the caller's side
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """The client is gone: a queued job is skipped, a running row stops at the next step."""
        self._cancelled.set()

    def wait_started(self, timeout: float) -> bool:
        return self._started.wait(timeout)

    def wait_done(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    def wait(self, is_gone: Callable[[], bool] | None = None) -> GenerationResult:
        while not self._done.wait(POLL_SECONDS if is_gone else None):
            if is_gone():
                self.cancel()
                is_gone = None  # the row ends at the next step; its (cancelled) result follows
        if self.error is not None:
            raise self.error
        return self.result

    def pieces(self) -> Iterator[str]:
        """Text pieces as the worker produces them; returns the result when the row finishes."""
        while True:
            if self.visit is not None:
                self.visit.wait_on_engine()
            piece = self._pieces.get()
            if piece is _END:
                break
            yield piece
        if self.error is not None:
            raise self.error
        return self.result


class _Tagged:
    """One job's side of a JobGroup's queue: what the job puts arrives with the job's index."""

    def __init__(self, shared: queue.SimpleQueue, index: int) -> None:
        self._shared, self._index = shared, index

    def put(self, item: Any) -> None:
        self._shared.put((self._index, item))


class JobGroup:
    """Jobs submitted together (a request's n choices, a list of prompts): queued side by side so a
    continuous engine prefills them in one step; their pieces arrive on one queue, tagged by index."""

    def __init__(self, jobs: list[Job], shared: queue.SimpleQueue) -> None:
        self.jobs, self._shared = jobs, shared

    def pieces(self) -> Iterator[tuple[int, str | None]]:
        """(index, piece) as the rows produce them, and (index, None) when a job has ended (its
        `result` or `error` is set), until every job has."""
        left, visit = len(self.jobs), self.jobs[0].visit
        while left:
            if visit is not None:
                visit.wait_on_engine()
            index, piece = self._shared.get()
            if piece is _END:
                left -= 1
                yield index, None
            else:
                yield index, piece

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()


class Engine:
    """Dynamic batching: drain the queue into batches of compatible rows, one `generate` each."""

    kind = "dynamic"

    def __init__(self, adapter: Any, *, key: str, max_batch_size: int, max_queue: int, queue_timeout: float,
                 observer: Any = None) -> None:
        self.adapter, self.key = adapter, key
        self.max_batch_size, self.max_queue, self.queue_timeout = max_batch_size, max_queue, queue_timeout
        self._observer = observer
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: list[Job] = []
        self._stopping = False
        self._batches = 0
        self._rows = 0
        self._generated = 0  # tokens of every finished row, cancelled ones included
        self._peak = 0       # the most rows one forward pass has run
        self._tokens: deque[tuple[float, int]] = deque()  # (finished at, completion tokens), last minute
        self._thread = threading.Thread(target=self._run, name=f"engine-{key}", daemon=True)

    def start(self) -> "Engine":
        self._thread.start()
        return self

    # ------------------------------------------------------------------ requests' side

    def submit(self, prepared: Any, params: GenerationParams, *, streaming: bool = False,
               timeout: float | None = None) -> Job:
        job = Job(prepared, params, streaming=streaming, timeout=timeout)
        with self._cond:
            if self._stopping:
                raise ModelUnavailable(f"'{self.key}' is unloading; retry", retry_after=1)
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"'{self.key}' has {len(self._queue)} requests queued (max_queue="
                                f"{self.max_queue}); retry later", retry_after=max(1.0, self._drain_estimate()))
            if job.visit is not None:  # before the worker can end it
                job.visit.wait_on_engine()
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def submit_group(self, items: list[tuple[Any, GenerationParams]], *, streaming: bool = False,
                     timeout: float | None = None) -> JobGroup:
        """Several rows at once, all queued or none (QueueFull)."""
        shared: queue.SimpleQueue = queue.SimpleQueue()
        jobs = [Job(prepared, params, streaming=streaming, timeout=timeout, pieces=_Tagged(shared, i))
                for i, (prepared, params) in enumerate(items)]
        with self._cond:
            if self._stopping:
                raise ModelUnavailable(f"'{self.key}' is unloading; retry", retry_after=1)
            if len(self._queue) + len(jobs) > self.max_queue:
                raise QueueFull(f"'{self.key}' has {len(self._queue)} requests queued and this one brings "
                                f"{len(jobs)} rows (max_queue={self.max_queue}); retry later",
                                retry_after=max(1.0, self._drain_estimate()))
            if jobs[0].visit is not None:
                jobs[0].visit.wait_on_engine()
            self._queue.extend(jobs)
            self._cond.notify_all()
        return JobGroup(jobs, shared)

    def await_group(self, group: JobGroup, is_gone: Callable[[], bool] | None = None) -> None:
        """Every job of the group has started; if one cannot (queue timeout, client gone), none runs."""
        try:
            for job in group.jobs:
                self.await_start(job, is_gone)
        except BaseException:
            for job in group.jobs:
                if not self._withdraw(job):
                    job.cancel()
            raise

    def run_group(self, group: JobGroup, is_gone: Callable[[], bool] | None = None) -> list[GenerationResult]:
        """The results of every job, in order; a client gone cancels them all."""
        self.await_group(group, is_gone)
        watch = is_gone
        for job in group.jobs:
            while not job.wait_done(POLL_SECONDS if watch else None):
                if watch():
                    group.cancel()
                    watch = None
        failed = next((job.error for job in group.jobs if job.error is not None), None)
        if failed is not None:
            raise failed
        return [job.result for job in group.jobs]

    def await_start(self, job: Job, is_gone: Callable[[], bool] | None = None) -> None:
        """Waits until the worker takes the job; leaves the queue after queue_timeout or when the
        client goes, so nobody waits forever behind a long queue."""
        deadline = min(job.submitted_at + self.queue_timeout, job.deadline or float("inf"))
        while not job.wait_started(min(POLL_SECONDS, max(0.0, deadline - time.monotonic()))):
            gone = bool(is_gone and is_gone())
            if (gone or time.monotonic() >= deadline) and self._withdraw(job):
                if gone:
                    job.cancel()
                    raise ModelUnavailable("the client went away", error="client gone")
                if job.expired:
                    raise RequestTimeout(f"the request's timeout ({job.deadline - job.submitted_at:g}s) passed while "
                                         f"it waited in '{self.key}''s queue; nothing was generated")
                raise QueueTimeout(f"the request waited {self.queue_timeout:g}s in '{self.key}''s queue "
                                   f"(queue_timeout) without starting", retry_after=max(1.0, self._drain_estimate()))

    def run(self, job: Job, is_gone: Callable[[], bool] | None = None) -> GenerationResult:
        self.await_start(job, is_gone)
        return job.wait(is_gone)

    def _withdraw(self, job: Job) -> bool:
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return False  # the worker took it meanwhile
            return True

    # ------------------------------------------------------------------ lifecycle and status

    def stop(self, timeout: float = 60.0) -> None:
        """Drains: queued and running jobs finish, then the worker ends (before the weights go)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("engine of %s did not drain in %.0fs", self.key, timeout)

    def stats(self) -> dict:
        now = time.monotonic()
        with self._cond:
            while self._tokens and now - self._tokens[0][0] > 60:
                self._tokens.popleft()
            window = min(60.0, max(1.0, now - self._tokens[0][0])) if self._tokens else 60.0
            return {"kind": self.kind, "queue_depth": len(self._queue), "running_batch": len(self._running),
                    "max_batch_size": self.max_batch_size, "max_queue": self.max_queue,
                    "queue_timeout": self.queue_timeout, "batches": self._batches, "rows": self._rows,
                    "tokens_generated": self._generated, "peak_batch": self._peak,
                    "thread_id": self._thread.native_id,  # the operator profiler keeps this thread's events
                    "tokens_per_second": round(sum(n for _, n in self._tokens) / window, 2)}

    def reserved_bytes(self) -> int:
        """Memory the engine holds beyond the weights, counted in the model's bytes (none here)."""
        return 0

    def _drain_estimate(self) -> float:
        return min(30.0, 1.0 + len(self._queue) / max(1, self.max_batch_size))

    # ------------------------------------------------------------------ the worker

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = self._take_batch()
                self._running = batch
            if batch:
                self._run_batch(batch)
            with self._cond:
                self._running = []

    def _take_batch(self) -> list[Job]:
        """Under the lock: the oldest live job and the queued jobs that can share its call."""
        while self._queue and self._queue[0].cancelled:
            self._fail_gone(self._queue.popleft())
        if not self._queue:
            return []
        first = self._queue.popleft()
        key_of = self._batch_key
        key, batch, rest = key_of(first), [first], deque()
        while self._queue and len(batch) < self.max_batch_size:
            job = self._queue.popleft()
            if job.cancelled:
                self._fail_gone(job)
            elif key_of(job) == key:
                batch.append(job)
            else:
                rest.append(job)
        self._queue.extendleft(reversed(rest))
        for job in batch:
            self._start(job)
        return batch

    def _batch_key(self, job: Job) -> tuple:
        """Which rows may share a call: the family's own rule where it has one (images), else
        rows.batch_key on the generation parameters."""
        family_key = getattr(self.adapter, "batch_key", None)
        return family_key(job) if family_key is not None else batch_key(job.params, job.id)

    def _take_joining(self, room: int) -> list[Job]:
        """Under the lock: up to `room` queued jobs, oldest first, whatever their parameters (for the
        engines whose rows join a running batch: continuous, OpenVINO)."""
        joining: list[Job] = []
        while self._queue and len(joining) < room:
            job = self._queue.popleft()
            if job.cancelled:
                self._fail_gone(job)
                continue
            self._start(job)
            joining.append(job)
        return joining

    def _start(self, job: Job) -> None:
        job.mark_started()
        self._observe("on_queue_wait", self.key, job.started_at - job.submitted_at)

    @staticmethod
    def _fail_gone(job: Job) -> None:
        job.fail(ModelUnavailable("the client went away", error="client gone"))

    def _run_batch(self, batch: list[Job]) -> None:
        self._observe("on_batch", self.key, len(batch))
        self._peak = max(self._peak, len(batch))
        try:
            with phase("engine.generate_batch"):
                self.adapter.generate_batch(batch)
        except Exception as exc:
            self._recover(batch, exc)
        self._count(len(batch), [job.result.completion_tokens for job in batch if job.result is not None])

    def _recover(self, batch: list[Job], exc: Exception) -> None:
        """A failed call: an out-of-memory retries in halves (then 503, the model serves on); any
        other error reruns the rows one by one, so one bad row does not fail its neighbours. Rows
        that already streamed text cannot start again and fail."""
        oom = is_out_of_memory(exc)
        if oom:
            release_cached_memory()
            self._observe("on_oom", self.key)
        retry = [job for job in batch if not job.done and not job.emitted_any]
        if len(batch) > 1 and retry:
            log.warning("batch of %d on %s failed (%s); running it again in %s", len(batch), self.key,
                        type(exc).__name__, "halves" if oom else "single rows")
            groups = [retry[:len(retry) // 2], retry[len(retry) // 2:]] if oom and len(retry) > 1 else \
                [[job] for job in retry]
            for group in groups:
                if group:
                    self._run_batch(group)
        error = OutOfMemory(f"'{self.key}' ran out of device memory for this request; retry later or with a "
                            f"shorter input or max_new_tokens", retry_after=5) if oom else exc
        for job in batch:
            job.fail(error)

    def _count(self, started_rows: int, finished_tokens: list[int]) -> None:
        with self._cond:
            self._batches += 1 if started_rows else 0
            self._rows += started_rows
            if finished_tokens:
                self._tokens.append((time.monotonic(), sum(finished_tokens)))
                self._generated += sum(finished_tokens)

    def _observe(self, method: str, *args: Any) -> None:
        notify(self._observer, method, *args)
