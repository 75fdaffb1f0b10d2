"""TempManager: the one owner of files under tmp/.

Temp files exist only where a library insists on a path, and to spool large uploads. Each request
gets a scope, a folder ``root/<uuid4 hex>[-<request id>]`` that is removed when the scope exits,
whatever happens. ``sweep()`` is the safety net (run by the server's one background sweeper): it
removes what a crash or a failed removal left behind once it is older than the TTL, and enforces a
total size cap by deleting the oldest entries first. Entries held by a live scope are never touched.

Only names this manager makes are ever deleted (``<32 hex>`` or ``<32 hex>-<id>``, files or folders):
a root misconfigured as "." or "/" loses nothing else. Other entries show in ``status()`` with
``"managed": False``.

Thread safety: ``_lock`` guards only the dictionary of live scopes; file-system work runs outside
it. A scope's name is registered before its folder is created, and ``sweep`` lists the folder
before it copies the live set, so a folder it sees is either in that copy or its scope is over.
Ages come from ``clock() - newest mtime`` (the clock is injectable for tests).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator

from utils.errors import PayloadTooLarge

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[0-9a-f]{32}(-[A-Za-z0-9_.-]{1,64})?$")
_SUFFIX = re.compile(r"^(\.[A-Za-z0-9_-]{1,16}){0,3}$")
_KEEP = frozenset({".gitkeep"})
MAX_STATUS_ENTRIES = 100


def _sanitize(request_id: str | None) -> str:
    if not request_id:
        return ""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", str(request_id)).lstrip(".")[:64]
    return cleaned


def _tree_stats(path: Path) -> tuple[int, int, float] | None:
    """(files, bytes, newest mtime) of a file or folder, without following symlinks; None when the
    entry is gone. Tolerates files vanishing while it walks."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if not path.is_dir() or path.is_symlink():
        return 1, st.st_size, st.st_mtime
    files, size, newest = 0, 0, st.st_mtime
    for dirpath, dirnames, filenames in os.walk(path, onerror=lambda e: None):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            try:
                fst = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            files += 1
            size += fst.st_size
            newest = max(newest, fst.st_mtime)
        for name in dirnames:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                pass
    return files, size, newest


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


class TempScope:
    """One request's temp folder. Paths are unique; nothing here outlives the scope."""

    def __init__(self, manager: "TempManager", name: str, directory: Path):
        self._manager = manager
        self.name = name
        self.directory = directory
        self._files: list[IO] = []
        self._lock = threading.Lock()
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"temp scope {self.name} is closed")

    def path(self, suffix: str = "") -> Path:
        """A fresh unique path in the scope (not created). ``suffix`` like ".wav" or ".tar.gz"."""
        self._check_open()
        if not _SUFFIX.match(suffix):
            raise ValueError(f"invalid temp file suffix {suffix!r}")
        return self.directory / f"{uuid.uuid4().hex}{suffix}"

    def write(self, data: bytes, suffix: str = "") -> Path:
        """Writes ``data`` to a new file and returns its path. Raises PayloadTooLarge when the live
        scopes together would pass the manager's ``max_total_bytes`` (best effort: concurrent writers
        are not serialised)."""
        path = self.path(suffix)
        self._manager._reserve(len(data))
        with open(path, "xb") as handle:
            handle.write(data)
        return path

    def open(self, suffix: str = "", mode: str = "w+b") -> IO:
        """Opens a new file (for spooling uploads); it is closed, if still open, when the scope ends."""
        if not any(c in mode for c in "wxa"):
            raise ValueError(f"a new temp file needs a creating mode, not {mode!r}")
        handle = open(self.path(suffix), mode.replace("w", "x"))
        with self._lock:
            self._files.append(handle)
        return handle

    @property
    def bytes_used(self) -> int:
        stats = None if self._closed else _tree_stats(self.directory)
        return stats[1] if stats else 0

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            files, self._files = self._files, []
        for handle in files:
            try:
                handle.close()
            except Exception:   # a failing close must not keep the folder
                log.warning("closing temp file %s failed", getattr(handle, "name", "?"), exc_info=True)


class TempManager:
    def __init__(self, root: Path, *, ttl_seconds: float = 3600, max_total_bytes: int = 2 * 2**30,
                 clock: Callable[[], float] = time.time, others: frozenset[str] = frozenset()):
        root = Path(root)
        self.root = root
        # Top-level names under root that another owner keeps (the jobs folder): never listed, counted
        # against the cap or swept here.
        self._others = _KEEP | others
        # what status() shows: the configured relative name, or only the last part of an absolute one
        self._display_root = root.as_posix() if not root.is_absolute() else root.name
        self.ttl_seconds = float(ttl_seconds)
        self.max_total_bytes = int(max_total_bytes)
        self._clock = clock
        self._lock = threading.Lock()          # guards _live only
        self._sweep_lock = threading.Lock()    # one sweep at a time
        self._live: dict[str, TempScope] = {}

    # ------------------------------------------------------------ scopes

    @contextmanager
    def scope(self, request_id: str | None = None) -> Iterator[TempScope]:
        """A per-request folder, removed at exit whatever happens (exceptions included)."""
        suffix = _sanitize(request_id)
        name = uuid.uuid4().hex + (f"-{suffix}" if suffix else "")
        directory = self.root / name
        scope = TempScope(self, name, directory)
        with self._lock:
            self._live[name] = scope          # registered before the folder exists (see module doc)
        try:
            directory.mkdir(parents=True, exist_ok=False)
            yield scope
        finally:
            scope._close()
            try:
                _remove(directory)
            except OSError:
                log.warning("removing temp scope %s failed; the sweeper will retry", name, exc_info=True)
            with self._lock:
                self._live.pop(name, None)

    def _reserve(self, nbytes: int) -> None:
        with self._lock:
            scopes = list(self._live.values())
        used = sum(s.bytes_used for s in scopes)
        if used + nbytes > self.max_total_bytes:
            raise PayloadTooLarge(
                f"temporary storage is full ({used + nbytes} bytes would pass the cap of {self.max_total_bytes})")

    # ------------------------------------------------------------ sweeping

    def _entries(self) -> list[dict]:
        """Top-level entries under root with their stats (files, bytes, age, in_use, managed)."""
        try:
            paths = [p for p in self.root.iterdir() if p.name not in self._others]
        except FileNotFoundError:
            return []
        with self._lock:                      # copied after listing: see the module docstring
            live = set(self._live)
        now = self._clock()
        entries = []
        for path in paths:
            stats = _tree_stats(path)
            if stats is None:                 # removed meanwhile (its scope ended)
                continue
            files, size, mtime = stats
            entries.append({"path": path, "name": path.name, "files": files, "bytes": size,
                            "age_seconds": max(0.0, now - mtime), "in_use": path.name in live,
                            "managed": bool(_NAME.match(path.name))})
        return entries

    def sweep(self, *, force: bool = False) -> dict:
        """Removes entries no live scope holds that are older than the TTL (all of them with ``force``),
        then, while the total passes ``max_total_bytes``, the oldest remaining unheld ones."""
        with self._sweep_lock:
            entries = self._entries()
            removed_files = removed_bytes = removed_entries = 0
            kept = []
            for entry in entries:
                deletable = entry["managed"] and not entry["in_use"]
                if deletable and (force or entry["age_seconds"] > self.ttl_seconds):
                    if self._delete(entry):
                        removed_files += entry["files"]
                        removed_bytes += entry["bytes"]
                        removed_entries += 1
                        continue
                kept.append(entry)
            total = sum(e["bytes"] for e in kept)
            evicted_for_size = 0
            if total > self.max_total_bytes:
                for entry in sorted(kept, key=lambda e: -e["age_seconds"]):
                    if total <= self.max_total_bytes:
                        break
                    if entry["managed"] and not entry["in_use"] and self._delete(entry):
                        total -= entry["bytes"]
                        removed_files += entry["files"]
                        removed_bytes += entry["bytes"]
                        removed_entries += 1
                        evicted_for_size += 1
            return {"removed_files": removed_files, "removed_bytes": removed_bytes,
                    "removed_entries": removed_entries, "removed_for_size": evicted_for_size,
                    "remaining_bytes": total, "over_cap": total > self.max_total_bytes}

    def _delete(self, entry: dict) -> bool:
        try:
            _remove(entry["path"])
            return True
        except OSError:
            log.warning("could not remove temp entry %s", entry["name"], exc_info=True)
            return False

    def startup_sweep(self) -> dict:
        """At server start: creates root and removes everything a previous process left (no scope of
        this process is live yet; if one is, it is kept)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return self.sweep(force=True)

    # ------------------------------------------------------------ status

    def status(self) -> dict:
        """A snapshot for /admin. Names are relative to root; no absolute path appears."""
        entries = self._entries()
        with self._lock:
            active = len(self._live)
        entries.sort(key=lambda e: -e["age_seconds"])
        return {
            "root": self._display_root,
            "files": sum(e["files"] for e in entries),
            "bytes": sum(e["bytes"] for e in entries),
            "active_scopes": active,
            "oldest_age_seconds": round(entries[0]["age_seconds"], 3) if entries else None,
            "ttl_seconds": self.ttl_seconds,
            "max_total_bytes": self.max_total_bytes,
            "entries": [{"name": e["name"], "bytes": e["bytes"], "age_seconds": round(e["age_seconds"], 3),
                         "in_use": e["in_use"], "managed": e["managed"]}
                        for e in entries[:MAX_STATUS_ENTRIES]],
            "entries_truncated": len(entries) > MAX_STATUS_ENTRIES,
        }
