"""Asynchronous jobs: `POST /jobs/<model>` takes the body `/generate` takes, answers at once with a
job id, and the request runs in the background on the model's engine (batched there with others).

One owner each:
- JobStore alone reads and writes the records (SQLite in WAL mode) and the result files under the
  jobs folder. A record is committed before the client hears of it, and a result is complete on
  disk (written to `<id>.partial`, then renamed) before its job is marked succeeded, so a process
  killed at any moment loses nothing a client was told about.
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
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

from utils.errors import (InvalidInput, JobFinished, JobNotFinished, JobsFull, ModelUnavailable, ServerError,
                          UnknownJob, UnknownModel)
from utils.observer import notify

log = logging.getLogger("model_server.jobs")

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
# A job a model could not take for now (503) waits this long at least, this many times, then fails.
MODEL_UNAVAILABLE_RETRIES = 5
MIN_RETRY_DELAY = 5.0
IDLE_POLL_SECONDS = 1.0     # a worker with nothing to do looks again this often (a submit wakes it sooner)
STOP_WAIT_SECONDS = 30.0    # how long stop() waits for running jobs to hand back their rows
WAL_SIZE_LIMIT = 4 * 2**20  # bytes the WAL keeps after a checkpoint (sqlite: journal_size_limit)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    model TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    not_before REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    details TEXT,
    note TEXT,
    result TEXT,
    request_id TEXT,
    request TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
"""
_COLUMNS = ("seq", "id", "model", "kind", "status", "created_at", "started_at", "finished_at", "not_before",
            "attempts", "retries", "error", "details", "note", "result", "request_id")


@dataclass
class JobRecord:
    seq: int
    id: str
    model: str
    kind: str                      # image | text: what the result is
    status: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    not_before: float | None = None
    attempts: int = 0              # times a worker started it (a start the process did not survive counts)
    retries: int = 0               # times a model could not take it for now
    error: str | None = None
    details: str | None = None
    note: str | None = None
    result: dict | None = None     # {"files": [...], "media_type": ..., "summary": {...}}
    request_id: str | None = None
    request: dict | None = None    # {"body": {...}, "uploads": {field: [base64, ...]}}; read only to run it


class JobStore:
    """Job records in `<root>/jobs.sqlite3`, results in `<root>/results/<id>/`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.results = self.root / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one connection, used by request threads and workers in turn
        self._db = sqlite3.connect(self.root / "jobs.sqlite3", check_same_thread=False, isolation_level=None,
                                   timeout=10)
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect on a new file: reclaim() shrinks it
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # in WAL mode: durable across a process crash
        self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        self._db.executescript(_SCHEMA)
        if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # a file made before it was set
            self._db.execute("VACUUM")  # once: the file takes incremental vacuuming from now on

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------ writes

    def add(self, model: str, kind: str, request: dict, request_id: str | None, now: float, *,
            max_queued: int) -> str | None:
        """A new queued job; None when `max_queued` jobs wait already (counted in the same transaction)."""
        job_id = uuid.uuid4().hex
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                queued = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
                if queued < max_queued:
                    self._db.execute("INSERT INTO jobs (id, model, kind, status, created_at, request_id, request) "
                                     "VALUES (?, ?, ?, 'queued', ?, ?, ?)",
                                     (job_id, model, kind, now, request_id, json.dumps(request)))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return job_id if queued < max_queued else None

    def claim_next(self, now: float, skip: Collection[str] = ()) -> JobRecord | None:
        """The oldest queued job that may start now, of a model not in `skip`, marked running (one
        transaction: two workers never take the same job)."""
        skipped = f"AND model NOT IN ({', '.join('?' * len(skip))}) " if skip else ""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    f"SELECT {', '.join(_COLUMNS)}, request FROM jobs WHERE status = 'queued' "
                    f"AND (not_before IS NULL OR not_before <= ?) {skipped}ORDER BY seq LIMIT 1",
                    (now, *skip)).fetchone()
                if row is not None:
                    self._db.execute("UPDATE jobs SET status = 'running', started_at = ?, attempts = attempts + 1 "
                                     "WHERE id = ?", (now, row[1]))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if row is None:
            return None
        record = _record(row[:-1])
        record.request = json.loads(row[-1])
        record.status, record.started_at, record.attempts = "running", now, record.attempts + 1
        return record

    # A running job's record changes only while it is still the start that `attempts` names: a worker
    # that outlived a stop (its job handed back to the queue meanwhile) cannot overwrite it. A finished
    # job's request (its uploads) is no longer needed and is dropped.

    def finish(self, job_id: str, attempts: int, status: str, now: float, *, error: str | None = None,
               details: str | None = None, result: dict | None = None) -> bool:
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, error = ?, details = ?, result = ?, request = '{}' "
                "WHERE id = ? AND status = 'running' AND attempts = ?",
                (status, now, error, details, None if result is None else json.dumps(result), job_id, attempts))
        return cursor.rowcount == 1

    def requeue(self, job_id: str, attempts: int, *, not_before: float | None, note: str, started: bool,
                retried: bool) -> bool:
        """Back in the queue: `started` False gives the start back (the server stopped it on purpose);
        `retried` counts one more time a model could not take it."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET status = 'queued', started_at = NULL, not_before = ?, note = ?, "
                "attempts = attempts - ?, retries = retries + ? WHERE id = ? AND status = 'running' AND attempts = ?",
                (not_before, note, 0 if started else 1, 1 if retried else 0, job_id, attempts))
        return cursor.rowcount == 1

    def cancel_queued(self, job_id: str, now: float) -> bool:
        with self._lock:
            cursor = self._db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ?, request = '{}', "
                                      "details = 'cancelled before it started' WHERE id = ? AND status = 'queued'",
                                      (now, job_id))
        return cursor.rowcount == 1

    def recover(self, max_attempts: int, now: float) -> tuple[int, int]:
        """Jobs left `running` by a process that died: queued again, or failed once they have had
        `max_attempts` starts. Returns (queued again, failed)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                failed = self._db.execute(
                    "UPDATE jobs SET status = 'failed', finished_at = ?, error = 'interrupted', request = '{}', details = "
                    "'the server stopped while this job ran, ' || attempts || ' time(s); it is not started again' "
                    "WHERE status = 'running' AND attempts >= ?", (now, max_attempts)).rowcount
                requeued = self._db.execute(
                    "UPDATE jobs SET status = 'queued', started_at = NULL, note = 'the server stopped while this "
                    "job ran; queued again (start ' || (attempts + 1) || ' of ' || ? || ')' "
                    "WHERE status = 'running'", (max_attempts,)).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return requeued, failed

    def fail_queued(self, model: str, now: float, *, error: str, details: str) -> list[tuple[str, float]]:
        """Every queued job of `model` fails with the reason; (id, created_at) of each."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                failed = self._db.execute("SELECT id, created_at FROM jobs WHERE status = 'queued' AND model = ?",
                                          (model,)).fetchall()
                self._db.execute("UPDATE jobs SET status = 'failed', finished_at = ?, error = ?, details = ?, "
                                 "request = '{}' WHERE status = 'queued' AND model = ?", (now, error, details, model))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return failed

    def reclaim(self) -> None:
        """The pages of dropped requests and deleted jobs go back to the file system, and the WAL is
        emptied: a day of big uploads otherwise stays on disk twice until the jobs expire."""
        with self._lock:
            if self._db.execute("PRAGMA freelist_count").fetchone()[0]:
                self._db.executescript("PRAGMA incremental_vacuum;")  # execute() would free one page
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def expire(self, older_than: float, keep_finished: int) -> list[str]:
        """Finished jobs whose end is older than `older_than` (epoch seconds), and the oldest beyond
        the newest `keep_finished`: records and results go; the file gives the pages back."""
        with self._lock:
            ids = [row[0] for row in self._db.execute(
                "SELECT id FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled') AND (finished_at < ? OR "
                "seq <= (SELECT seq FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled') "
                "ORDER BY seq DESC LIMIT 1 OFFSET ?))", (older_than, keep_finished))]
            self._db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])
            if ids:
                self._db.executescript("PRAGMA incremental_vacuum;")  # execute() would free one page
        for job_id in ids:
            shutil.rmtree(self.results / job_id, ignore_errors=True)
        return ids

    def remove_strays(self) -> int:
        """Result folders no running or succeeded job owns: a crash between writing and recording, or
        a partial write. The folder is listed before the records are read, so a job claimed later
        (whose folder is not listed) and one that finished meanwhile (read as succeeded) both keep
        theirs."""
        entries = list(self.results.iterdir())
        with self._lock:
            owned = {row[0]: row[1] for row in self._db.execute(
                "SELECT id, status FROM jobs WHERE status IN ('running', 'succeeded')")}
        removed = 0
        for entry in entries:
            job_id = entry.name.split(".")[0]
            if owned.get(job_id) == "running" or (entry.name == job_id and owned.get(job_id) == "succeeded"):
                continue
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed += 1
        return removed

    # ------------------------------------------------------------ results

    def write_result(self, job_id: str, files: Mapping[str, bytes]) -> None:
        final, partial = self.results / job_id, self.results / f"{job_id}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # an earlier start that wrote but was not recorded
        try:
            partial.mkdir()
            for name, data in files.items():
                with open(partial / name, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise

    def remove_result(self, job_id: str) -> None:
        shutil.rmtree(self.results / job_id, ignore_errors=True)

    def result_path(self, job_id: str, name: str) -> Path:
        return self.results / job_id / name

    # ------------------------------------------------------------ reads

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _record(row)

    def queued_models(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT DISTINCT model FROM jobs WHERE status = 'queued'")}

    def has_model(self, model: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM jobs WHERE model = ? LIMIT 1", (model,)).fetchone() is not None

    def position(self, seq: int) -> int:
        """1 for the next queued job to start."""
        with self._lock:
            return 1 + self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND seq < ?",
                                        (seq,)).fetchone()[0]

    def page(self, *, limit: int, before: int | None = None, status: str | None = None,
             model: str | None = None) -> list[JobRecord]:
        """Newest first; `before` is the `seq` of the last job of the previous page."""
        where, args = [], []
        for clause, value in (("seq < ?", before), ("status = ?", status), ("model = ?", model)):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
        return [_record(row) for row in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {state: 0 for state in STATES} | dict(rows)


def _record(row: tuple) -> JobRecord:
    record = JobRecord(**dict(zip(_COLUMNS, row)))
    if record.result is not None:
        record.result = json.loads(record.result)
    return record


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
