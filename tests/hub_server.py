"""A small Hugging Face Hub look-alike on loopback, for tests of the real downloader.

Serves folders on disk as model repos, answering the requests huggingface_hub 2.4's
`snapshot_download` / `HfApi.model_info` make (see DESIGN.md, "Facts behind the choices"):

  GET  /api/models/{repo}[/revision/{rev}]        JSON: id, sha, siblings (sizes when ?blobs=true)
  GET  /api/models/{repo}/tree/{rev}[/{dir}]      JSON list of {"type": "file", "path", "size", "oid"[, "lfs"]}
  HEAD /{repo}/resolve/{rev}/{file}               X-Repo-Commit, ETag, Content-Length, Accept-Ranges
  GET  /{repo}/resolve/{rev}/{file}               the bytes; Range (bytes=a- / a-b) answered with 206

A missing repo is 404 with `X-Error-Code: RepoNotFound`; an unknown revision 404 `RevisionNotFound`; a
missing file 404 `EntryNotFound`. With a `token`, every request needs `Authorization: Bearer <token>`:
no token -> 401 + RepoNotFound (what the Hub answers for a private repo), a wrong one -> 401 "Invalid
credentials in Authorization header". `cut_next(file)` makes the next GET of that file send half of its
bytes and close the connection (optionally holding it open first, so a test can kill the client mid-file).

Point huggingface_hub at it with HF_ENDPOINT=<hub.url> and HF_HUB_DISABLE_XET=1 (read at import time,
so run the client in a subprocess). Usage:

    hub = start_hub(tmp_path, {"test-org/tiny-model": checkpoint_dir}, token=None)
    ... hub.url, hub.requests -> [(method, path, range_header), ...]
    hub.stop()
"""
from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

# Files the Hub stores in LFS (their ETag is the sha256; the tree lists an "lfs" entry).
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".msgpack", ".h5", ".gguf", ".model")


class Request(NamedTuple):
    method: str
    path: str  # URL path, unquoted, without the query string
    range: str | None  # the Range header, if any


@dataclass(frozen=True)
class _File:
    data: bytes
    sha256: str
    git_oid: str
    lfs: bool


class _Repo:
    def __init__(self, repo_id: str, folder: Path):
        self.repo_id = repo_id
        self.folder = folder
        self.files: dict[str, _File] = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            data = path.read_bytes()
            git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            self.files[rel] = _File(data, hashlib.sha256(data).hexdigest(), git_oid, rel.endswith(_LFS_SUFFIXES))
        digest = hashlib.sha1(repo_id.encode())
        for rel, f in self.files.items():
            digest.update(f"{rel}\0{f.sha256}\n".encode())
        self.sha = digest.hexdigest()  # 40 hex digits: the commit id of this snapshot

    def resolves(self, revision: str) -> bool:
        return revision in ("main", self.sha)


class _Hub(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, repos: dict[str, _Repo], token: str | None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos = repos
        self.token = token
        self.log: list[Request] = []
        self.log_lock = threading.Lock()
        self.cuts: dict[str, tuple[int | None, bool]] = {}  # file path -> (bytes to send, hold open)
        self.cut_done = threading.Event()
        self.release = threading.Event()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Hub

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode())

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _authorized(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        sent = self.headers.get("Authorization")
        if sent is None:
            self._error(401, "Repository not found", "RepoNotFound")
            return False
        if sent != f"Bearer {token}":
            self._error(401, "Invalid credentials in Authorization header")
            return False
        return True

    # ------------------------------------------------------------------ routes
    def do_HEAD(self):  # noqa: N802
        self._route()

    def do_GET(self):  # noqa: N802
        self._route()

    def _route(self) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        with self.server.log_lock:
            self.server.log.append(Request(self.command, path, self.headers.get("Range")))
        if not self._authorized():
            return
        parts = [p for p in path.split("/") if p]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            repo = self._repo(repo_id)
            if repo is None:
                return
            if not rest:
                return self._info(repo, "main", query)
            if rest[0] == "revision" and len(rest) == 2:
                return self._info(repo, rest[1], query)
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo, rest[1], "/".join(rest[2:]), query)
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo = self._repo("/".join(parts[:2]))
            if repo is None:
                return
            return self._resolve(repo, parts[3], "/".join(parts[4:]))
        self._error(404, f"no route for {path}")

    def _repo(self, repo_id: str) -> _Repo | None:
        repo = self.server.repos.get(repo_id)
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
        return repo

    def _revision_ok(self, repo: _Repo, revision: str) -> bool:
        if not repo.resolves(revision):
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return False
        return True

    def _info(self, repo: _Repo, revision: str, query: dict) -> None:
        if not self._revision_ok(repo, revision):
            return
        blobs = query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for rel, f in repo.files.items():
            entry = {"rfilename": rel}
            if blobs:
                entry.update(size=len(f.data), blobId=f.git_oid)
                if f.lfs:
                    entry["lfs"] = {"size": len(f.data), "sha256": f.sha256, "pointerSize": 134}
            siblings.append(entry)
        self._json({"_id": repo.sha[:24], "id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.sha,
                    "private": self.server.token is not None, "gated": False, "disabled": False,
                    "lastModified": "2026-11-01T00:00:00.000Z", "tags": [], "siblings": siblings})

    def _tree(self, repo: _Repo, revision: str, under: str, query: dict) -> None:
        if not self._revision_ok(repo, revision):
            return
        recursive = query.get("recursive", "").lower() in ("1", "true")
        prefix = f"{under.strip('/')}/" if under.strip("/") else ""
        entries, folders = [], set()
        for rel, f in repo.files.items():
            if not rel.startswith(prefix):
                continue
            tail = rel[len(prefix):]
            dirs = tail.split("/")[:-1]
            for depth in (range(1, len(dirs) + 1) if recursive else range(1, min(1, len(dirs)) + 1)):
                folders.add(prefix + "/".join(dirs[:depth]))
            if "/" in tail and not recursive:
                continue
            entry = {"type": "file", "oid": f.git_oid, "size": len(f.data), "path": rel}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
            entries.append(entry)
        dir_entries = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                       for d in sorted(folders)]
        self._json(dir_entries + entries)

    def _resolve(self, repo: _Repo, revision: str, rel: str) -> None:
        if not self._revision_ok(repo, revision):
            return
        f = repo.files.get(rel)
        if f is None:
            return self._error(404, f"Entry not found: {rel}", "EntryNotFound")
        size = len(f.data)
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{f.sha256 if f.lfs else f.git_oid}"',
                   "Accept-Ranges": "bytes"}
        start, end, status = 0, size - 1, 200
        range_header = self.headers.get("Range")
        if range_header and self.command == "GET":
            try:
                unit, spec = range_header.split("=", 1)
                first, last = spec.split("-", 1)
                if unit.strip() != "bytes" or "," in spec:
                    raise ValueError
                start = int(first)
                end = min(int(last), size - 1) if last.strip() else size - 1
                if start > end:
                    raise ValueError
            except ValueError:
                return self._send(416, b"", {"Content-Range": f"bytes */{size}"}, "text/plain")
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        body = f.data[start:end + 1]
        cut = self.server.cuts.pop(rel, None) if self.command == "GET" else None
        if cut is not None:
            at, hold = cut
            return self._cut(status, body, headers, at=len(body) // 2 if at is None else at, hold=hold)
        self._send(status, body, headers, "application/octet-stream")

    def _cut(self, status: int, body: bytes, headers: dict, *, at: int, hold: bool) -> None:
        """Announces the whole body, sends its first `at` bytes, then drops the connection."""
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:at])
        self.wfile.flush()
        self.server.cut_done.set()
        if hold:
            self.server.release.wait(timeout=60)
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class HubServer:
    """Handle on a running hub look-alike: `.url`, `.requests`, `.cut_next(file)`, `.stop()`."""

    def __init__(self, hub: _Hub):
        self._hub = hub
        self._thread = threading.Thread(target=hub.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        host, port = hub.server_address[:2]
        self.url = f"http://{host}:{port}"

    @property
    def requests(self) -> list[Request]:
        """A copy of the request log: (method, path, range header) in arrival order."""
        with self._hub.log_lock:
            return list(self._hub.log)

    def clear_requests(self) -> None:
        with self._hub.log_lock:
            self._hub.log.clear()

    def sha(self, repo_id: str) -> str:
        return self._hub.repos[repo_id].sha

    def cut_next(self, file: str, *, at: int | None = None, hold: bool = False) -> None:
        """The next GET of `file` (path in the repo) sends half its bytes (or `at` bytes), then closes
        the connection.

        huggingface_hub 2.4 reads the body in 10 MiB chunks and resumes from the last whole chunk it
        wrote, so a cut shows up as a `Range` retry only after more than 10 MiB of the file arrived.
        With `hold=True` the connection stays open after the half until `release()` (or `stop()`), so a
        test can kill the client mid-file; `wait_cut()` returns once the half has been sent.
        """
        self._hub.cut_done.clear()
        self._hub.release.clear()
        self._hub.cuts[file] = (at, hold)

    def wait_cut(self, timeout: float = 30.0) -> bool:
        return self._hub.cut_done.wait(timeout)

    def release(self) -> None:
        self._hub.release.set()

    def stop(self) -> None:
        self._hub.release.set()
        self._hub.shutdown()
        self._hub.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "HubServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_hub(root: Path, repos: dict[str, Path], token: str | None = None) -> HubServer:
    """Serves each folder in `repos` ({"org/name": folder}; relative folders are under `root`) on a
    free loopback port. The files are read once, at start; the commit sha is derived from their content.
    """
    loaded = {}
    for repo_id, folder in repos.items():
        folder = Path(folder)
        folder = folder if folder.is_absolute() else Path(root) / folder
        if not folder.is_dir():
            raise FileNotFoundError(f"repo folder for {repo_id} not found: {folder}")
        loaded[repo_id] = _Repo(repo_id, folder)
    return HubServer(_Hub(loaded, token))
