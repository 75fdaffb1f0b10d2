"""create_app(settings) -> Flask app. Only wiring: services, blueprints, error mapping, request ids,
logs and metrics hooks."""
from __future__ import annotations

import hmac
import json
import logging
import re
import threading
import time
import uuid

from flask import Flask, Request, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from utils.api.admin import bp as admin_bp, metrics_bp
from utils.api.auth import guard_of, token_of
from utils.api.dashboard import bp as dashboard_bp
from utils.api.devices import bp as devices_bp
from utils.api.forms import StrictFormParser
from utils.api.generate import bp as generate_bp
from utils.api.jobs import bp as jobs_bp
from utils.api.openai import bp as openai_bp
from utils.api.openai_translation import error_body
from utils.api.openapi import bp as openapi_bp, docs_bp
from utils.api.wsgi import REFUSED, ServingMiddleware
from utils.config.runtime import RuntimeSettings
from utils.config.settings import ServerSettings, load_settings
from utils.errors import ServerError, ShuttingDown, Unauthorized
from utils.hub.demo_models import DEMO_KEYS, all_demo_keys, build_demo_models
from utils.ops.lifecycle import Lifecycle
from utils.ops.logging_setup import log_access, setup_logging
from utils.families.loading import warm_imports
from utils.services import Services, Sweeper, add_jobs, build_services

log = logging.getLogger("model_server.app")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class ScopedRequest(Request):
    """Spools large multipart uploads into the request's temp scope (tmp/), not the system temp dir,
    so they count against TMP_MAX_MB, show in /admin/temp_status and vanish when the request ends.
    Multipart bodies are parsed strictly (utils/api/forms.py)."""

    SPOOL_THRESHOLD = 512 * 1024
    form_data_parser_class = StrictFormParser

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        scope = g.get("temp_scope")
        if scope is None or (total_content_length or 0) <= self.SPOOL_THRESHOLD:
            return super()._get_file_stream(total_content_length, content_type, filename, content_length)
        return scope.open(suffix=".upload")


def _install_temp_scopes(app: Flask) -> None:
    @app.before_request
    def open_temp_scope() -> None:
        if request.mimetype == "multipart/form-data":
            g.temp_scope_cm = current_app.extensions["model_server"].temp.scope(g.get("request_id"))
            g.temp_scope = g.temp_scope_cm.__enter__()

    @app.teardown_request
    def close_temp_scope(exc) -> None:
        manager = g.pop("temp_scope_cm", None)
        if manager is not None:
            g.pop("temp_scope", None)
            manager.__exit__(None, None, None)


def create_app(settings: ServerSettings | None = None, *, background: bool = True, runtime=None) -> Flask:
    """runtime: RuntimeSettings (BODY_TIMEOUT, SHUTDOWN_GRACE, METRICS_TOKEN); default from the environment."""
    settings = settings or load_settings()
    runtime = runtime or RuntimeSettings.from_env()
    for folder in (settings.models_dir, settings.tmp_dir, settings.log_dir):
        folder.mkdir(parents=True, exist_ok=True)
    setup_logging(settings.log_dir)  # once per process
    if settings.demo:
        # cached: only the first start builds
        build_demo_models(settings.models_dir / "demo", all_demo_keys() if settings.demo_matrix else DEMO_KEYS)
    app = Flask(__name__)
    app.request_class = ScopedRequest
    app.config["MAX_CONTENT_LENGTH"] = settings.max_content_length
    app.json.sort_keys = False
    services = build_services(settings)
    add_jobs(services)
    services.runtime, services.lifecycle = runtime, Lifecycle(grace=runtime.shutdown_grace)
    app.extensions["model_server"] = services
    services.temp.startup_sweep()

    app.register_blueprint(generate_bp)
    app.register_blueprint(openai_bp)
    app.register_blueprint(jobs_bp)
    app.register_blueprint(admin_bp)
    app.register_blueprint(dashboard_bp)
    app.register_blueprint(devices_bp)
    app.register_blueprint(metrics_bp)
    app.register_blueprint(openapi_bp)
    app.register_blueprint(docs_bp)
    _install_request_ids(app)
    _install_drain_refusal(app)
    _install_observability(app, services)
    _install_temp_scopes(app)
    _install_auth(app, settings, runtime)
    _install_error_handlers(app)
    _install_serving_layer(app, services)

    if background:
        # Before the process serves anything: the first request after a restart would otherwise pay
        # these imports inside its load, and transformers' lazy module is not safe to read from one
        # thread while another imports it (a request saw "no attribute 'AutoTokenizer'").
        warm_imports(any(spec.quantization != "none" for spec in settings.models.values()))
        services.jobs.start()
        services.sweeper = Sweeper(settings.sweep_interval,
                                   [services.manager.expire_idle, services.manager.relieve_pressure,
                                    services.temp.sweep, services.jobs.sweep]
                                   ).start()
        threading.Thread(target=services.lifecycle.run_preload, args=(services.manager.preload,), name="preload",
                         daemon=True).start()
    else:
        services.lifecycle.skip_preload()
    return app


def _install_serving_layer(app: Flask, services: Services) -> None:
    """The WSGI layer under Flask (utils/api/wsgi.py: bodies, drain admission, requests in flight) and
    the shutdown steps the worker runs after the drain."""
    def stream_end(path: str) -> bytes:
        details = "the server is shutting down; the answer is incomplete"
        if path.startswith("/v1/"):
            body = error_body(503, "shutting down", details)
        else:
            body = {"error": "shutting down", "details": details}
        return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()

    app.wsgi_app = ServingMiddleware(app.wsgi_app, lifecycle=services.lifecycle,
                                     max_bytes=lambda: services.settings.max_content_length,  # reloads too
                                     body_timeout=services.runtime.body_timeout, stream_end=stream_end)
    lifecycle = services.lifecycle
    lifecycle.on_shutdown("stop the sweeper", lambda: services.sweeper and services.sweeper.stop())
    lifecycle.on_shutdown("stop the jobs (running ones are queued again)", services.jobs.stop)
    lifecycle.on_shutdown("unload the models", services.manager.shutdown)
    lifecycle.on_shutdown("remove the temp files", lambda: services.temp.sweep(force=True))


def _install_drain_refusal(app: Flask) -> None:
    """Requests the WSGI layer refused while draining (after SIGTERM) get 503 + Retry-After."""
    @app.before_request
    def refuse_while_draining() -> None:
        if request.environ.get(REFUSED):
            raise ShuttingDown("the server is shutting down and takes no new requests; retry on another instance "
                               "or once it is back")


def _install_request_ids(app: Flask) -> None:
    @app.before_request
    def assign_request_id() -> None:
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if _REQUEST_ID_RE.match(given) else uuid.uuid4().hex
        g.started = time.perf_counter()

    @app.after_request
    def expose_request_id(response):
        response.headers["X-Request-ID"] = g.get("request_id", "")
        if g.get("model_device"):  # where the model ran: cpu after a fallback, cuda:N, ...
            response.headers["X-Model-Device"] = g.model_device
        return response


def _install_auth(app: Flask, settings: ServerSettings, runtime) -> None:
    """ADMIN_TOKEN guards /admin, API_TOKEN guards inference and the lists of models and devices, METRICS_TOKEN (when set) /metrics;
    /health and /ready stay open, and so do views marked `public` (the dashboard's page and assets,
    which hold no data). The table is utils/api/auth.py."""
    @app.before_request
    def check_token() -> None:
        expected = token_of(guard_of(request.path, app.view_functions.get(request.endpoint)), settings, runtime)
        if expected is None:
            return
        header = request.headers.get("Authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise Unauthorized()


def _install_observability(app: Flask, services: Services) -> None:
    """One after_request hook: the request's metrics and its access log line."""
    models = services.settings.models

    @app.after_request
    def observe(response):
        try:
            seconds = time.perf_counter() - g.get("started", time.perf_counter())
            args = request.view_args or {}
            model = g.get("model") or args.get("model") or args.get("key")
            model = model if model in models else ""  # unknown names would explode the label set
            route = request.url_rule.rule if request.url_rule else "<unmatched>"
            services.metrics.observe_request(route, request.method, model, response.status_code, seconds)
            log_access(request.method, request.path, response.status_code, seconds * 1000, model)
        except Exception:
            log.exception("recording request metrics failed")
        return response


def _install_error_handlers(app: Flask) -> None:
    def error_response(status: int, error: str, details: str, headers: dict | None = None, extra=None):
        if request.path.startswith("/v1/") or request.path == "/v1":  # OpenAI's clients read OpenAI's shape
            body = error_body(status, error, details, (extra or {}).get("field"))
        else:
            body = {"error": error, "details": details}
            body.update(extra or {})
        response = jsonify(body)
        response.status_code = status
        for name, value in (headers or {}).items():
            response.headers[name] = value
        return response

    @app.errorhandler(ServerError)
    def domain_error(exc: ServerError):
        body = exc.to_dict()
        g.error = body["error"]
        return error_response(exc.status, body.pop("error"), body.pop("details"), exc.headers, body)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(exc):
        limit = app.config["MAX_CONTENT_LENGTH"]
        return error_response(413, "payload too large",
                              f"the request body exceeds MAX_CONTENT_LENGTH_MB ({limit / 2**20:g} MB)")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return error_response(exc.code or 500, (exc.name or "error").lower(), exc.description or "", headers)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        request_id = g.get("request_id", "-")
        log.exception("unhandled error in request %s", request_id)
        return error_response(500, "internal error", f"see the server log for request id {request_id}")


if __name__ == "__main__":  # seed 001's `python app.py`: Flask's development server, main.py's flags
    import runpy
    import sys
    from pathlib import Path

    print("app.py runs Flask's development server; in production run `python main.py` (gunicorn, one worker, "
          "threads, drains on SIGTERM)", file=sys.stderr)
    # main.py's CLI run as a script (it imports this module for create_app; importing it back would be a cycle)
    sys.argv[1:1] = ["--debug"]
    runpy.run_path(str(Path(__file__).with_name("main.py")), run_name="__main__")
