"""runtime: openvino on the demo checkpoint qwen3_openvino (tiny Qwen3, byte-level BPE tokenizer):
the real export (optimum-intel in the exporter's own environment) and real openvino-genai generation,
offline. The exporter's environment is built once into models/.openvino-exporter (kept between runs);
the export runs once per session (the session's demo checkpoints are new files, so a new export id).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, make_app
from utils.errors import ConfigError
from utils.config.settings import load_settings

pytest.importorskip("openvino_genai")

KEY, TWIN = "qwen3_openvino", "qwen3_pytorch"
EXPORTER_DIR = ROOT / "models" / ".openvino-exporter"
PROMPTS = ["hello there", "what is the sky", "tell me about a red car and a blue bus", "why",
           "the cat and the dog went to the park", "a small bird sings"]


@pytest.fixture(scope="module")
def settings(make_settings):
    """The demo settings plus TWIN: the same checkpoint on runtime pytorch (float32)."""
    base = make_settings(MAX_LOADED_MODELS="2", GROUP_WINDOW="0")  # conftest: the shared EXPORTER_DIR
    spec = base.models[KEY]
    assert spec.runtime == "openvino" and spec.dtype == "float32" and spec.weight_format == "fp32"
    twin = dataclasses.replace(spec, key=TWIN, runtime="pytorch", repo_id=None)
    return base.replace(models={**base.models, TWIN: twin})


@pytest.fixture(scope="module")
def app(settings):
    application = make_app(settings)
    yield application
    application.extensions["model_server"].manager.shutdown()


@pytest.fixture(scope="module")
def client(app):
    return app.test_client()


def chat(client, model, prompt, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "temperature": 0,
            **extra}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def manager(app):
    return app.extensions["model_server"].manager


def test_greedy_equals_pytorch_float32(client, app):
    for prompt in PROMPTS[:3]:
        ours, twin = chat(client, KEY, prompt), chat(client, TWIN, prompt)
        assert ours["choices"][0]["message"]["content"] == twin["choices"][0]["message"]["content"]
        assert ours["usage"] == twin["usage"] and ours["usage"]["completion_tokens"] == 12
    status = client.get("/admin/model_status").get_json()["models"]
    assert status[KEY]["engine"]["kind"] == "openvino" and status[TWIN]["engine"]["kind"] == "continuous"
    assert (status[KEY]["runtime"], status[KEY]["weight_format"], status[KEY]["export"]) == \
        ("openvino", "fp32", "exported")
    assert (status[TWIN]["runtime"], status[TWIN]["weight_format"]) == ("pytorch", None)
    assert status[KEY]["bytes_in_memory"] > 0 and status[KEY]["placement"] == {"cpu": status[KEY]["bytes_in_memory"]}


def test_concurrent_requests_batch_and_match_their_solo_answers(client, app):
    solo = {p: chat(client, KEY, p, max_tokens=16)["choices"][0]["message"]["content"] for p in PROMPTS}
    seeded = {s: chat(client, KEY, "hello there", temperature=1.0, top_p=0.9, seed=s)["choices"][0]["message"]
              ["content"] for s in (1, 2)}
    assert seeded[1] != seeded[2]  # the seed reaches OpenVINO's sampler per request
    answers: dict = {}
    barrier = threading.Barrier(len(PROMPTS) + 2)

    def ask(name, prompt, **extra):
        barrier.wait()
        answers[name] = chat(app.test_client(), KEY, prompt, **extra)["choices"][0]["message"]["content"]
    threads = [threading.Thread(target=ask, args=(p, p), kwargs={"max_tokens": 16}) for p in PROMPTS]
    threads += [threading.Thread(target=ask, args=(f"seed{s}", "hello there"),
                                 kwargs={"temperature": 1.0, "top_p": 0.9, "seed": s}) for s in (1, 2)]
    before = manager(app).snapshot_one(KEY)["engine"]["peak_batch"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert {p: answers[p] for p in PROMPTS} == solo
    assert (answers["seed1"], answers["seed2"]) == (seeded[1], seeded[2])
    assert max(before, manager(app).snapshot_one(KEY)["engine"]["peak_batch"]) > 1


def test_stop_strings_and_streaming(client):
    full = chat(client, KEY, "why", max_tokens=12)["choices"][0]["message"]["content"]
    word = full.split()[2]
    cut = chat(client, KEY, "why", max_tokens=12, stop=[word])["choices"][0]
    assert cut["message"]["content"].strip() == full[:full.index(word)].strip() and cut["finish_reason"] == "stop"
    assert cut == chat(client, TWIN, "why", max_tokens=12, stop=[word])["choices"][0]
    response = client.post("/v1/chat/completions", json={"model": KEY, "max_tokens": 12, "temperature": 0,
                                                         "stream": True, "messages": [{"role": "user",
                                                                                       "content": "why"}]})
    pieces = [json.loads(line[6:]) for line in response.get_data(as_text=True).splitlines()
              if line.startswith("data: {")]
    assert "".join(p["choices"][0]["delta"].get("content") or "" for p in pieces).strip() == full


def test_cancelled_row_ends_and_frees_openvino(app):
    from utils.families.base import GenerationParams, GenerationRequest

    params = GenerationParams(max_new_tokens=4000, temperature=1.0, top_p=1.0, do_sample=False)
    with manager(app).lease(KEY) as served:
        prepared = served.adapter.prepare(GenerationRequest(prompt="hello there"))
        job = served.engine.submit(prepared, params, streaming=True)
        pieces = job.pieces()
        next(pieces)  # it runs
        job.cancel()
        result = job.wait()
        assert result.finish_reason == "cancelled" and 0 < result.completion_tokens < 4000
        after = served.engine.submit(prepared, dataclasses.replace(params, max_new_tokens=3))
        assert after.wait().completion_tokens == 3  # the pipeline serves on
        assert not served.adapter.model.pipeline.has_non_finished_requests()


def test_manager_evicts_and_reloads_from_the_export(client, app):
    first = chat(client, KEY, "a small bird sings")["choices"][0]["message"]["content"]
    chat(client, "deepseek", "hello")
    chat(client, "qwen_vl", "hello")  # MAX_LOADED_MODELS=2: the least recently used (ours) goes
    status = manager(app).snapshot_one(KEY)
    assert not status["loaded"] and status["unload_count"] >= 1
    loads = status["load_count"]
    assert chat(client, KEY, "a small bird sings")["choices"][0]["message"]["content"] == first
    status = manager(app).snapshot_one(KEY)
    assert status["load_count"] == loads + 1 and status["last_load_seconds"] < 20  # read back, not exported again


def test_export_cache_rebuilds_a_changed_entry(app, tmp_path):
    from utils.runtimes.exporter import OpenVINOCache

    cache = app.extensions["model_server"].openvino_cache
    spec = app.extensions["model_server"].settings.models[KEY]
    entry = cache.find(cache.identity_of(spec))
    assert entry is not None and (entry / "openvino_model.xml").is_file()
    copy = OpenVINOCache(tmp_path, cache.exporter)
    shutil.copytree(entry, tmp_path / entry.name, copy_function=shutil.copy2)
    assert copy.find(copy.identity_of(spec)) == tmp_path / entry.name
    with open(tmp_path / entry.name / "openvino_model.bin", "r+b") as handle:
        handle.truncate(100)  # a torn write
    assert copy.find(copy.identity_of(spec)) is None and not (tmp_path / entry.name).exists()
    other = dataclasses.replace(spec, weight_format="int8")
    assert copy.identity_of(other).id != copy.identity_of(spec).id  # a setting is part of the key


def test_openvino_settings_are_validated(tmp_path):
    def load(model_yaml: str):
        path = tmp_path / "models.yaml"
        path.write_text("models:\n  m:\n    repo_id: a/b\n    family: text\n" + model_yaml)
        return load_settings(path, env={})
    spec = load("    runtime: openvino\n").models["m"]
    assert (spec.runtime, spec.weight_format) == ("openvino", "int4")
    assert load("").models["m"].runtime == "pytorch"
    for bad, field in [("    runtime: openvino\n    quantization: 4bit\n", "quantization"),
                       ("    runtime: openvino\n    device: cuda\n", "device"),
                       ("    runtime: onnx\n", "runtime"),
                       ("    runtime: openvino\n    weight_format: int2\n", "weight_format"),
                       ("    weight_format: int8\n", "weight_format"),
                       ("    runtime: openvino\n    engine: {batching: dynamic}\n", "engine"),
                       ("    device: gpu\n", "device")]:
        with pytest.raises(ConfigError, match=f"models.m.{field}"):
            load(bad)
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  m:\n    repo_id: a/b\n    family: vqa\n    runtime: openvino\n")
    with pytest.raises(ConfigError, match="models.m.runtime"):
        load_settings(path, env={})


def test_exporter_environment_keeps_the_servers_transformers():
    import transformers

    from utils.runtimes.exporter import ExporterEnvironment
    env = ExporterEnvironment(EXPORTER_DIR)
    assert env.ready()  # built by the first export of this module
    import subprocess
    found = subprocess.run([str(env.python()), "-I", "-c", "import transformers, torch; print(transformers.__version__,"
                            " torch.__file__)"], capture_output=True, text=True, timeout=120).stdout.split()
    assert found[0] == "5.5.4" and found[0] != transformers.__version__
    assert Path(found[1]).is_relative_to(Path(transformers.__file__).parents[1])  # torch shared, not installed twice


def test_the_engine_waits_for_requests_busy_in_python_before_it_steps(app, monkeypatch):
    """openvino-genai's step() holds the GIL: a request still being parsed when another reaches the
    engine would wait out the step. The engine waits (bounded) until no request is busy in Python, so
    both join one step: here the first is taken only once the second has been submitted."""
    import utils.runtimes.openvino as runtime
    from utils.engine.arrivals import ARRIVALS
    from utils.families.base import GenerationParams, GenerationRequest

    monkeypatch.setattr(runtime, "MIN_PAUSE", 20.0)  # the bound, raised so that only quiet ends the wait
    params = GenerationParams(max_new_tokens=3, temperature=1.0, top_p=1.0, do_sample=False)
    with manager(app).lease(KEY) as served:
        prepared = served.adapter.prepare(GenerationRequest(prompt="hello there"))
        parsing, submitted = threading.Event(), {}

        def slow_request():
            with ARRIVALS.visit():
                parsing.set()
                time.sleep(0.5)  # still reading its body, templating, tokenizing
                submitted["at"] = time.monotonic()
                submitted["job"] = served.engine.submit(prepared, params)
                submitted["job"].wait()
        thread = threading.Thread(target=slow_request)
        thread.start()
        parsing.wait(5)
        started = time.monotonic()
        first = served.engine.submit(prepared, params)
        assert first.wait().completion_tokens == 3
        thread.join(30)
        assert first.started_at >= submitted["at"], "the engine stepped while a request was busy in Python"
        assert submitted["job"].result.text == first.result.text
        assert time.monotonic() - started < 15  # it woke when the request reached it, not at the bound
    assert ARRIVALS.busy() == 0


def test_only_requests_that_can_reach_an_engine_are_counted_busy(client):
    """gunicorn's worker opens a visit per request; the middleware lets a GET's go (a slow download
    of a job's result must not pause an OpenVINO engine), a POST's stays busy until it submits."""
    from utils.engine.arrivals import ARRIVALS

    with ARRIVALS.visit() as visit:
        assert ARRIVALS.busy() == 1
        assert client.get("/health").status_code == 200
        assert ARRIVALS.busy() == 0 and visit.over
    with ARRIVALS.visit() as visit:
        assert chat(client, KEY, "why")["usage"]["completion_tokens"] == 12
        assert visit.busy and ARRIVALS.busy() == 1  # woken by its job's end, writing its answer
    assert ARRIVALS.busy() == 0
