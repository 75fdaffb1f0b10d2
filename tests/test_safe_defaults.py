"""Safe defaults: binding beyond loopback, --debug without Werkzeug's console, METRICS_TOKEN, /ready.

The CLI cases run `main.py` as a process; the rest use Flask's test client.
"""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading

import pytest
import requests

from tests.conftest import ROOT, free_port, make_app, wait_for
from tests.conftest import test_env as server_env
from utils.config.runtime import RuntimeSettings


def run_main(models_dir, tmp_path, args, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("ADMIN_TOKEN", "API_TOKEN", "HOST")}
    full.update(server_env(models_dir, tmp_path, **env))
    return subprocess.run([sys.executable, "main.py", "--demo", "--port", str(free_port()), *args], cwd=ROOT,
                          env=full, capture_output=True, text=True, timeout=120)


# ---- binding beyond loopback ---------------------------------------------------------------------------------

@pytest.mark.parametrize("host, tokens, open_routes", [
    ("0.0.0.0", {}, ["/admin", "/generate and /v1"]),
    ("0.0.0.0", {"ADMIN_TOKEN": "a"}, ["/generate and /v1"]),  # only ADMIN_TOKEN: inference would be open
    ("::", {"API_TOKEN": "b"}, ["/admin"]),
])
def test_a_bind_beyond_loopback_is_refused_without_both_tokens(models_dir, tmp_path, host, tokens, open_routes):
    result = run_main(models_dir, tmp_path, ["--host", host], **tokens)
    assert result.returncode == 2, result.stderr[-2000:]
    message = result.stderr
    assert f"refusing to listen on {host}" in message and "--insecure" in message
    for route in open_routes:
        assert f"  - {route}:" in message
    assert ("ADMIN_TOKEN is not set" in message) == ("/admin" in open_routes)
    assert not (tmp_path / "logs" / "server.json").exists()  # never bound


def test_loopback_needs_no_tokens_and_names_count_as_reachable():
    from main import check_bind, is_loopback
    from utils.config.settings import load_settings
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "", "::", "10.0.0.5", "my-host.example"):
        assert not is_loopback(host), host
    open_settings = load_settings(env={"DEMO_MODE": "1"})
    runtime = RuntimeSettings()
    assert check_bind("127.0.0.1", open_settings, runtime, insecure=False) is None
    assert check_bind("0.0.0.0", open_settings, runtime, insecure=True) is None
    guarded = open_settings.replace(admin_token="a", api_token="b")
    assert check_bind("0.0.0.0", guarded, runtime, insecure=False) is None


def test_insecure_serves_beyond_loopback_and_warns(start_server):
    server = start_server(["--host", "0.0.0.0", "--insecure"])
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert requests.post(server.url + "/generate/deepseek", json={"prompt": "hi", "max_new_tokens": 2},
                         timeout=60).status_code == 200
    log_text = server.log_path.read_text()
    assert "--insecure: listening on 0.0.0.0 with open routes" in log_text and "API_TOKEN is not set" in log_text


# ---- --debug -----------------------------------------------------------------------------------------------

def test_debug_mode_serves_no_werkzeug_console(start_server):
    server = start_server(["--debug"], ADMIN_TOKEN="admin-secret")
    for path in ("/console", "/console?__debugger__=yes&cmd=resource&f=debugger.js"):
        response = requests.get(server.url + path, timeout=10)
        assert response.status_code == 404, (path, response.text[:200])
        assert response.json()["error"] == "not found"
    assert "Debugger PIN" not in server.log_text() and "Debugger is active" not in server.log_text()
    assert requests.post(server.url + "/generate/deepseek", json={"prompt": "hi", "max_new_tokens": 2},
                         timeout=60).status_code == 200


# ---- METRICS_TOKEN -----------------------------------------------------------------------------------------

def test_metrics_token_guards_metrics_only(make_settings):
    from app import create_app
    app = create_app(make_settings(), background=False, runtime=RuntimeSettings(metrics_token="scrape-me"))
    client = app.test_client()
    try:
        for header in (None, "Bearer wrong", "scrape-me", "Bearer scrape-mee"):
            response = client.get("/metrics", headers={"Authorization": header} if header else {})
            assert response.status_code == 401, header
            assert response.get_json()["error"] == "unauthorized" and response.headers["WWW-Authenticate"] == "Bearer"
        scraped = client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
        assert scraped.status_code == 200 and b"model_server_http_requests_total" in scraped.data
        assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
        assert client.post("/generate/deepseek", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200
    finally:
        app.extensions["model_server"].manager.shutdown()


def test_metrics_token_comes_from_the_environment():
    assert RuntimeSettings.from_env({}).metrics_token is None
    assert RuntimeSettings.from_env({"METRICS_TOKEN": ""}).metrics_token is None
    assert RuntimeSettings.from_env({"METRICS_TOKEN": "t", "BODY_TIMEOUT": "2", "SHUTDOWN_GRACE": "0"}) == \
        RuntimeSettings(body_timeout=2.0, shutdown_grace=0.0, metrics_token="t")
    from utils.errors import ConfigError
    for bad in ({"BODY_TIMEOUT": "soon"}, {"BODY_TIMEOUT": "0"}, {"SHUTDOWN_GRACE": "-1"}, {"SHUTDOWN_GRACE": "nan"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            RuntimeSettings.from_env(bad)


# ---- /ready ------------------------------------------------------------------------------------------------

def test_ready_waits_for_preloads_reports_failures_and_turns_503_when_draining(make_settings, extra_config):
    settings = make_settings(MODELS_CONFIG=extra_config, MODEL_DEEPSEEK_PRELOAD="1", MODEL_MISSING_PRELOAD="1")
    app = make_app(settings)
    client = app.test_client()
    services = app.extensions["model_server"]
    lifecycle = services.lifecycle
    release = threading.Event()
    try:
        assert client.get("/ready").status_code == 200  # no background work: nothing will preload

        def slow_preload():
            release.wait(30)
            services.manager.preload()

        preloading = threading.Thread(target=lifecycle.run_preload, args=(slow_preload,))
        preloading.start()
        assert wait_for(lambda: lifecycle.preload_state == "running")
        waiting = client.get("/ready")
        assert waiting.status_code == 503 and waiting.headers["Retry-After"]
        body = waiting.get_json()
        assert body["status"] == "not ready" and body["checks"]["preload"] == "running"
        assert any("preloading" in reason for reason in body["reasons"])
        assert client.get("/health").status_code == 200  # liveness is not readiness

        release.set()
        preloading.join(60)
        ready = client.get("/ready")
        assert ready.status_code == 200, ready.get_json()
        body = ready.get_json()
        assert body["status"] == "ready" and body["checks"] == {"settings": "loaded", "models_dir": "readable",
                                                                "preload": "done", "draining": False}
        assert list(body["preload_failed"]) == ["missing"]  # failed, reported, not waited on
        assert services.manager.snapshot_one("deepseek")["loaded"] is True

        lifecycle.begin_drain()
        draining = client.get("/ready")
        assert draining.status_code == 503 and draining.get_json()["status"] == "draining"
        refused = client.post("/generate/deepseek", json={"prompt": "hi", "max_new_tokens": 2})
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert refused.get_json()["error"] == "shutting down"
        openai = client.post("/v1/chat/completions", json={"model": "deepseek", "messages": []})
        assert openai.status_code == 503 and openai.get_json()["error"]["code"] == "shutting_down"
        assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
    finally:
        release.set()
        services.manager.shutdown()


def test_ready_is_503_when_the_models_folder_is_unreadable(make_settings, tmp_path):
    settings = make_settings()
    app = make_app(settings)
    try:
        lifecycle = app.extensions["model_server"].lifecycle
        ready, body = lifecycle.readiness(tmp_path / "no-such-folder", {})
        assert not ready and body["checks"]["models_dir"] == "unreadable"
        assert app.test_client().get("/ready").status_code == 200
    finally:
        app.extensions["model_server"].manager.shutdown()


# ---- log lines ---------------------------------------------------------------------------------------------

def test_control_characters_in_a_path_never_forge_a_log_line(make_settings):
    from utils.ops.logging_setup import ConsoleFormatter
    settings = make_settings()
    app = make_app(settings)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(ConsoleFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        app.test_client().get("/nothing%0a2026-11-28 INFO model_server.access: GET /forged 200%1b[2J%e2%80%a8x")
    finally:
        logging.getLogger().removeHandler(handler)
        app.extensions["model_server"].manager.shutdown()
    lines = [line for line in stream.getvalue().splitlines() if "/nothing" in line or "forged" in line]
    assert len(lines) == 1, stream.getvalue()
    assert "/nothing\\n2026-11-28 INFO" in lines[0] and "\\x1b[2J" in lines[0] and "\\u2028x" in lines[0]
    assert not any(line.startswith("2026-11-28 INFO") for line in stream.getvalue().splitlines())
    records = [json.loads(line) for line in (settings.log_dir / "server.log").read_text().splitlines()]
    (access,) = [r for r in records if r.get("path", "").startswith("/nothing")]
    assert access["path"].startswith("/nothing\n2026-11-28") and access["status"] == 404
    raw = (settings.log_dir / "server.log").read_text()
    assert "\u2028" not in raw and "\x1b" not in raw


def test_python_app_py_starts_the_development_server(models_dir, tmp_path):
    """Seed 001's manual setup: `python app.py` serves (and says main.py is for production)."""
    import subprocess
    import sys

    import requests

    from tests.conftest import ROOT, free_port, wait_for
    from tests.conftest import test_env as server_env
    port = free_port()
    log = open(tmp_path / "app.log", "wb")
    process = subprocess.Popen([sys.executable, "app.py", "--demo", "--port", str(port)], cwd=ROOT,
                               env=dict(__import__("os").environ, **server_env(models_dir, tmp_path)),
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        def up():
            try:
                return requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok
            except requests.RequestException:
                return False
        assert wait_for(up, timeout=60), (tmp_path / "app.log").read_text()[-2000:]
        assert requests.post(f"http://127.0.0.1:{port}/generate/deepseek", json={"prompt": "hi", "max_new_tokens": 2},
                             timeout=30).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
    assert "python main.py" in (tmp_path / "app.log").read_text()
