"""The server's record of where it listens, and the health check that reads it (stdlib only).

At start the gunicorn master writes ``<log_dir>/server.json`` = {host, port, pid} with the port it
really bound (however it was chosen: --port, PORT or the default), and removes it on a clean exit.
It lives beside the logs, not in tmp/, so the temp manager neither counts nor sweeps it.
``python main.py --healthcheck`` (the image's HEALTHCHECK, through start.sh) resolves the same log
dir from the same settings, then exits 0 only when that pid is alive and GET /ready on the recorded
address answers 200 with status "ready". No record, a stale record (dead pid), a refused or slow
connection, a server not ready (preloading, models folder unreadable, draining after SIGTERM): exit 1,
with the server's reasons in the line printed.
"""
from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

RECORD_NAME = "server.json"
# Wildcard binds are probed on loopback of the same family.
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}


def record_path(log_dir: str | os.PathLike) -> Path:
    return Path(log_dir) / RECORD_NAME


def write_record(path: Path, host: str, port: int, pid: int | None = None) -> None:
    """Write-then-rename, so a check never reads half a record. Failure is logged, never fatal."""
    record = {"host": host, "port": int(port), "pid": pid or os.getpid()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        staging.write_text(json.dumps(record))
        os.replace(staging, path)
    except OSError as exc:
        log.warning("could not write the server record %s (the health check will fail): %s", path, exc)


def record_gunicorn(path: Path, host: str, server) -> None:
    """gunicorn ``when_ready`` hook: record the port of the socket the arbiter really bound."""
    port = None
    for listener in getattr(server, "LISTENERS", []):
        address = listener.sock.getsockname()
        if isinstance(address, tuple):
            port = address[1]
            break
    if port is None:
        log.warning("no TCP listener to record for the health check")
        return
    write_record(path, host, port, server.pid)


def remove_record(path: Path, pid: int | None = None) -> None:
    """Remove the record if it is ours (another server may share the log dir)."""
    pid = pid or os.getpid()
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _url(host: str, port: int) -> str:
    host = _LOOPBACK.get(host, host).strip("[]")
    return f"http://[{host}]:{port}/ready" if ":" in host else f"http://{host}:{port}/ready"


def check(path: Path, timeout: float = 4.0) -> tuple[bool, str]:
    """(healthy, one line saying why)."""
    try:
        record = json.loads(path.read_text())
        host, port, pid = str(record["host"]), int(record["port"]), int(record["pid"])
    except FileNotFoundError:
        return False, f"no server record at {path}: the server is not running (or has not bound yet)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return False, f"unreadable server record {path}: {exc}"
    if pid <= 0 or not _pid_alive(pid):
        return False, f"stale server record {path}: pid {pid} is not running"
    url = _url(host, port)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    try:
        with opener.open(url, timeout=timeout) as response:
            body = json.loads(response.read() or b"{}")
            status = response.status
    except urllib.error.HTTPError as exc:
        try:
            reasons = "; ".join(json.loads(exc.read() or b"{}").get("reasons") or [])
        except (OSError, ValueError, AttributeError):
            reasons = ""
        return False, f"{url} answered {exc.code}" + (f": {reasons}" if reasons else "")
    except (OSError, ValueError) as exc:  # refused, timed out, not JSON
        return False, f"{url} failed: {exc}"
    if status != 200 or body.get("status") != "ready":
        return False, f"{url} answered {status} {body.get('status')!r}"
    return True, f"healthy: {url} (pid {pid})"


def main(log_dir: str | os.PathLike, timeout: float = 4.0) -> int:
    healthy, message = check(record_path(log_dir), timeout)
    print(message)
    return 0 if healthy else 1
