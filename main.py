"""Command line: serve the configured models (gunicorn, one process), or download them first.

Models live in the memory of ONE process, so gunicorn runs one worker with many threads; more
workers would each load their own copy of every model.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from utils import healthcheck
from utils.errors import ConfigError
from utils.settings import load_settings

log = logging.getLogger("model_server.main")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Multimodal model server")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"),
                        help="address to bind (default 127.0.0.1; use 0.0.0.0 only with API/ADMIN tokens set)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "5000")))
    parser.add_argument("--config", default=None, help="models.yaml to use (default: MODELS_CONFIG or ./models.yaml)")
    parser.add_argument("--demo", action="store_true",
                        help="serve tiny random-weight checkpoints of every family (built offline in seconds)")
    parser.add_argument("--debug", action="store_true", help="Flask's development server with debug logging")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "32")),
                        help="request threads of the single gunicorn worker")
    parser.add_argument("--timeout", type=int, default=int(os.environ.get("REQUEST_TIMEOUT", "900")),
                        help="seconds before gunicorn restarts a stuck worker")
    downloads = parser.add_mutually_exclusive_group()
    downloads.add_argument("--download", action="store_true", help="download missing models, then serve")
    downloads.add_argument("--download-only", action="store_true", help="download missing models and exit")
    downloads.add_argument("--skip-download", action="store_true", help="never download (the default)")
    parser.add_argument("--model", nargs="+", default=None, help="with --download*: only these model keys")
    parser.add_argument("--healthcheck", action="store_true",
                        help="exit 0 if the server recorded in the tmp dir answers /health, else 1 (the image's "
                             "HEALTHCHECK; give it the same --config / environment as the server)")
    return parser.parse_args(argv)


def run_gunicorn(app_factory, host: str, port: int, threads: int, timeout: int, record=None) -> None:
    """record: where the master writes {host, port, pid} once bound, removed on exit (the health check)."""
    from gunicorn.app.base import BaseApplication

    class ModelServerApplication(BaseApplication):
        def load_config(self):
            for key, value in {"bind": f"{host}:{port}", "workers": 1, "worker_class": "gthread",
                               "threads": threads, "timeout": timeout, "graceful_timeout": 30,
                               "accesslog": None, "loglevel": "info"}.items():
                self.cfg.set(key, value)
            if record is not None:
                self.cfg.set("when_ready", lambda server: healthcheck.record_gunicorn(record, host, server))
                self.cfg.set("on_exit", lambda server: healthcheck.remove_record(record, server.pid))

        def load(self):
            return app_factory()

    ModelServerApplication().run()


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(args.config, demo=args.demo)
    except ConfigError as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.healthcheck:
        return healthcheck.main(settings.log_dir)

    if args.download or args.download_only:
        if settings.demo:
            print("--demo serves built-in tiny checkpoints; nothing to download", file=sys.stderr)
        else:
            from utils.download_model import download_models, format_summary, reserve_bytes_from_env
            logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per HTTP request otherwise
            results = download_models(settings, args.model or list(settings.models),
                                      reserve_bytes=reserve_bytes_from_env())
            print(format_summary(results))
            failed = [r for r in results if not r.ok]
            if args.download_only or failed:
                return 1 if failed else 0

    if settings.admin_token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s without ADMIN_TOKEN: anyone who reaches this port can unload models", args.host)
    if settings.admin_token is None and settings.api_token is None:
        log.info("no ADMIN_TOKEN/API_TOKEN set: bound to %s; set them before exposing the server", args.host)

    from app import create_app
    record = healthcheck.record_path(settings.log_dir)
    if args.debug:
        healthcheck.write_record(record, args.host, args.port)
        try:
            create_app(settings).run(host=args.host, port=args.port, debug=True, use_reloader=False, threaded=True)
        finally:
            healthcheck.remove_record(record)
        return 0
    run_gunicorn(lambda: create_app(settings), args.host, args.port, args.threads, args.timeout, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
