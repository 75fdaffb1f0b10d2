"""Asynchronous jobs: `POST /jobs/<model>` takes the body `/generate` takes, answers at once with a
job id, and the request runs in the background on the model's engine (batched there with others).

One owner each:
- JobStore (utils/jobs/store.py) alone reads and writes the records and the result files.
- JobRunner alone decides what runs: a few worker threads take queued jobs oldest first. It holds
  the live state of running jobs (their engine job: progress, cancellation). At start, jobs that
  were running when the process died are queued again, until `max_attempts` starts, then failed
  with the reason. A model that cannot take a job for now (503: its queue is full, it does not fit,
  its load backs off) puts the job back in the queue for later, a few times, instead of failing it.
- JobExecutor runs one job through the same code as a synchronous request (utils/serving/inference.py,
  utils/serving/image_requests.py), without the synchronous size limit, under the job's own deadline.
No Flask here: utils/api/jobs.py translates HTTP to these calls.
"""
from __future__ import annotations

import base64
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from utils.errors import (InvalidInput, JobFinished, JobNotFinished, JobsFull, ModelUnavailable, ServerError,
                          UnknownJob, UnknownModel)
from utils.jobs.store import JobRecord, JobStore
from utils.observer import notify

log = logging.getLogger("model_server.jobs")

# A job a model could not take for now (503) waits this long at least, this many times, then fails.
MODEL_UNAVAILABLE_RETRIES = 5
MIN_RETRY_DELAY = 5.0
IDLE_POLL_SECONDS = 1.0     # a worker with nothing to do looks again this often (a submit wakes it sooner)
STOP_WAIT_SECONDS = 30.0    # how long stop() waits for running jobs to hand back their rows

# ---------------------------------------------------------------- running

@dataclass
class JobOutcome:
    files: dict[str, bytes]        # name -> bytes, in order (images: 0.png, 1.png, ...; text: result.json)
    media_type: str
    summary: dict = field(default_factory=dict)  # what the status shows about the result (seed, size, usage)
    cancelled: bool = False


class JobControl:
    """A running job's live side: the executor reports its engine job; the runner cancels it, for
    its client (the job ends cancelled) or for a stop (the job goes back to the queue)."""

    def __init__(self, record: JobRecord | None = None) -> None:
        self.record = record
        self._cancel = threading.Event()
        self.engine_job: Any = None
        self.reason: str | None = None
        self.by_client = False

    def track(self, engine_job: Any) -> None:
        self.engine_job = engine_job

    def cancel(self, reason: str, *, by_client: bool = False) -> None:
        self.reason = self.reason or reason
        self.by_client = self.by_client or by_client
        self._cancel.set()

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def progress(self) -> dict | None:
        step = getattr(self.engine_job, "step", None)
        return None if not step else {"step": step[0], "total": step[1]}


class JobRunner:
    def __init__(self, store: JobStore, execute: Callable[[JobRecord, JobControl], JobOutcome], *, workers: int,
                 max_queued: int, max_attempts: int, result_ttl: float = 86400.0, max_finished: int = 10_000,
                 orphan_grace: float = 600.0, is_configured: Callable[[str], bool] = lambda model: True,
                 events: Any = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._execute = execute
        self._workers = workers
        self.orphan_grace = orphan_grace
        self.configure(max_queued=max_queued, max_attempts=max_attempts, result_ttl=result_ttl,
                       max_finished=max_finished)
        self._is_configured = is_configured  # whether a model is in the configuration now
        self._events = events  # optional observer: on_job_finished(model, state, queue_seconds, run_seconds)
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._running: dict[str, JobControl] = {}
        # Models with queued jobs that left the configuration -> since when: their jobs stay queued
        # (not started) for orphan_grace seconds, run if the model comes back, else fail.
        self._orphans: dict[str, float] = {}
        self._stopping = False
        self._threads: list[threading.Thread] = []

    def configure(self, *, max_queued: int, max_attempts: int, result_ttl: float, max_finished: int,
                  orphan_grace: float | None = None) -> None:
        """The limits a config reload may change; the folder and the worker count need a restart."""
        self._max_queued, self._max_attempts = max_queued, max_attempts
        self.result_ttl, self.max_finished = result_ttl, max_finished
        if orphan_grace is not None:
            self.orphan_grace = orphan_grace

    # ------------------------------------------------------------ the API's side

    def submit(self, model: str, kind: str, body: Mapping, uploads: Mapping[str, list[bytes]],
               request_id: str | None = None) -> dict:
        """Records an already validated request; it runs when a worker is free."""
        request = {"body": dict(body),
                   "uploads": {name: [base64.b64encode(data).decode("ascii") for data in files]
                               for name, files in uploads.items()}}
        job_id = self.store.add(model, kind, request, request_id, self._clock(), max_queued=self._max_queued)
        if job_id is None:
            raise JobsFull(f"{self._max_queued} jobs are queued already (jobs.max_queued); try again later",
                           retry_after=30)
        with self._wake:
            self._wake.notify()
        return self.describe(job_id)

    def describe(self, job_id: str) -> dict:
        return self.view(self._record(job_id))

    def _record(self, job_id: str) -> JobRecord:
        record = self.store.get(job_id)
        if record is None:
            raise UnknownJob(f"no job '{job_id}' (finished jobs are kept for jobs.result_ttl seconds)")
        return record

    def view(self, record: JobRecord) -> dict:
        """A record as clients see it: its state, where it is in the queue or how far it ran, timings."""
        view: dict[str, Any] = {"job_id": record.id, "model": record.model, "status": record.status,
                                "created_at": _iso(record.created_at)}
        if record.status == "queued":
            view["position"] = self.store.position(record.seq)
        if record.status == "running":
            control = self._running.get(record.id)
            progress = control.progress() if control else None
            if progress:
                view["progress"] = progress
        if record.started_at:
            view["started_at"] = _iso(record.started_at)
        if record.finished_at:
            view["finished_at"] = _iso(record.finished_at)
        view["timings"] = _timings(record, self._clock())
        view["attempts"] = record.attempts
        if record.note:
            view["note"] = record.note
        orphaned = self._orphans.get(record.model) if record.status == "queued" else None
        if orphaned is not None:
            view["note"] = (f"'{record.model}' is not in the configuration; this job waits for it until "
                            f"{_iso(orphaned + self.orphan_grace)} (jobs.orphan_grace), then fails")
        if record.error:
            view["error"], view["details"] = record.error, record.details
        elif record.status == "cancelled":
            view["details"] = record.details
        if record.status == "succeeded" and record.result:
            files = record.result["files"]
            view["result"] = {"media_type": record.result["media_type"], **record.result.get("summary", {}),
                              "urls": [f"/jobs/{record.id}/result" + (f"?index={i}" if i else "")
                                       for i in range(len(files))]}
        return view

    def result_file(self, job_id: str, index: int) -> tuple[Path, str]:
        record = self._record(job_id)
        if record.status != "succeeded":
            reason = {"queued": "it is queued", "running": "it is running",
                      "failed": f"it failed: {record.details}", "cancelled": "it was cancelled"}[record.status]
            raise JobNotFinished(f"job '{job_id}' has no result: {reason}")
        files = record.result["files"]
        if not 0 <= index < len(files):
            raise InvalidInput(f"'index' must be between 0 and {len(files) - 1} for this job", field="index",
                               error="value out of range")
        path = self.store.result_path(job_id, files[index])
        if not path.is_file():
            raise UnknownJob(f"the result of job '{job_id}' is gone from the jobs folder")
        return path, record.result["media_type"]

    def cancel(self, job_id: str) -> dict:
        """A queued job ends at once; a running one at its engine's next step (a diffusion step, a
        token): its view still says running. Cancelling a cancelled job changes nothing; a job that
        succeeded or failed cannot be cancelled (409)."""
        now = self._clock()
        cancelled_queued = self.store.cancel_queued(job_id, now)
        if not cancelled_queued:
            with self._lock:
                control = self._running.get(job_id)
            if control is not None:
                control.cancel("cancelled by the client", by_client=True)
        record = self._record(job_id)
        if cancelled_queued:
            notify(self._events, "on_job_finished", record.model, "cancelled", max(0.0, now - record.created_at),
                   None)
        if record.status in ("succeeded", "failed"):
            raise JobFinished(f"job '{job_id}' has {record.status} already; there is nothing to cancel")
        return self.view(record)

    def page(self, **query: Any) -> list[tuple[dict, int]]:
        """(view, seq) newest first; the last seq is the `before` of the next page."""
        return [(self.view(record), record.seq) for record in self.store.page(**query)]

    def knows_model(self, model: str) -> bool:
        """Whether any job of `model` is on record (listing by a model no longer configured)."""
        return self.store.has_model(model)

    def status(self) -> dict:
        return {"counts": self.store.counts(), "running": sorted(self._running), "workers": self._workers}

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "JobRunner":
        requeued, failed = self.store.recover(self._max_attempts, self._clock())
        if requeued or failed:
            log.warning("jobs interrupted by the last stop: %d queued again, %d failed", requeued, failed)
        self.store.remove_strays()
        for number in range(self._workers):
            thread = threading.Thread(target=self._work, name=f"job-worker-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, wait: float = STOP_WAIT_SECONDS) -> None:
        """Takes no more jobs; running ones stop at their next step and go back to the queue
        without losing a start, to run again after the restart. Those still running when `wait`
        ends (a load, a wait for room) go back too: a stop is not a crash."""
        with self._wake:
            self._stopping = True
            for control in self._running.values():
                control.cancel("the server is stopping")
            self._wake.notify_all()
        deadline = time.monotonic() + wait
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            late = list(self._running.values())
        for control in late:
            self.store.requeue(control.record.id, control.record.attempts, not_before=None, started=False,
                               retried=False, note="the server stopped while it ran; queued again")

    def sweep(self) -> None:
        """The sweeper's chore: finished jobs older than the TTL (or beyond max_finished) go, with
        their results; result folders no job owns go too."""
        expired = self.store.expire(self._clock() - self.result_ttl, self.max_finished)
        if expired:
            log.info("expired %d finished job(s)", len(expired))
        self.store.remove_strays()
        self._watch_orphans()
        self.store.reclaim()

    def _watch_orphans(self) -> None:
        """Models with queued jobs that are not configured: noted when first seen; their jobs fail
        once they have been gone for orphan_grace seconds (an accepted job is a promise: a model
        missing from models.yaml for a moment, an operator's typo, must not fail its queue)."""
        now = self._clock()
        queued = self.store.queued_models()
        with self._lock:
            for model in queued:
                if not self._is_configured(model):
                    self._orphans.setdefault(model, now)
            for model in list(self._orphans):
                if model not in queued or self._is_configured(model):
                    del self._orphans[model]
            due = [(model, since) for model, since in self._orphans.items() if now - since >= self.orphan_grace]
        for model, since in due:
            details = (f"'{model}' has not been in the configuration for {self.orphan_grace:g} s "
                       f"(jobs.orphan_grace); the job was never started")
            failed = self.store.fail_queued(model, now, error="unknown model", details=details)
            if failed:
                log.warning("%d queued job(s) of '%s' failed: %s", len(failed), model, details)
            for _, created in failed:
                notify(self._events, "on_job_finished", model, "failed", max(0.0, now - created), None)
            with self._lock:
                self._orphans.pop(model, None)

    # ------------------------------------------------------------ the workers

    def _work(self) -> None:
        while True:
            with self._wake:  # claimed and registered under one lock: a cancel finds it either way
                if self._stopping:
                    return
                try:
                    record = self._claim()
                except sqlite3.Error:
                    log.exception("claiming a job failed")
                    record = None
                if record is None:
                    self._wake.wait(IDLE_POLL_SECONDS)
                    continue
                control = self._running[record.id] = JobControl(record)
            try:
                self._run(record, control)
            except Exception:  # the store failed (disk, database): this worker carries on with the next job
                log.exception("recording the end of job %s failed", record.id)
            finally:
                with self._lock:
                    if self._running.get(record.id) is control:
                        del self._running[record.id]

    def _claim(self) -> JobRecord | None:
        """The next job to run; none of a model that left the configuration (it waits for it)."""
        return self.store.claim_next(self._clock(), skip=tuple(self._orphans))

    def _run(self, record: JobRecord, control: JobControl) -> None:
        try:
            outcome = self._execute(record, control)
        except ModelUnavailable as exc:  # includes a cancel while it waited for its model or its queue
            if control.cancelled():
                self._stopped(record, control)
            elif record.retries < MODEL_UNAVAILABLE_RETRIES:
                delay = max(MIN_RETRY_DELAY, exc.retry_after or 0)
                self.store.requeue(record.id, record.attempts, not_before=self._clock() + delay, started=False,
                                   retried=True, note=f"'{record.model}' could not take it ({exc.error}: "
                                                      f"{exc.details}); queued again, next try in {delay:g}s")
            else:
                self._finish(record, "failed", error=exc.error, details=exc.details)
            return
        except UnknownModel as exc:  # its model left the configuration since it was claimed
            if self._is_configured(record.model):
                self._finish(record, "failed", error=exc.error, details=exc.details)
            else:
                with self._lock:
                    self._orphans.setdefault(record.model, self._clock())
                self.store.requeue(record.id, record.attempts, not_before=None, started=False, retried=False,
                                   note=f"'{record.model}' left the configuration before it started; queued again")
            return
        except ServerError as exc:  # the request itself (400, 408 timeout)
            self._finish(record, "failed", error=exc.error, details=exc.details)
            return
        except Exception:
            log.exception("job %s (%s) failed", record.id, record.model)
            self._finish(record, "failed", error="internal error", details=f"see the server log for job {record.id}")
            return
        if outcome.cancelled:  # a complete outcome is kept, even if a cancel came after its last step
            self._stopped(record, control)
            return
        try:
            self.store.write_result(record.id, outcome.files)
        except OSError as exc:
            log.exception("storing the result of job %s failed", record.id)
            self._finish(record, "failed", error="result not stored",
                         details=f"the result could not be written to the jobs folder: {exc.strerror or exc}")
            return
        if not self._finish(record, "succeeded", result={"files": list(outcome.files),
                                                         "media_type": outcome.media_type,
                                                         "summary": outcome.summary}):
            self.store.remove_result(record.id)  # handed back to the queue by a stop meanwhile

    def _stopped(self, record: JobRecord, control: JobControl) -> None:
        """The job stopped before its end: cancelled for its client, or back to the queue for a stop."""
        if control.by_client or not self._stopping:
            self._finish(record, "cancelled", details=control.reason or "cancelled")
        else:
            self.store.requeue(record.id, record.attempts, not_before=None, started=False, retried=False,
                               note="the server stopped while it ran; queued again")

    def _finish(self, record: JobRecord, status: str, **fields: Any) -> bool:
        finished = self._clock()
        if not self.store.finish(record.id, record.attempts, status, finished, **fields):
            return False
        started = record.started_at or finished
        notify(self._events, "on_job_finished", record.model, status, max(0.0, started - record.created_at),
               max(0.0, finished - started))
        return True


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


def _timings(record: JobRecord, now: float) -> dict:
    started, finished = record.started_at, record.finished_at
    timings = {"queue_seconds": round((started or finished or now) - record.created_at, 3)}
    if started:
        timings["run_seconds"] = round((finished or now) - started, 3)
    return timings
