"""/admin routes against real state changes on the tiny checkpoints, and auth on and off."""
from __future__ import annotations

import json
import os
import threading
import time
import uuid

import pytest
from tests.conftest import make_app

KB = 1024




@pytest.fixture(scope="module")
def admin_app(make_settings, extra_config):
    app = make_app(make_settings(MODELS_CONFIG=extra_config, MAX_LOADED_MODELS=5, FAILED_LOAD_BACKOFF=60))
    yield app
    app.extensions["model_server"].manager.shutdown()


@pytest.fixture
def ac(admin_app):
    """A client on the shared app, with every idle model unloaded first."""
    admin_app.extensions["model_server"].manager.unload_idle()
    return admin_app.test_client()


def manager_of(client):
    return client.application.extensions["model_server"].manager


def model_status(client, key=None):
    response = client.get("/admin/model_status")
    assert response.status_code == 200
    body = response.get_json()
    return body["models"][key] if key else body


def memory(client):
    response = client.get("/admin/memory_status")
    assert response.status_code == 200
    return response.get_json()


def held(body) -> int:
    """Bytes held by models on every device, from /admin/memory_status."""
    return body["ram"]["models_bytes"] + sum(gpu["models_bytes"] for gpu in body["gpus"])


def on_this_machine(device) -> bool:
    import torch
    return device == "cpu" or (torch.cuda.is_available() and str(device).startswith("cuda:"))


def generate(client, model, **body):
    body.setdefault("prompt", "hello")
    body.setdefault("max_new_tokens", 3)
    return client.post(f"/generate/{model}", json=body)


def wait_until(predicate, timeout=30.0, interval=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


# ------------------------------------------------------------------ memory_status

def test_memory_status_fields_follow_a_load_and_an_unload(ac):
    import torch

    body = memory(ac)
    ram = body["ram"]
    assert ram["total"] > ram["available"] > 0 and 0 <= ram["percent"] <= 100
    assert ram["process_rss"] > 50 * 2**20                      # this process holds torch at least
    assert ram["budget"] > 0 and ram["headroom"] == 0           # RAM_HEADROOM_GB=0 in the tests
    assert body["gpu_available"] is torch.cuda.is_available() is bool(body["gpus"])
    for gpu in body["gpus"]:
        assert {"device", "total", "allocated", "reserved", "free", "budget", "models_bytes"} <= set(gpu)
    assert isinstance(body["gpu_headroom"], int)
    assert body["memory_warning"] is False and body["warnings"] == []
    assert held(body) == 0

    loaded = ac.post("/admin/models/deepseek/load").get_json()["model"]
    assert held(memory(ac)) == loaded["bytes_in_memory"] > 100 * KB
    assert ac.post("/admin/models/deepseek/unload").get_json()["unloaded"] is True
    assert held(memory(ac)) == 0


def test_memory_warning_comes_from_the_budgets(make_settings):
    app = make_app(make_settings(RAM_HEADROOM_GB=10**6))       # more headroom than any machine has RAM
    body = memory(app.test_client())
    assert body["memory_warning"] is True
    assert body["ram"]["headroom"] == 10**6 * 2**30
    assert any("headroom" in w for w in body["warnings"])


# ------------------------------------------------------------------ model_status

def test_model_status_reports_each_state_with_measured_and_estimated_bytes(ac, admin_app):
    settings = admin_app.extensions["model_server"].settings
    body = model_status(ac)
    assert body["available_models"] == list(settings.models)
    assert set(body["models"]) == set(settings.models)
    assert body["loaded_models"] == [] and body["max_loaded_models"] == 5
    missing, idle = body["models"]["missing"], body["models"]["deepseek"]
    assert missing["state"] == "not_downloaded" and missing["bytes_estimated"] is None
    assert idle["state"] == "downloaded" and idle["bytes_in_memory"] == 0 and idle["bytes_estimated"] > 100 * KB
    assert idle["device"] is None and idle["loaded"] is False
    for info in body["models"].values():
        assert {"loaded", "state", "device", "quantization", "bytes_in_memory", "bytes_estimated", "in_flight",
                "last_used_ago", "load_count", "load_seconds_total", "error"} <= set(info)

    before = idle["load_count"]
    assert generate(ac, "deepseek").status_code == 200
    info = model_status(ac, "deepseek")
    assert info["state"] == "loaded" and info["loaded"] is True and on_this_machine(info["device"])
    assert info["quantization"] == "none" and info["in_flight"] == 0
    assert info["load_count"] == before + 1 and info["load_seconds_total"] > 0
    assert 0 <= info["last_used_ago"] < 30
    # measured after the load, and close to the estimate made before it
    assert 0.5 * info["bytes_estimated"] < info["bytes_in_memory"] <= info["bytes_estimated"]
    with manager_of(ac).lease("deepseek"):                       # a request holding the model
        assert model_status(ac, "deepseek")["in_flight"] == 1
    assert model_status(ac, "deepseek")["in_flight"] == 0

    assert generate(ac, "broken").status_code == 503
    broken = model_status(ac, "broken")
    assert broken["state"] == "error" and broken["loaded"] is False and broken["error"]
    assert broken["retry_after"] > 0


def test_model_status_shows_loading_while_a_slow_load_runs(make_settings, extra_config):
    # 8-bit quantization of the ~350 MB `big` model takes seconds on a CPU: long enough to watch
    settings = make_settings(MODELS_CONFIG=extra_config).with_model("big", quantization="8bit")
    app = make_app(settings)
    client, manager = app.test_client(), app.extensions["model_server"].manager
    result = {}
    loader = threading.Thread(target=lambda: result.update(r=app.test_client().post("/admin/models/big/load")))
    loader.start()
    try:
        wait_until(lambda: manager.snapshot_one("big")["state"] == "loading", timeout=60, interval=0.002)
        during = model_status(client, "big")
        reserved = held(memory(client))
        if manager.snapshot_one("big")["state"] == "loading":               # still loading after both reads
            assert during["state"] == "loading" and during["loaded"] is False
            assert during["bytes_in_memory"] == 0 and on_this_machine(during["device"])
            assert during["quantization"] == "8bit"
            assert reserved == during["bytes_estimated"] > 0                 # the estimate is held meanwhile
    finally:
        loader.join()
    assert result["r"].status_code == 200, result["r"].get_json()
    done = model_status(client, "big")
    assert done["state"] == "loaded" and done["load_count"] == 1 and done["last_load_seconds"] > 0
    assert client.post("/admin/models/big/unload").get_json()["unloaded"] is True
    assert model_status(client, "big")["bytes_in_memory"] == 0 and held(memory(client)) == 0
    assert during["state"] == "loading", "the load finished before /admin/model_status could see it"


# ------------------------------------------------------------------ load / unload

def test_load_and_unload_routes(ac):
    first = ac.post("/admin/models/qwen_vl/load")
    assert first.status_code == 200
    model = first.get_json()["model"]
    assert first.get_json()["loaded"] is True and model["state"] == "loaded" and model["bytes_in_memory"] > 0
    again = ac.post("/admin/models/qwen_vl/load").get_json()["model"]
    assert again["load_count"] == model["load_count"]                        # already loaded: no reload
    assert held(memory(ac)) == model["bytes_in_memory"]

    gone = ac.post("/admin/models/qwen_vl/unload")
    assert gone.status_code == 200 and gone.get_json()["unloaded"] is True
    assert gone.get_json()["model"]["last_unload_reason"] == "admin"
    assert held(memory(ac)) == 0
    assert ac.post("/admin/models/qwen_vl/unload").get_json()["unloaded"] is False  # nothing to unload

    assert ac.post("/admin/models/nope/load").status_code == 404
    assert ac.post("/admin/models/nope/unload").status_code == 404
    for bad in ("abc", "-1", "601", "nan"):
        response = ac.post(f"/admin/models/qwen_vl/unload?wait={bad}")
        assert response.status_code == 400, bad
        assert response.get_json()["field"] == "wait"
    failed = ac.post("/admin/models/missing/load")
    assert failed.status_code == 503 and "download" in failed.get_json()["details"]


def test_unload_of_a_model_in_use_answers_409_or_waits_for_its_lease(ac):
    manager = manager_of(ac)
    ac.post("/admin/models/deepseek/load")
    with manager.lease("deepseek"):
        busy = ac.post("/admin/models/deepseek/unload")
        assert busy.status_code == 409 and busy.get_json()["error"]
        started = time.monotonic()
        assert ac.post("/admin/models/deepseek/unload?wait=0.3").status_code == 409
        assert time.monotonic() - started >= 0.3
    assert model_status(ac, "deepseek")["loaded"] is True                    # never pulled out from under it

    release = threading.Event()

    def hold():
        with manager.lease("deepseek"):
            release.wait(10)
    holder = threading.Thread(target=hold)
    holder.start()
    wait_until(lambda: model_status(ac, "deepseek")["in_flight"] == 1)
    threading.Timer(0.5, release.set).start()
    started = time.monotonic()
    waited = ac.post("/admin/models/deepseek/unload?wait=20")
    holder.join()
    assert waited.status_code == 200 and waited.get_json()["unloaded"] is True
    assert time.monotonic() - started >= 0.4                                 # it waited for the lease to end
    assert model_status(ac, "deepseek")["loaded"] is False


# ------------------------------------------------------------------ emergency cleanup

def test_emergency_cleanup_during_a_request_in_flight(ac, admin_app):
    temp = admin_app.extensions["model_server"].temp
    expired = temp.root / uuid.uuid4().hex
    expired.write_bytes(b"x" * 3000)
    os.utime(expired, (time.time() - 7200, time.time() - 7200))
    idle_bytes = ac.post("/admin/models/qwen_vl/load").get_json()["model"]["bytes_in_memory"]
    loads_before = model_status(ac, "deepseek")["load_count"]
    result = {}

    def long_request():
        client = admin_app.test_client()
        result["r"] = generate(client, "deepseek", max_new_tokens=400, do_sample=False)  # ~2 s

    with temp.scope("in-flight") as scope:                                  # a request's live temp files
        held_file = scope.write(b"y" * 1000, ".wav")
        worker = threading.Thread(target=long_request)
        worker.start()
        wait_until(lambda: model_status(ac, "deepseek")["in_flight"] == 1, timeout=60)
        cleanup = ac.post("/admin/emergency_cleanup")
        assert held_file.exists()
    worker.join()

    assert cleanup.status_code == 200
    body = cleanup.get_json()
    assert body["unloaded_models"] == ["qwen_vl"]                            # every idle model, not the leased one
    assert "deepseek" in body["kept_in_use"]
    assert body["model_bytes_freed"] == idle_bytes
    assert body["temp"]["removed_entries"] == 1 and body["temp"]["removed_bytes"] == 3000
    assert isinstance(body["rss_freed"], int) and isinstance(body["gpu_allocated_freed"], dict)
    assert not expired.exists()

    answer = result["r"]
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["usage"]["completion_tokens"] >= 1
    info = model_status(ac, "deepseek")
    assert info["loaded"] is True and info["in_flight"] == 0
    assert info["load_count"] == loads_before + 1                           # loaded once, never pulled out


def test_emergency_cleanup_keeps_a_streaming_request_model(ac):
    assert generate(ac, "deepseek").status_code == 200
    response = ac.post("/generate/deepseek", json={"prompt": "stream", "max_new_tokens": 8, "stream": True},
                       buffered=False)
    assert response.status_code == 200
    chunks = response.iter_encoded()
    first = next(chunks)                                                     # the stream holds its lease
    assert first.startswith(b"data: ")
    body = ac.post("/admin/emergency_cleanup").get_json()
    assert "deepseek" not in body["unloaded_models"] and "deepseek" in body["kept_in_use"]
    rest = b"".join(chunks)
    response.close()
    assert rest.rstrip().endswith(b"data: [DONE]")
    assert model_status(ac, "deepseek")["in_flight"] == 0
    assert ac.post("/admin/emergency_cleanup").get_json()["unloaded_models"] == ["deepseek"]


# ------------------------------------------------------------------ temp files

def _entry(root, *, age=0.0, sizes=(100,), folder=True, name=None):
    path = root / (name or uuid.uuid4().hex)
    if folder:
        path.mkdir()
        for i, size in enumerate(sizes):
            (path / f"f{i}.bin").write_bytes(b"z" * size)
    else:
        path.write_bytes(b"z" * sizes[0])
    stamp = time.time() - age
    for item in [*path.rglob("*"), path]:
        os.utime(item, (stamp, stamp))
    return path


def test_temp_status_and_cleanup_through_http(ac, admin_app):
    settings = admin_app.extensions["model_server"].settings
    root = admin_app.extensions["model_server"].temp.root
    old = _entry(root, age=7200, sizes=(100, 50))
    fresh = _entry(root, sizes=(10,), folder=False)
    stranger = _entry(root, age=7200, folder=False, name="operator-notes.txt")
    with admin_app.extensions["model_server"].temp.scope("live") as scope:
        scope.write(b"w" * 20)
        response = ac.get("/admin/temp_status")
        assert response.status_code == 200
        status = response.get_json()
        text = response.get_data(as_text=True)
        assert str(root) not in text and str(settings.tmp_dir.parent) not in text   # no absolute path leaks
        assert status["root"] == root.name
        assert status["files"] == 2 + 1 + 1 + 1 and status["bytes"] == 150 + 10 + 100 + 20
        assert status["active_scopes"] == 1 and status["oldest_age_seconds"] >= 7100
        assert status["ttl_seconds"] == settings.tmp_ttl and status["max_total_bytes"] == settings.tmp_max_bytes
        by_name = {e["name"]: e for e in status["entries"]}
        assert by_name[old.name]["bytes"] == 150 and by_name[old.name]["age_seconds"] >= 7100
        assert by_name[stranger.name]["managed"] is False
        assert sum(e["in_use"] for e in status["entries"]) == 1
        assert all("/" not in e["name"] for e in status["entries"])

        swept = ac.post("/admin/cleanup_temp").get_json()                  # only what expired
        assert swept["removed_entries"] == 1 and swept["removed_files"] == 2 and swept["removed_bytes"] == 150
        assert not old.exists() and fresh.exists() and stranger.exists()
        forced = ac.post("/admin/cleanup_temp?force=1").get_json()          # all unheld managed entries
        assert forced["removed_entries"] == 1 and not fresh.exists()
        assert stranger.exists() and scope.directory.exists()              # never others' files, never live ones
        assert ac.get("/admin/temp_status").get_json()["files"] == 2
    stranger.unlink()
    assert ac.get("/admin/temp_status").get_json()["files"] == 0


def test_temp_manager_sweeps_at_start_and_on_its_own(make_settings, tmp_path):
    leftovers = tmp_path / "tmp"
    leftovers.mkdir()
    crashed = _entry(leftovers, sizes=(500,))                               # from a previous process
    app = make_app(make_settings(TMP_DIR=leftovers, TMP_TTL=3600, TMP_MAX_MB=1, SWEEP_INTERVAL=0.05),
                   background=True)
    client = app.test_client()
    try:
        assert not crashed.exists()                                         # swept at start
        assert client.get("/admin/temp_status").get_json()["files"] == 0
        expired = _entry(leftovers, age=7200, sizes=(10,), folder=False)    # past the one-hour TTL
        wait_until(lambda: not expired.exists(), timeout=10)
        older = _entry(leftovers, age=60, sizes=(600 * KB,), folder=False)  # both young, together over 1 MB
        newer = _entry(leftovers, age=0, sizes=(600 * KB,), folder=False)
        wait_until(lambda: not older.exists(), timeout=10)
        assert newer.exists()                                               # the size cap took the oldest first
        assert client.get("/admin/temp_status").get_json()["bytes"] <= 2**20
    finally:
        app.extensions["model_server"].sweeper.stop()


# ------------------------------------------------------------------ auth

ADMIN_ROUTES = [("GET", "/admin/memory_status"), ("GET", "/admin/model_status"), ("GET", "/admin/temp_status"),
                ("POST", "/admin/models/deepseek/load"), ("POST", "/admin/models/deepseek/unload"),
                ("POST", "/admin/emergency_cleanup"), ("POST", "/admin/cleanup_temp")]


@pytest.fixture(scope="module")
def guarded(make_settings):
    app = make_app(make_settings(ADMIN_TOKEN="admin-secret-1", API_TOKEN="api-secret-2"))
    yield app.test_client()
    app.extensions["model_server"].manager.shutdown()


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Bearer api-secret-2", "Basic admin-secret-1",
                                    "admin-secret-1", "Bearer admin-secret-1x", "Bearer "])
def test_admin_routes_refuse_a_missing_or_wrong_token(guarded, header):
    headers = {"Authorization": header} if header is not None else {}
    for method, path in ADMIN_ROUTES:
        response = guarded.open(path, method=method, headers=headers)
        assert response.status_code == 401, (method, path, header)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.get_json()["error"] == "unauthorized"
    status = guarded.get("/admin/model_status", headers={"Authorization": "Bearer admin-secret-1"})
    assert status.get_json()["models"]["deepseek"]["load_count"] == 0      # the refused load did nothing


def test_admin_routes_with_the_token(guarded):
    for scheme in ("Bearer", "bearer"):
        headers = {"Authorization": f"{scheme} admin-secret-1"}
        for method, path in ADMIN_ROUTES:
            response = guarded.open(path, method=method, headers=headers)
            assert response.status_code == 200, (method, path, response.get_json())
    body = guarded.get("/admin/model_status", headers={"Authorization": "Bearer admin-secret-1"})
    settings_shown = body.get_json()["settings"]
    assert settings_shown["admin_auth"] is True and settings_shown["api_auth"] is True
    assert "admin-secret-1" not in body.get_data(as_text=True) and "api-secret-2" not in body.get_data(as_text=True)


def test_the_list_of_models_asks_for_the_api_token(guarded):
    """README: with API_TOKEN set only /health, /ready and the dashboard's page stay open."""
    for headers in ({}, {"Authorization": "Bearer admin-secret-1"}):
        assert guarded.get("/models", headers=headers).status_code == 401
    listed = guarded.get("/models", headers={"Authorization": "Bearer api-secret-2"})
    assert listed.status_code == 200 and "deepseek" in [m["key"] for m in listed.get_json()["models"]]
    assert guarded.get("/ready").status_code in (200, 503) and guarded.get("/health").status_code == 200


def test_a_script_name_in_the_environ_does_not_reroute(ac):
    """gunicorn sets SCRIPT_NAME from a client's header and strips it from the path: /admin/jobs would
    be served as /jobs. The WSGI layer puts it back (main.py also drops the header)."""
    response = ac.get("/jobs", environ_overrides={"SCRIPT_NAME": "/admin"})
    assert response.status_code == 200 and "counts" in response.get_json(), response.get_json()
    assert ac.get("/health", environ_overrides={"SCRIPT_NAME": "/admin"}).status_code == 404  # /admin/health


def test_api_token_guards_inference_and_open_routes_stay_open(guarded):
    request = {"prompt": "hi", "max_new_tokens": 2}
    assert guarded.post("/generate/deepseek", json=request).status_code == 401
    assert guarded.post("/generate/deepseek", json=request,
                        headers={"Authorization": "Bearer admin-secret-1"}).status_code == 401
    assert guarded.post("/generate/deepseek", json=request,
                        headers={"Authorization": "Bearer api-secret-2"}).status_code == 200
    assert guarded.get("/health").status_code == 200
    metrics = guarded.get("/metrics")
    assert metrics.status_code == 200 and b"model_server_http_requests_total" in metrics.data
    page = guarded.get("/admin/")                                            # the dashboard holds no data
    assert page.status_code == 200 and b"<canvas" in page.data
    assert b"deepseek" not in page.data and b"secret" not in page.data


def test_without_tokens_everything_is_open_and_binds_to_loopback(ac, monkeypatch):
    for method, path in ADMIN_ROUTES:
        assert ac.open(path, method=method).status_code == 200, path
    assert generate(ac, "deepseek", max_new_tokens=2).status_code == 200
    monkeypatch.delenv("HOST", raising=False)
    from main import parse_args
    assert parse_args([]).host == "127.0.0.1"
    assert ac.get("/admin/model_status").get_json()["settings"]["admin_auth"] is False


def test_admin_responses_are_json_and_carry_request_ids(ac):
    response = ac.get("/admin/memory_status", headers={"X-Request-ID": "admin-check-1"})
    assert response.headers["X-Request-ID"] == "admin-check-1"
    assert response.mimetype == "application/json"
    json.loads(response.get_data(as_text=True))
