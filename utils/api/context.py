"""What every route reads from the request and the app: the shared services, the body (JSON or
multipart) and whether the client is still there. Shared by the blueprints, which import it downward."""
from __future__ import annotations

import json
import socket

from flask import current_app, request

from utils.errors import InvalidInput, UnsupportedMediaType


def services():
    return current_app.extensions["model_server"]


def request_body() -> tuple[dict, dict[str, list[bytes]]]:
    """The body as a dict plus uploaded files by field name (JSON or multipart/form-data)."""
    mimetype = request.mimetype or ""
    if mimetype == "application/json" or mimetype.endswith("+json"):
        raw = request.get_data(cache=True)
        if not raw.strip():
            raise InvalidInput("the request body is empty; send a JSON object", error="malformed JSON")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidInput(f"the body is not valid JSON: {exc}", error="malformed JSON") from None
        if not isinstance(body, dict):
            raise InvalidInput(f"the body must be a JSON object, got {type(body).__name__}", error="malformed JSON")
        return body, {}
    if mimetype == "multipart/form-data":
        body = {k: (v if len(v) > 1 else v[0]) for k, v in request.form.lists()}
        # A browser form's unused file input sends an empty, unnamed part: not an upload.
        uploads = {name: [data for f in request.files.getlist(name) if (data := f.read()) or f.filename]
                   for name in request.files}
        return body, uploads
    raise UnsupportedMediaType(f"send Content-Type: application/json or multipart/form-data "
                               f"(got {mimetype or 'none'})")


def client_gone_probe():
    """A check that the client closed its connection while its request waits (gunicorn's socket;
    None where the server gives no socket, as Flask's test client)."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return None

    def gone() -> bool:
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False  # open, nothing sent: still waiting for us
        except OSError:
            return True
    return gone
