"""Domain errors. Each carries its HTTP status so app.py maps them in one place.

utils/ stays free of Flask: these are plain exceptions with a status number attached.
"""
from __future__ import annotations


class ServerError(Exception):
    """Base of every error the server reports to a client on purpose."""

    status = 500
    error = "internal error"

    def __init__(self, details: str = "", *, error: str | None = None, headers: dict | None = None,
                 field: str | None = None):
        super().__init__(details or error or self.error)
        self.details = details
        if error is not None:
            self.error = error
        self.headers = dict(headers or {})
        self.field = field  # the request field at fault, when one is

    def to_dict(self) -> dict:
        body = {"error": self.error, "details": self.details}
        if self.field:
            body["field"] = self.field
        return body


class InvalidInput(ServerError):
    """The request is malformed: wrong types, bad values, undecodable media."""

    status = 400
    error = "invalid input"


class UnsupportedMediaType(ServerError):
    status = 415
    error = "unsupported media type"


class PayloadTooLarge(ServerError):
    status = 413
    error = "payload too large"


class Unauthorized(ServerError):
    status = 401
    error = "unauthorized"

    def __init__(self, details: str = "missing or invalid bearer token"):
        super().__init__(details, headers={"WWW-Authenticate": "Bearer"})


class UnknownModel(ServerError):
    status = 404
    error = "unknown model"


class ModelBusy(ServerError):
    """An operation on a model conflicts with requests that hold it."""

    status = 409
    error = "model busy"


class ModelUnavailable(ServerError):
    """The model cannot serve now: its load failed, or it does not fit in memory.

    ``retry_after`` (seconds) becomes the Retry-After header.
    """

    status = 503
    error = "model unavailable"

    def __init__(self, details: str = "", *, retry_after: float | None = None, error: str | None = None):
        headers = {"Retry-After": str(max(1, int(round(retry_after))))} if retry_after else {}
        super().__init__(details, error=error, headers=headers)
        self.retry_after = retry_after


class InsufficientMemory(ModelUnavailable):
    error = "insufficient memory"


class OutOfMemory(ModelUnavailable):
    """The device ran out of memory during generation; the model stays loaded and serves on."""

    error = "out of memory"


class RequestTimeout(ServerError):
    """The request's own deadline (`timeout`) passed before its answer was complete."""

    status = 408
    error = "request timeout"


class BodyTimeout(ServerError):
    """The request body did not arrive in full within BODY_TIMEOUT seconds."""

    status = 408
    error = "body timeout"


class ShuttingDown(ServerError):
    """The server is draining before it exits (SIGTERM): it takes no new requests."""

    status = 503
    error = "shutting down"

    def __init__(self, details: str = "", *, retry_after: float = 5.0):
        super().__init__(details, headers={"Retry-After": str(max(1, int(round(retry_after))))})


class ConfigError(Exception):
    """Invalid settings: raised at start, never mapped to HTTP."""
