"""POST /admin/reload_config: models.yaml re-read and applied without a restart, on the real stack."""
from __future__ import annotations

import pytest

from tests import media_samples as ms
from tests.conftest import make_app
from tests.conftest import test_env as server_env
from utils.families import GenerationParams, GenerationRequest
from utils.config.settings import load_settings

BLIP = """  blip_vqa:
    repo_id: Salesforce/blip-vqa-base
    family: vqa
    generation: {max_new_tokens: 4}
    limits: {max_new_tokens: 8, max_images: 1}
"""
DEEPSEEK = """  deepseek:
    repo_id: deepseek-ai/DeepSeek-R1-0528-Qwen3-8B
    family: text
    generation: {max_new_tokens: 4}
    limits: {max_new_tokens: LIMIT}
"""
QWEN_VL = """  qwen_vl:
    repo_id: Qwen/Qwen2.5-VL-3B-Instruct
    family: vision_language
    generation: {max_new_tokens: 4}
    limits: {max_new_tokens: 16, max_images: 2}
"""


def write(path, *models, server="  max_loaded_models: 3\n", limit=64):
    path.write_text("server:\n" + server + "models:\n" + "".join(models).replace("LIMIT", str(limit)))


@pytest.fixture()
def reloadable(tmp_path, models_dir):
    config = tmp_path / "models.yaml"
    write(config, DEEPSEEK, BLIP)
    settings = load_settings(config, env=server_env(models_dir, tmp_path))
    app = make_app(settings)
    yield config, app, app.test_client()
    app.extensions["model_server"].manager.shutdown()


def reload(client):
    response = client.post("/admin/reload_config")
    return response.status_code, response.get_json()


def ask(client, key, **body):
    body.setdefault("prompt", "what is this?")
    body.setdefault("max_new_tokens", 2)
    if key != "deepseek":
        body.setdefault("image", ms.b64(ms.png()))
    return client.post(f"/generate/{key}", json=body)


def test_added_model_appears_and_a_changed_limit_applies_to_the_next_request(reloadable):
    config, app, client = reloadable
    assert ask(client, "qwen_vl").status_code == 404
    assert ask(client, "deepseek", max_new_tokens=20).status_code == 200
    write(config, DEEPSEEK, BLIP, QWEN_VL, limit=8)
    status, diff = reload(client)
    assert status == 200 and diff["models"]["added"] == ["qwen_vl"] and diff["models"]["changed"] == ["deepseek"]
    assert diff["models"]["reload_when_idle"] == []  # a limit needs no reload
    assert ask(client, "qwen_vl").status_code == 200
    refused = ask(client, "deepseek", max_new_tokens=20)
    assert refused.status_code == 400 and refused.get_json()["field"] == "max_new_tokens"
    assert "qwen_vl" in client.get("/v1/models").get_json()["data"][-1]["id"]


def test_a_removed_model_finishes_what_it_serves_then_unloads(reloadable):
    config, app, client = reloadable
    manager = app.extensions["model_server"].manager
    assert ask(client, "blip_vqa").status_code == 200
    with manager.lease("blip_vqa") as served:          # a request in flight
        write(config, DEEPSEEK)
        status, diff = reload(client)
        assert status == 200 and diff["models"]["removed"] == ["blip_vqa"]
        assert ask(client, "blip_vqa").status_code == 404  # no new requests
        info = client.get("/admin/model_status").get_json()["models"]["blip_vqa"]
        assert info["loaded"] and info["removed"]
        from PIL import Image
        prepared = served.adapter.prepare(GenerationRequest(prompt="still?", images=[Image.new("RGB", (32, 32))]))
        job = served.engine.submit(prepared, GenerationParams(max_new_tokens=2, temperature=1.0, top_p=1.0,
                                                              do_sample=False))
        assert served.engine.run(job).completion_tokens >= 1   # the one in flight is served
    assert "blip_vqa" not in client.get("/admin/model_status").get_json()["models"]  # unloaded and forgotten


def test_an_invalid_file_changes_nothing_and_names_the_key(reloadable):
    config, app, client = reloadable
    write(config, DEEPSEEK, server="  max_loaded_models: -1\n")
    status, body = reload(client)
    assert status == 400 and "max_loaded_models" in body["details"] and "nothing changed" in body["details"]
    assert ask(client, "blip_vqa").status_code == 200
    assert app.extensions["model_server"].settings.max_loaded_models == 3


def test_load_time_changes_reload_once_idle_and_restart_only_settings_are_named(reloadable, tmp_path):
    config, app, client = reloadable
    manager = app.extensions["model_server"].manager
    assert ask(client, "deepseek").status_code == 200
    write(config, DEEPSEEK.replace("family: text", "family: text\n    engine: {max_batch_size: 2}"), BLIP,
          server="  max_loaded_models: 3\n  torch_threads: 1\n")
    status, diff = reload(client)
    assert status == 200 and diff["needs_restart"] == ["torch_threads"]
    assert not manager.snapshot_one("deepseek")["loaded"]     # it was idle: unloaded at once...
    assert ask(client, "deepseek").status_code == 200          # ...and reloads with the new engine
    assert manager.snapshot_one("deepseek")["engine"]["max_batch_size"] == 2
    assert manager.snapshot_one("deepseek")["last_unload_reason"] == "reconfigured"


def test_sighup_reloads_the_config_and_loaded_models_stay(start_server, tmp_path, models_dir):
    import os
    import signal

    import requests

    from tests.conftest import wait_for
    config = tmp_path / "live-models.yaml"
    write(config, DEEPSEEK, BLIP)
    server = start_server(MODELS_CONFIG=config)
    assert requests.post(server.url + "/generate/deepseek", json={"prompt": "hi", "max_new_tokens": 2},
                         timeout=60).status_code == 200
    write(config, DEEPSEEK, BLIP, QWEN_VL)
    os.kill(server.process.pid, signal.SIGHUP)

    def models():
        return requests.get(server.url + "/admin/model_status", timeout=10).json()["models"]
    assert wait_for(lambda: "qwen_vl" in models(), timeout=20), "SIGHUP did not reload the config"
    assert models()["deepseek"]["loaded"] and models()["deepseek"]["load_count"] == 1  # same worker, same model
    image = ms.b64(ms.png())
    assert requests.post(server.url + "/generate/qwen_vl", json={"prompt": "?", "image": image, "max_new_tokens": 2},
                         timeout=60).status_code == 200
    write(config, DEEPSEEK, server="  max_loaded_models: nope\n")
    os.kill(server.process.pid, signal.SIGHUP)                   # an invalid file: nothing changes
    import time
    time.sleep(1.0)
    assert "qwen_vl" in models() and server.process.poll() is None


def test_job_limits_apply_on_reload_and_the_job_folder_and_workers_wait_for_a_restart(reloadable, tmp_path):
    config, app, client = reloadable
    services = app.extensions["model_server"]
    write(config, DEEPSEEK, BLIP, server="  max_loaded_models: 3\n  jobs: {max_queued: 1, timeout: 9, result_ttl: 60, "
                                         "workers: 7, dir: elsewhere}\n")
    status, diff = reload(client)
    # The test environment sets JOBS_DIR, which wins over the file's `dir`: only the workers need a restart.
    assert status == 200 and diff["needs_restart"] == ["jobs.workers"] and "jobs" in diff["server"]
    assert services.settings.jobs.workers == 4 and services.settings.jobs.dir == tmp_path / "jobs"
    assert services.jobs.result_ttl == 60 and services.job_executor.job_timeout == 9
    assert client.post("/jobs/deepseek", json={"prompt": "one"}).status_code == 202  # background off: stays queued
    full = client.post("/jobs/deepseek", json={"prompt": "two"})
    assert full.status_code == 503 and full.get_json()["error"] == "job queue full"


def test_files_that_cannot_be_read_are_400s_naming_the_problem_not_the_path(reloadable, tmp_path):
    from tests.test_settings import BAD_FILES
    config, app, client = reloadable
    for content, needle in BAD_FILES:
        config.unlink() if config.is_file() else config.rmdir()
        if content is None:
            config.mkdir()
        else:
            config.write_bytes(content)
        status, body = reload(client)
        assert status == 400 and needle in body["details"] and "nothing changed" in body["details"], body
        assert str(tmp_path) not in body["details"], body
    config.rmdir() if config.is_dir() else config.unlink()
    status, body = reload(client)  # gone
    assert status == 400 and "not found" in body["details"] and str(tmp_path) not in body["details"], body
    assert ask(client, "blip_vqa").status_code == 200  # nothing changed


def test_a_raised_body_cap_applies(tmp_path, models_dir):
    config = tmp_path / "models.yaml"
    write(config, DEEPSEEK, server="  max_content_length_mb: 1\n")
    app = make_app(load_settings(config, env=server_env(models_dir, tmp_path)))
    client = app.test_client()
    body = {"prompt": "hi", "max_new_tokens": 2, "ignored": "x" * (2 * 2**20)}
    refused = client.post("/generate/deepseek", json=body)
    assert refused.status_code == 413 and "(1 MB)" in refused.get_json()["details"]
    write(config, DEEPSEEK, server="  max_content_length_mb: 4\n")
    status, diff = reload(client)
    assert status == 200 and "max_content_length" in diff["server"]
    assert client.post("/generate/deepseek", json=body).status_code == 200  # before: 413 at the start value
    write(config, DEEPSEEK, server="  max_content_length_mb: 0.5\n")
    assert reload(client)[0] == 200
    assert client.post("/generate/deepseek", json=dict(body, ignored="x" * 2**20)).status_code == 413
    app.extensions["model_server"].manager.shutdown()


def test_jobs_of_a_model_gone_from_the_config_are_listed_and_wait_for_it(reloadable):
    config, app, client = reloadable
    services = app.extensions["model_server"]
    job_id = client.post("/jobs/blip_vqa", json={"prompt": "colour?", "image": ms.b64(ms.png())}).get_json()["job_id"]
    write(config, DEEPSEEK)                         # blip_vqa is gone for a moment
    assert reload(client)[0] == 200
    assert client.post("/jobs/blip_vqa", json={"prompt": "x"}).status_code == 404  # no new jobs for it
    services.jobs.sweep()
    listed = client.get("/jobs?model=blip_vqa")
    assert listed.status_code == 200, listed.get_json()
    [view] = listed.get_json()["jobs"]
    assert view["job_id"] == job_id and view["status"] == "queued" and "jobs.orphan_grace" in view["note"], view
    assert client.get("/jobs?model=never_configured").status_code == 404
    write(config, DEEPSEEK, BLIP)                   # back: the job is a job again
    assert reload(client)[0] == 200
    services.jobs.sweep()
    view = client.get(f"/jobs/{job_id}").get_json()
    assert view["status"] == "queued" and "note" not in view, view
    services.jobs.store.close()


def test_the_openvino_folders_wait_for_a_restart_and_its_limits_apply(reloadable, tmp_path):
    config, app, client = reloadable
    services = app.extensions["model_server"]
    before = services.settings.openvino
    write(config, DEEPSEEK, BLIP, server="  max_loaded_models: 3\n  openvino: {cache_dir: other-exports, "
                                         "cache_max_gb: 2, export_timeout: 60}\n")
    status, diff = reload(client)
    # The test environment sets OPENVINO_EXPORTER_DIR (it wins over the file): only the cache folder is kept.
    assert status == 200 and diff["needs_restart"] == ["openvino.cache_dir"] and "openvino" in diff["server"]
    now = services.settings.openvino
    assert now.cache_dir == before.cache_dir and now.exporter_dir == before.exporter_dir
    assert now.cache_max_bytes == 2 * 1024 ** 3 and now.export_timeout == 60
    assert services.openvino_cache.max_bytes == 2 * 1024 ** 3 and services.openvino_cache.export_timeout == 60
    assert services.openvino_cache.root == services.settings.openvino_cache_path
