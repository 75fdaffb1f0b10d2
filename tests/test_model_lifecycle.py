"""Loading, eviction, quantization, failure containment and unloading on the REAL families."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest

from tests import media_samples as ms
from tests.conftest import ROOT, make_app




def status(client, key=None):
    body = client.get("/admin/model_status").get_json()
    return body["models"][key] if key else body


def generate(client, model, **body):
    body.setdefault("prompt", "hello")
    body.setdefault("max_new_tokens", 3)
    return client.post(f"/generate/{model}", json=body)


@pytest.fixture(scope="module")
def lifecycle_app(make_settings, extra_config):
    app = make_app(make_settings(MODELS_CONFIG=extra_config, MAX_LOADED_MODELS=2, FAILED_LOAD_BACKOFF=30))
    yield app
    app.extensions["model_server"].manager.shutdown()


@pytest.fixture
def lc(lifecycle_app):
    client = lifecycle_app.test_client()
    lifecycle_app.extensions["model_server"].manager.unload_idle()
    return client


def test_lazy_load_then_lru_eviction_at_cap_two(lc):
    assert status(lc, "deepseek")["loaded"] is False  # nothing loads before it is asked for
    image = ms.b64(ms.png())
    assert generate(lc, "deepseek").status_code == 200
    assert generate(lc, "blip_vqa", image=image).status_code == 200
    assert generate(lc, "deepseek").status_code == 200          # deepseek is now the most recent
    assert generate(lc, "qwen_vl", image=image).status_code == 200
    body = status(lc)
    assert set(body["loaded_models"]) == {"deepseek", "qwen_vl"}
    assert body["models"]["blip_vqa"]["last_unload_reason"] == "count"
    assert body["models"]["deepseek"]["load_count"] == 1


def test_keep_alive_zero_unloads_after_request(lc):
    assert generate(lc, "deepseek", keep_alive=0).status_code == 200
    info = status(lc, "deepseek")
    assert info["loaded"] is False and info["last_unload_reason"] == "keep_alive=0"


def test_idle_timeout_unloads(make_settings):
    app = make_app(make_settings(MODEL_IDLE_TIMEOUT="0.3"))
    client = app.test_client()
    assert generate(client, "deepseek").status_code == 200
    manager = app.extensions["model_server"].manager
    assert manager.expire_idle() == []
    time.sleep(0.4)
    assert manager.expire_idle() == ["deepseek"]
    assert status(client, "deepseek")["last_unload_reason"] == "idle"


def test_failed_load_is_contained_with_backoff(lc):
    first = generate(lc, "broken")
    assert first.status_code == 503
    assert first.get_json()["error"] == "model failed to load"
    assert int(first.headers["Retry-After"]) == 30
    again = generate(lc, "broken")
    assert again.status_code == 503
    info = status(lc, "broken")
    assert info["state"] == "error" and info["failures"] == 1 and info["error"]  # not reloaded
    assert generate(lc, "deepseek").status_code == 200                            # others keep serving


def test_missing_checkpoint_says_how_to_download(lc):
    response = generate(lc, "missing")
    assert response.status_code == 503
    assert "download" in response.get_json()["details"]
    assert status(lc, "missing")["files"] == "not_downloaded"


def test_model_that_cannot_fit_is_503_and_server_stays_healthy(make_settings):
    app = make_app(make_settings(RAM_BUDGET_GB="0.0001"))  # ~100 KB: no model fits
    client = app.test_client()
    response = generate(client, "deepseek")
    assert response.status_code == 503
    body = response.get_json()
    assert body["error"] == "insufficient memory" and "budget" in body["details"]
    assert "Retry-After" in response.headers
    assert client.get("/health").status_code == 200


def test_memory_budget_evicts_before_loading(make_settings, extra_config):
    from utils.runtimes import estimate_bytes  # the manager's estimate: weights and the engine's reserve
    settings = make_settings(MODELS_CONFIG=extra_config, MAX_LOADED_MODELS=5)
    sizes = {k: estimate_bytes(settings.models[k]) for k in ("deepseek", "qwen_vl")}
    budget = 1.2 * sizes["qwen_vl"]  # room for either model, not for both
    assert sizes["deepseek"] < budget < sizes["deepseek"] + sizes["qwen_vl"]
    budget_gb = budget / 2**30
    app = make_app(make_settings(MODELS_CONFIG=extra_config, MAX_LOADED_MODELS=5, RAM_BUDGET_GB=budget_gb))
    client = app.test_client()
    assert generate(client, "deepseek").status_code == 200
    assert generate(client, "qwen_vl", image=ms.b64(ms.png())).status_code == 200
    body = status(client)
    assert body["loaded_models"] == ["qwen_vl"]
    assert body["models"]["deepseek"]["last_unload_reason"] == "memory"


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_bitsandbytes_quantized_text_model_generates(make_settings, bits):
    plain = make_app(make_settings())
    quantized = make_app(make_settings().with_model("deepseek", quantization=bits))
    sizes = {}
    for name, app in (("plain", plain), ("quantized", quantized)):
        client = app.test_client()
        body = generate(client, "deepseek", max_new_tokens=4).get_json()
        assert body["usage"]["completion_tokens"] >= 1, body
        sizes[name] = status(client, "deepseek")["bytes_in_memory"]
        assert status(client, "deepseek")["quantization"] == ("none" if name == "plain" else bits)
    with quantized.extensions["model_server"].manager.lease("deepseek") as model:
        import bitsandbytes as bnb
        linear = (bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt)
        assert any(isinstance(m, linear) for m in model.adapter.model.modules())
    assert sizes["quantized"] < sizes["plain"]


_FRESH_QUANTIZED = r"""
import dataclasses, json, sys, time
sys.path.insert(0, sys.argv[1])
import torch, transformers  # what every load imports anyway
from utils.config.settings import load_settings
from utils.families import load_family
from utils.families.base import GenerationParams, GenerationRequest
from utils.families.loading import warm_imports
seconds = warm_imports(quantized=True)
spec = load_settings(env={"MODELS_DIR": sys.argv[2], "DEMO_MODE": "1"}).models["deepseek"]
out = {"warm_s": seconds, "inductor_after_import": "torch._inductor.codecache" in sys.modules}
for bits in ("4bit", "8bit"):
    adapter = load_family(dataclasses.replace(spec, quantization=bits), "cpu")
    result = adapter.generate(adapter.prepare(GenerationRequest(prompt="hello")),
                              GenerationParams(max_new_tokens=3, temperature=0.0, top_p=1.0, do_sample=False))
    out[bits] = result.completion_tokens
out["inductor_after_generate"] = "torch._inductor.codecache" in sys.modules
print(json.dumps(out))
"""


def test_importing_bitsandbytes_imports_no_inductor_and_quantized_models_still_generate(models_dir):
    """bitsandbytes wraps ops in torch.compile at import, which imported torch._inductor's compiler (about a
    second of CPU in the first quantized request after a restart): a fresh process warms it without
    it, and 4-bit and 8-bit models load and generate on CPU without ever needing it."""
    run = subprocess.run([sys.executable, "-c", _FRESH_QUANTIZED, str(ROOT), str(models_dir)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["warm_s"] is not None and out["4bit"] >= 1 and out["8bit"] >= 1, out
    assert not out["inductor_after_import"] and not out["inductor_after_generate"], out


def test_4bit_vision_language_model_generates(make_settings):
    app = make_app(make_settings().with_model("qwen_vl", quantization="4bit"))
    response = generate(app.test_client(), "qwen_vl", image=ms.b64(ms.png(64, 64)))
    assert response.status_code == 200, response.get_json()


def test_unload_really_frees_memory(lc):
    process = psutil.Process()
    lc.post("/admin/emergency_cleanup")
    before = process.memory_info().rss
    assert generate(lc, "big").status_code == 200
    loaded_bytes = status(lc, "big")["bytes_in_memory"]
    during = process.memory_info().rss
    assert loaded_bytes > 300 * 2**20
    assert during - before > 0.5 * loaded_bytes
    response = lc.post("/admin/models/big/unload")
    assert response.get_json()["unloaded"] is True
    after = process.memory_info().rss
    assert during - after > 0.5 * loaded_bytes, (before, during, after)


def test_preload_models_load_at_start(make_settings):
    from app import create_app
    app = create_app(make_settings().with_model("blip_vqa", preload=True), background=True)
    try:
        client = app.test_client()
        deadline = time.monotonic() + 30
        while not status(client, "blip_vqa")["loaded"] and time.monotonic() < deadline:
            time.sleep(0.05)
        body = status(client)
        assert body["loaded_models"] == ["blip_vqa"]  # only the preload model, before any request
    finally:
        services = app.extensions["model_server"]
        services.sweeper.stop()
        services.manager.shutdown()


def test_a_model_split_by_max_memory_loads_through_device_map_auto_and_serves(make_settings):
    """Seed 001's per-model max_memory: accelerate places the model (here on the CPU alone)."""
    from utils.families.base import from_pretrained_kwargs
    settings = make_settings().with_model("deepseek", max_memory={"cpu": 2**30})
    kwargs = from_pretrained_kwargs(settings.models["deepseek"], "cpu")
    assert kwargs["device_map"] == "auto" and kwargs["max_memory"] == {"cpu": 2**30}
    app = make_app(settings)
    client = app.test_client()
    assert generate(client, "deepseek", max_new_tokens=3).status_code == 200
    info = status(client, "deepseek")
    assert info["placement"] == {"cpu": info["bytes_in_memory"]} and info["fallback"] is None
    moved = client.post("/admin/models/deepseek/load?device=cpu&wait=5")
    assert moved.status_code == 200 and moved.get_json()["model"]["device"] == "cpu"
    assert client.post("/admin/models/deepseek/load?device=tpu").status_code == 400
    app.extensions["model_server"].manager.shutdown()


def test_the_response_names_the_device_the_model_ran_on(lc):
    response = generate(lc, "deepseek")
    assert response.status_code == 200 and response.headers["X-Model-Device"] == "cpu"
    chat = lc.post("/v1/chat/completions", json={"model": "deepseek", "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "hi"}]})
    assert chat.headers["X-Model-Device"] == "cpu"
