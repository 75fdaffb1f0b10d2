"""GET /metrics (Prometheus, one registry per app) and the structured JSON logs, on the real stack."""
from __future__ import annotations

import json
import logging
import uuid

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from utils.ops.logging_setup import LOG_FILE
from tests.conftest import make_app




@pytest.fixture(scope="module")
def obs_app(make_settings, extra_config):
    app = make_app(make_settings(MODELS_CONFIG=extra_config, MAX_LOADED_MODELS=2, FAILED_LOAD_BACKOFF=60))
    yield app
    app.extensions["model_server"].manager.shutdown()


@pytest.fixture
def oc(obs_app):
    obs_app.extensions["model_server"].manager.unload_idle()
    return obs_app.test_client()


def scrape(client) -> dict:
    """{(sample name, frozenset of labels): value} of one /metrics scrape."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    return parse(response.get_data(as_text=True))


def parse(text: str) -> dict:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: dict, name: str) -> dict:
    return {dict(labels).get("device") or dict(labels).get("model") or "": v
            for (n, labels), v in samples.items() if n == name}


def generate(client, model, **body):
    body.setdefault("prompt", "hello metrics")
    body.setdefault("max_new_tokens", 3)
    return client.post(f"/generate/{model}", json=body)


GEN = dict(route="/generate/<model>", method="POST", model="deepseek")


# ------------------------------------------------------------------ metrics

def test_metrics_are_prometheus_text_with_every_family(oc):
    response = oc.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    names = {family.name for family in text_string_to_metric_families(response.get_data(as_text=True))}
    for name in ("http_requests", "http_request_duration_seconds", "prompt_tokens", "completion_tokens",
                 "model_loads", "model_unloads", "model_load_seconds", "ram_total_bytes", "ram_available_bytes",
                 "process_rss_bytes", "gpu_allocated_bytes", "models_bytes", "model_bytes", "model_loaded",
                 "model_state", "requests_in_flight", "temp_bytes", "temp_files"):
        assert "model_server_" + name in names, name
    openmetrics = oc.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert openmetrics.headers["Content-Type"].startswith("application/openmetrics-text")
    assert openmetrics.get_data(as_text=True).rstrip().endswith("# EOF")


def test_request_counts_latency_and_tokens_move(oc):
    before = scrape(oc)
    usages = []
    for i in range(3):
        response = generate(oc, "deepseek", prompt=f"count me {i}", max_new_tokens=4)
        assert response.status_code == 200
        usages.append(response.get_json()["usage"])
    assert oc.post("/generate/deepseek", data=b"{oops", content_type="application/json").status_code == 400
    assert generate(oc, "no_such_model").status_code == 404
    after = scrape(oc)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("model_server_http_requests_total", **GEN, status="200") == 3
    assert delta("model_server_http_requests_total", **GEN, status="400") == 1
    assert delta("model_server_http_requests_total", route="/generate/<model>", method="POST", model="",
                 status="404") == 1                                          # unknown names get no label of their own
    latency = dict(route="/generate/<model>", model="deepseek")
    assert delta("model_server_http_request_duration_seconds_count", **latency) == 4
    assert delta("model_server_http_request_duration_seconds_sum", **latency) > 0
    assert delta("model_server_http_request_duration_seconds_bucket", **latency, le="+Inf") == 4
    assert delta("model_server_completion_tokens_total", model="deepseek") == sum(u["completion_tokens"] for u in usages)
    assert delta("model_server_prompt_tokens_total", model="deepseek") == sum(u["prompt_tokens"] for u in usages)
    assert delta("model_server_http_requests_total", route="/metrics", method="GET", model="", status="200") == 1


def test_streamed_tokens_are_counted(oc):
    plain = generate(oc, "deepseek", prompt="the same words", max_new_tokens=5).get_json()["usage"]
    before = scrape(oc)
    response = oc.post("/generate/deepseek", json={"prompt": "the same words", "max_new_tokens": 5, "stream": True})
    assert response.status_code == 200 and response.get_data(as_text=True).endswith("data: [DONE]\n\n")
    after = scrape(oc)
    for name, expected in (("completion_tokens_total", plain["completion_tokens"]),
                           ("prompt_tokens_total", plain["prompt_tokens"])):
        metric = f"model_server_{name}"
        assert value(after, metric, model="deepseek") - value(before, metric, model="deepseek") == expected


def test_loads_unloads_and_memory_gauges_follow_the_manager(oc, obs_app):
    manager = obs_app.extensions["model_server"].manager
    before = scrape(oc)
    assert value(before, "model_server_model_loaded", model="deepseek") == 0
    loaded = oc.post("/admin/models/deepseek/load").get_json()["model"]
    during = scrape(oc)
    assert value(during, "model_server_model_loads_total", model="deepseek", outcome="ok") - \
        value(before, "model_server_model_loads_total", model="deepseek", outcome="ok") == 1
    assert value(during, "model_server_model_load_seconds_count", model="deepseek") - \
        value(before, "model_server_model_load_seconds_count", model="deepseek") == 1
    assert value(during, "model_server_model_load_seconds_sum", model="deepseek") > \
        value(before, "model_server_model_load_seconds_sum", model="deepseek")
    assert value(during, "model_server_model_loaded", model="deepseek") == 1
    assert value(during, "model_server_model_state", model="deepseek", state="loaded") == 1
    assert value(during, "model_server_model_state", model="deepseek", state="unloaded") == 0
    assert value(during, "model_server_model_bytes", model="deepseek", device=loaded["device"]) == \
        loaded["bytes_in_memory"] > 0
    assert series(during, "model_server_models_bytes") == {d: float(b) for d, b in manager.loaded_bytes().items()}
    assert value(during, "model_server_ram_available_bytes") > 0
    assert value(during, "model_server_ram_total_bytes") >= value(during, "model_server_ram_available_bytes")
    assert value(during, "model_server_process_rss_bytes") > 50 * 2**20
    gpus = obs_app.extensions["model_server"].probe.read().gpus
    assert set(series(during, "model_server_gpu_allocated_bytes")) == {f"cuda:{g.index}" for g in gpus}

    assert oc.post("/admin/models/deepseek/unload").get_json()["unloaded"] is True
    after = scrape(oc)
    assert value(after, "model_server_model_unloads_total", model="deepseek", reason="admin") - \
        value(before, "model_server_model_unloads_total", model="deepseek", reason="admin") == 1
    assert value(after, "model_server_model_loaded", model="deepseek") == 0
    assert ("model_server_model_bytes", frozenset({"model": "deepseek", "device": loaded["device"]}.items())) \
        not in after
    assert series(after, "model_server_models_bytes") == {}


def test_evictions_and_failed_loads_are_counted_by_reason(oc):
    before = scrape(oc)
    assert oc.post("/admin/models/broken/load").status_code == 503
    for model in ("deepseek", "qwen_vl", "blip_vqa"):                      # the cap is 2: deepseek is evicted
        assert oc.post(f"/admin/models/{model}/load").status_code == 200
    after = scrape(oc)
    assert value(after, "model_server_model_unloads_total", model="deepseek", reason="count") - \
        value(before, "model_server_model_unloads_total", model="deepseek", reason="count") == 1
    assert value(after, "model_server_model_loads_total", model="broken", outcome="error") - \
        value(before, "model_server_model_loads_total", model="broken", outcome="error") == 1
    assert value(after, "model_server_model_state", model="broken", state="error") == 1
    oc.post("/admin/emergency_cleanup")
    cleaned = scrape(oc)
    for model in ("qwen_vl", "blip_vqa"):
        assert value(cleaned, "model_server_model_unloads_total", model=model, reason="emergency_cleanup") - \
            value(before, "model_server_model_unloads_total", model=model, reason="emergency_cleanup") == 1


def test_queue_depth_and_temp_gauges(oc, obs_app):
    svc = obs_app.extensions["model_server"]
    with svc.manager.lease("deepseek"), svc.manager.lease("deepseek"):   # two requests holding the model
        assert value(scrape(oc), "model_server_requests_in_flight", model="deepseek") == 2
    assert value(scrape(oc), "model_server_requests_in_flight", model="deepseek") == 0
    with svc.temp.scope("gauge") as scope:
        scope.write(b"t" * 1234)
        samples = scrape(oc)
        assert value(samples, "model_server_temp_bytes") == 1234
        assert value(samples, "model_server_temp_files") == 1
        assert value(samples, "model_server_temp_active_scopes") == 1
    assert value(scrape(oc), "model_server_temp_bytes") == 0


def test_each_app_has_its_own_registry(oc, make_settings):
    from prometheus_client import REGISTRY
    other = make_app(make_settings()).test_client()
    before = scrape(oc)
    assert generate(other, "deepseek").status_code == 200
    assert value(scrape(other), "model_server_http_requests_total", **GEN, status="200") == 1
    assert scrape(oc).get(("model_server_http_requests_total", frozenset(dict(GEN, status="200").items()))) == \
        before.get(("model_server_http_requests_total", frozenset(dict(GEN, status="200").items())))
    assert not [n for n in REGISTRY._names_to_collectors if n.startswith("model_server_")]
    other.application.extensions["model_server"].manager.shutdown()


# ------------------------------------------------------------------ logs

def log_lines(settings) -> list[dict]:
    path = settings.log_dir / LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_json_log_lines_carry_the_request_id(make_settings):
    app = make_app(make_settings())
    settings = app.extensions["model_server"].settings
    client = app.test_client()
    request_id = f"log-test-{uuid.uuid4().hex[:8]}"
    response = generate(client, "deepseek", max_new_tokens=2, keep_alive=0)  # loads and unloads inside
    assert response.status_code == 200
    answered = client.post("/generate/deepseek", json={"prompt": "x", "max_new_tokens": 2},
                           headers={"X-Request-ID": request_id})
    assert answered.headers["X-Request-ID"] == request_id
    app.extensions["model_server"].manager.unload_idle()                    # outside any request
    lines = log_lines(settings)
    for line in lines:
        assert {"ts", "level", "logger", "message", "request_id"} <= set(line)
        assert line["ts"].endswith("Z") and "T" in line["ts"]
    mine = [line for line in lines if line["request_id"] == request_id]
    access = [line for line in mine if line["logger"] == "model_server.access"]
    assert len(access) == 1
    assert {k: access[0][k] for k in ("method", "path", "status", "model")} == \
        {"method": "POST", "path": "/generate/deepseek", "status": 200, "model": "deepseek"}
    assert access[0]["ms"] > 0
    first_id = response.headers["X-Request-ID"]
    loaded = [line for line in lines if line["logger"] == "model_server.manager" and "loaded deepseek" in line["message"]]
    assert loaded and loaded[0]["request_id"] == first_id                  # lines inside a request carry its id
    unloaded = [line for line in lines if line["message"] == "unloaded deepseek (cleanup)"]
    assert unloaded and unloaded[-1]["request_id"] is None                  # lines outside a request do not


def test_unexpected_errors_log_a_traceback_and_answer_without_internals(make_settings):
    app = make_app(make_settings())

    def boom():
        raise RuntimeError("internal detail 42")
    app.add_url_rule("/boom", "boom", boom)
    response = app.test_client().get("/boom", headers={"X-Request-ID": "boom-1"})
    assert response.status_code == 500
    assert "internal detail" not in response.get_data(as_text=True)
    assert "boom-1" in response.get_json()["details"]
    lines = [line for line in log_lines(app.extensions["model_server"].settings) if line["request_id"] == "boom-1"]
    error = next(line for line in lines if line["level"] == "ERROR")
    assert "RuntimeError: internal detail 42" in error["exc"]
    access = next(line for line in lines if line["logger"] == "model_server.access")
    assert access["status"] == 500 and access["path"] == "/boom"


def test_logging_is_set_up_once_per_process(make_settings):
    from utils.ops.logging_setup import _ServerLogHandler
    settings = make_settings()
    first, second = make_app(settings), make_app(settings)
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, _ServerLogHandler)]
    assert len(handlers) == 1
    second.test_client().get("/health", headers={"X-Request-ID": "once-1"})
    assert len([line for line in log_lines(settings) if line["request_id"] == "once-1"]) == 1
    moved = make_settings()
    make_app(moved)                                                          # another log_dir: the handler moves
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, _ServerLogHandler)]
    assert len(handlers) == 1 and handlers[0].baseFilename == str((moved.log_dir / LOG_FILE).resolve())
    del first


def test_log_files_rotate_by_size(tmp_path):
    from utils.ops.logging_setup import setup_logging
    path = setup_logging(tmp_path, max_bytes=4096, backup_count=2)
    logger = logging.getLogger("model_server.rotation_test")
    for i in range(300):
        logger.info("line %d %s", i, "x" * 40)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [LOG_FILE, f"{LOG_FILE}.1", f"{LOG_FILE}.2"]
    assert all(p.stat().st_size <= 4096 for p in tmp_path.iterdir())
    last = [json.loads(line) for line in path.read_text().splitlines()]
    assert last[-1]["message"].startswith("line 299 ") and last[-1]["request_id"] is None


# ------------------------------------------------------------------ the real process

def test_live_server_logs_json_and_serves_metrics(start_server):
    server = start_server()
    for i in range(2):
        response = requests.post(server.url + "/generate/deepseek", json={"prompt": f"live {i}", "max_new_tokens": 3},
                                 headers={"X-Request-ID": f"live-{i}"}, timeout=60)
        assert response.status_code == 200 and response.headers["X-Request-ID"] == f"live-{i}"
    samples = parse(requests.get(server.url + "/metrics", timeout=10).text)
    assert value(samples, "model_server_http_requests_total", **GEN, status="200") == 2
    assert value(samples, "model_server_model_loads_total", model="deepseek", outcome="ok") == 1
    assert value(samples, "model_server_completion_tokens_total", model="deepseek") >= 2
    lines = [json.loads(line) for line in (server.tmp / "logs" / LOG_FILE).read_text().splitlines()]
    access = {line["request_id"]: line for line in lines if line["logger"] == "model_server.access"}
    assert access["live-0"]["status"] == 200 and access["live-1"]["path"] == "/generate/deepseek"
    startup = server.log_text()
    assert "127.0.0.1" in startup and "ADMIN_TOKEN" in startup              # says it is open, on loopback
