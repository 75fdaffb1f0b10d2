"""Command line: serve the configured models (gunicorn, one process), or download them first.

Models live in the memory of ONE process, so gunicorn runs one worker with many threads; more
workers would each load their own copy of every model.

Safe by default: it refuses to listen beyond loopback while /admin or the inference routes are open
(no ADMIN_TOKEN / API_TOKEN) unless told `--insecure`; `--debug` never serves Werkzeug's interactive
debugger. SIGTERM drains (utils/ops/gunicorn_worker.py): new requests get 503, those in flight get
SHUTDOWN_GRACE seconds, then the models are unloaded, the temp files removed, and the exit is 0.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import signal
import sys

from utils.ops import healthcheck
from utils.errors import ConfigError
from utils.ops.logging_setup import setup_console_logging
from utils.config.runtime import RuntimeSettings
from utils.config.settings import BACKENDS, ServerSettings, load_settings

log = logging.getLogger("model_server.main")


def _demo_set(value: str) -> str:
    """`--demo all`: the architecture matrix too; plain `--demo` is True (the default demo set)."""
    if value != "all":
        raise argparse.ArgumentTypeError(f"--demo takes no value or 'all'; got {value!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Multimodal model server")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"),
                        help="address to bind (default 127.0.0.1); beyond loopback only with ADMIN_TOKEN and "
                             "API_TOKEN set, or --insecure")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "5000")))
    parser.add_argument("--config", default=None, help="models.yaml to use (default: MODELS_CONFIG or ./models.yaml)")
    parser.add_argument("--demo", nargs="?", const=True, default=False, type=_demo_set, metavar="all",
                        help="serve tiny random-weight checkpoints of every family (built offline in seconds); "
                             "--demo all: the architecture matrix too (docs/models.md)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="local: this one process holds the models (default); ray: Ray Serve replicas hold them "
                             "(models.yaml server.backend / MODEL_SERVER_BACKEND; RAY_ADDRESS joins a cluster)")
    parser.add_argument("--insecure", action="store_true",
                        help="listen beyond loopback even while /admin or the inference routes have no token")
    parser.add_argument("--debug", action="store_true",
                        help="Flask's development server with debug logging (never the interactive debugger)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "32")),
                        help="request threads of the single gunicorn worker")
    parser.add_argument("--timeout", type=int, default=int(os.environ.get("REQUEST_TIMEOUT", "900")),
                        help="seconds before gunicorn restarts a stuck worker")
    downloads = parser.add_mutually_exclusive_group()
    downloads.add_argument("--download", action="store_true",
                           help="download missing models, then serve (the default, as seed 001 did)")
    downloads.add_argument("--download-only", action="store_true", help="download missing models and exit")
    downloads.add_argument("--skip-download", action="store_true",
                           help="never download (also with HF_HUB_OFFLINE=1 and in demo mode)")
    parser.add_argument("--model", nargs="+", default=None, help="with --download*: only these model keys")
    parser.add_argument("--no-quant-cache", action="store_true",
                        help="with --download / --download-only: do not build the quantized cache ahead of time")
    parser.add_argument("--healthcheck", action="store_true",
                        help="exit 0 if the server recorded in the tmp dir answers /health, else 1 (the image's "
                             "HEALTHCHECK; give it the same --config / environment as the server)")
    return parser.parse_args(argv)


def is_loopback(host: str) -> bool:
    """Whether `host` binds only this machine's loopback ("" and 0.0.0.0 bind every interface)."""
    host = host.strip().strip("[]")
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, assume it is reachable from outside


def open_routes(settings: ServerSettings) -> list[str]:
    """What anyone who reaches the port may do, for lack of a token."""
    opened = []
    if settings.admin_token is None:
        opened.append("/admin: ADMIN_TOKEN is not set (anyone could load, unload and clean up models)")
    if settings.api_token is None:
        opened.append("/generate and /v1: API_TOKEN is not set (anyone could run every model)")
    return opened


def check_bind(host: str, settings: ServerSettings, runtime: RuntimeSettings, insecure: bool) -> str | None:
    """None when serving on `host` is allowed, else the message to exit with."""
    if is_loopback(host):
        if settings.admin_token is None and settings.api_token is None:
            log.info("no ADMIN_TOKEN/API_TOKEN set: bound to %s; set them before exposing the server", host)
        return None
    opened = open_routes(settings)
    if runtime.metrics_token is None:
        log.info("/metrics is open on %s (set METRICS_TOKEN to guard it)", host)
    if not opened:
        return None
    if insecure:
        log.warning("--insecure: listening on %s with open routes: %s", host, "; ".join(opened))
        return None
    lines = "\n".join(f"  - {line}" for line in opened)
    return (f"refusing to listen on {host or 'every interface'} (beyond loopback) with routes open to anyone "
            f"who can reach the port:\n{lines}\nSet ADMIN_TOKEN and API_TOKEN, listen on 127.0.0.1, or pass "
            f"--insecure to serve them open anyway.")


def run_gunicorn(app_factory, host: str, port: int, threads: int, timeout: int, record=None,
                 grace: float = 30.0, log_dir=None) -> None:
    """record: where the master writes {host, port, pid} once bound, removed on exit (the health check).
    grace: SHUTDOWN_GRACE; the master kills a worker still draining SHUTDOWN_MARGIN seconds after it.
    log_dir: this instance's folder, where gunicorn's control socket goes (one per port)."""
    from gunicorn.app.base import BaseApplication  # deferred: gunicorn

    from utils.ops.gunicorn_worker import (SHUTDOWN_MARGIN, ConfigReloadArbiter,  # deferred: gunicorn
                                           EscapingLogger, ModelServerWorker, control_socket_path)

    class ModelServerApplication(BaseApplication):
        def load_config(self):
            for key, value in {"bind": f"{host}:{port}", "workers": 1, "worker_class": ModelServerWorker,
                               "threads": threads, "timeout": timeout,
                               "graceful_timeout": math.ceil(grace) + SHUTDOWN_MARGIN,
                               "logger_class": EscapingLogger, "accesslog": None, "loglevel": "info",
                               # No header may set SCRIPT_NAME or PATH_INFO (gunicorn trusts them from
                               # forwarded_allow_ips, loopback by default): headers with "_" are dropped.
                               "forwarder_headers": ""}.items():
                self.cfg.set(key, value)
            if "control_socket" in self.cfg.settings:  # gunicorn >= 25.1
                self.cfg.set("control_socket", str(control_socket_path(log_dir, port)))
            if record is not None:
                self.cfg.set("when_ready", lambda server: healthcheck.record_gunicorn(record, host, server))
                self.cfg.set("on_exit", lambda server: healthcheck.remove_record(record, server.pid))

        def load(self):
            return app_factory()

        def run(self):
            ConfigReloadArbiter(self).run()

    ModelServerApplication().run()


def main(argv=None) -> int:
    from utils.serving.memory import limit_malloc_arenas  # deferred: psutil
    limit_malloc_arenas()  # before gunicorn or any thread starts (see its note)
    args = parse_args(argv)
    setup_console_logging(logging.DEBUG if args.debug else logging.INFO)
    try:
        # --backend as the environment variable it stands for, in the environment a config reload
        # reads again: otherwise the reload sees the file's backend and reports a restart needed
        env = dict(os.environ, MODEL_SERVER_BACKEND=args.backend) if args.backend else None
        settings = load_settings(args.config, env=env, demo=args.demo)
        runtime = RuntimeSettings.from_env()
    except ConfigError as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.healthcheck:
        return healthcheck.main(settings.log_dir)

    if not args.download_only:  # refuse before spending minutes on downloads
        refusal = check_bind(args.host, settings, runtime, args.insecure)
        if refusal:
            print(refusal, file=sys.stderr)
            return 2

    if settings.demo:
        if args.download or args.download_only:
            print("--demo serves built-in tiny checkpoints; nothing to download", file=sys.stderr)
    elif args.download_only:
        fetched = fetch_missing(settings, args.model, every=True)
        cached = args.no_quant_cache or build_cache(settings, args.model)
        return 0 if fetched and cached else 1
    elif not args.skip_download and os.environ.get("HF_HUB_OFFLINE", "") not in ("1", "true", "yes"):
        fetch_missing(settings, args.model)  # failures are reported; the models that are there still serve
        if args.download and not args.no_quant_cache:  # not by default: minutes before serving
            build_cache(settings, args.model)

    from app import create_app  # deferred: flask (and the serving stack; --healthcheck stays stdlib)
    record = healthcheck.record_path(settings.log_dir)
    if args.debug:
        return run_debug(create_app(settings, runtime=runtime), args.host, args.port, record)
    run_gunicorn(lambda: create_app(settings, runtime=runtime), args.host, args.port, args.threads, args.timeout,
                 record, grace=runtime.shutdown_grace, log_dir=settings.log_dir)
    return 0


def fetch_missing(settings, keys=None, *, every: bool = False) -> bool:
    """Downloads the configured models whose folders hold no complete checkpoint (`every`: asks the
    hub about complete ones too, as --download-only does); prints a summary. True when all are ok."""
    from utils.hub.download import download_models, format_summary, reserve_bytes_from_env  # deferred: hub
    from utils.hub.model_folder import checkpoint_state  # deferred: huggingface_hub
    wanted = keys or list(settings.models)
    if not every:
        wanted = [k for k in wanted if checkpoint_state(settings.models[k].path) != "downloaded"]
        if not wanted:
            return True
        log.info("fetching missing models before serving: %s (--skip-download to serve without)", ", ".join(wanted))
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    results = download_models(settings, wanted, reserve_bytes=reserve_bytes_from_env())
    print(format_summary(results))
    return all(r.ok for r in results)


def build_cache(settings, keys=None) -> bool:
    """Quantizes the 4-bit / 8-bit models into the quantized cache ahead of their first load."""
    from utils.serving.quantized_cache import build_quantized_cache, format_cache_report  # deferred: serving
    report = build_quantized_cache(settings, keys or list(settings.models))
    print(format_cache_report(report))
    return not any(row.get("status") == "failed" for row in report)


def run_debug(app, host: str, port: int, record) -> int:
    """Flask's development server: debug logging, never Werkzeug's interactive debugger (its /console
    runs Python for whoever reaches it). SIGTERM stops it like Ctrl-C (no drain), then the shutdown
    steps run."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    healthcheck.write_record(record, host, port)
    try:
        app.run(host=host, port=port, debug=False, use_debugger=False, use_evalex=False, use_reloader=False,
                threaded=True)
    finally:
        healthcheck.remove_record(record)
        app.extensions["model_server"].lifecycle.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
