"""Structured logs: one JSON object per line in <log_dir>/server.log, rotated by size.

`setup_logging` is called by create_app and is idempotent: one file handler per process, on the root
logger, so every logger (ours, transformers', werkzeug's) lands in the file. Calling it again with the
same file changes nothing; with another file (a test creating a second app) the handler moves there.

Every line carries `request_id`: a filter on the handler reads flask.g.request_id when the line is
written inside a request context (the same id the response returns in X-Request-ID), else null.

A line: {"ts": "2026-11-03T10:15:02.123Z", "level": "INFO", "logger": "model_server.access",
         "message": "POST /generate/deepseek 200 41.2ms", "request_id": "3f2a...", "method": "POST",
         "path": "/generate/deepseek", "status": 200, "ms": 41.2, "model": "deepseek"}
plus "exc" (the formatted traceback) when the line logs an exception, and any `extra=` fields.

Control characters never reach a log line raw: a client can put "%0a" (a newline) or an ANSI escape
in a path or a header, and a raw one would forge a line or repaint a terminal. The JSON file escapes
them (json does C0; `escape_control` adds DEL, C1 and the Unicode line separators, which line
readers such as str.splitlines split on); the console (stderr, `setup_console_logging`, also used
for gunicorn's own lines) writes them as \\n, \\x1b, \\u2028, ..., so one record is one line, and a
traceback's own lines are indented under it.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import re
import sys
import threading
import time
from pathlib import Path

LOG_FILE = "server.log"
DEFAULT_MAX_BYTES = 10 * 2**20
DEFAULT_BACKUP_COUNT = 5

access_log = logging.getLogger("model_server.access")
_setup_lock = threading.Lock()
# Attributes every LogRecord has; anything else on a record came from `extra=` and is written out.
_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime", "request_id"}


# C0 controls, DEL, C1 controls, and the Unicode line/paragraph separators.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_JSON_EXTRA = re.compile(r"[\x7f-\x9f\u2028\u2029]")  # what json.dumps leaves raw


def _escape_one(match: re.Match) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape_control(text: str) -> str:
    """`text` with every control character written as an escape (\\n, \\x1b, \\u2028): one line."""
    return _CONTROL.sub(_escape_one, text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        created = time.gmtime(record.created)
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", created) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        text = json.dumps(line, default=str, ensure_ascii=False)  # escapes C0 controls itself
        # What is left can only occur inside JSON strings, where \\uXXXX is the same character.
        return _JSON_EXTRA.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class ConsoleFormatter(logging.Formatter):
    """A plain-text formatter whose lines hold no raw control character: the message (and every
    field the format names) is escaped; a traceback keeps its lines, each indented and escaped."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.msg, record.args, record.exc_text
        record.msg, record.args = escape_control(record.getMessage()), None
        record.exc_text = None
        exc_info, stack_info = record.exc_info, record.stack_info
        record.exc_info = record.stack_info = None
        try:
            line = escape_control(super().format(record))
        finally:
            record.msg, record.args, record.exc_text = saved
            record.exc_info, record.stack_info = exc_info, stack_info
        extra = []
        if exc_info:
            extra.append(self.formatException(exc_info))
        elif record.exc_text:
            extra.append(record.exc_text)
        if stack_info:
            extra.append(self.formatStack(stack_info))
        for block in extra:
            line += "".join("\n    " + escape_control(part) for part in block.splitlines())
        return line


class _ConsoleHandler(logging.StreamHandler):
    """Marks the one stderr handler setup_console_logging owns."""


def setup_console_logging(level: int = logging.INFO,
                          fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    """Lines on stderr for people and container logs (idempotent; replaces logging.basicConfig)."""
    root = logging.getLogger()
    with _setup_lock:
        for handler in [h for h in root.handlers if isinstance(h, _ConsoleHandler)]:
            root.removeHandler(handler)
        handler = _ConsoleHandler(sys.stderr)
        handler.setFormatter(ConsoleFormatter(fmt))
        root.addHandler(handler)
        root.setLevel(level)


class RequestIdFilter(logging.Filter):
    """Stamps record.request_id from flask.g inside a request context (None elsewhere)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id()
        return True


def current_request_id() -> str | None:
    try:
        from flask import g, has_request_context  # deferred: flask
    except ImportError:  # utils/ runs without Flask too (e.g. under Ray Serve)
        return None
    if not has_request_context():
        return None
    return g.get("request_id")


class _ServerLogHandler(logging.handlers.RotatingFileHandler):
    """Marks the one handler setup_logging owns."""


def setup_logging(log_dir: str | Path, *, max_bytes: int | None = None, backup_count: int | None = None,
                  level: int = logging.INFO) -> Path:
    """Installs the JSON file handler (once per process); returns the log file's path."""
    path = (Path(log_dir) / LOG_FILE).resolve()
    max_bytes = int(max_bytes or DEFAULT_MAX_BYTES)
    backup_count = DEFAULT_BACKUP_COUNT if backup_count is None else int(backup_count)
    root = logging.getLogger()
    with _setup_lock:
        current = [h for h in root.handlers if isinstance(h, _ServerLogHandler)]
        for handler in current:
            if (Path(handler.baseFilename) == path and handler.maxBytes == max_bytes
                    and handler.backupCount == backup_count):
                return path
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = _ServerLogHandler(path, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8",
                                    delay=True)
        handler.setLevel(level)
        handler.setFormatter(JsonFormatter())
        handler.addFilter(RequestIdFilter())
        root.addHandler(handler)
        for old in current:
            root.removeHandler(old)
            old.close()
        ours = logging.getLogger("model_server")
        if ours.getEffectiveLevel() > level:  # INFO lines (loads, access) must reach the file
            ours.setLevel(level)
    return path


def log_access(method: str, path: str, status: int, ms: float, model: str | None) -> None:
    """The access line written once per request (by app.py's after_request hook)."""
    access_log.info("%s %s %s %.1fms", method, path, status, ms,
                    extra={"method": method, "path": path, "status": status, "ms": round(ms, 2),
                           "model": model or None})
