"""Job records and their results on disk: JobStore alone reads and writes them (utils/jobs/runner.py
decides what runs). A record is committed before the client hears of it (SQLite in WAL mode), and a
result is complete on disk (written to `<id>.partial`, then renamed) before its job is marked
succeeded, so a process killed at any moment loses nothing a client was told about.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Mapping


STATES = ("queued", "running", "succeeded", "failed", "cancelled")
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
