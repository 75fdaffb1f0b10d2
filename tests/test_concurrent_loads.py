"""Loads that overlap must never corrupt a model (transformers' from_pretrained swaps process-wide
state; see utils/families/loading.py). Real loads of the five demo checkpoints, no stand-ins."""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from tests import media_samples as ms
from utils.families import GenerationParams, GenerationRequest, load_family
from utils.families.loading import BrokenWeights, WeightLoadQueue, check_loaded_weights

DEMO_KEYS = ("deepseek", "qwen_vl", "blip_vqa", "qwen_audio", "qwen_omni")
GREEDY = GenerationParams(max_new_tokens=6, temperature=1.0, top_p=1.0, do_sample=False)


def _request(key: str) -> GenerationRequest:
    image = Image.new("RGB", (40, 32), (200, 30, 30))
    audio = (0.3 * np.sin(np.linspace(0, 440 * 2 * np.pi, 16000))).astype(np.float32)
    media = {"qwen_vl": {"images": [image]}, "blip_vqa": {"images": [image]}, "qwen_audio": {"audios": [audio]},
             "qwen_omni": {"images": [image], "audios": [audio]}}.get(key, {})
    return GenerationRequest(prompt=f"what is in the {key} input?", **media)


def _answer(adapter) -> str:
    return adapter.generate(adapter.prepare(_request(adapter.spec.key)), GREEDY).text


@pytest.fixture(scope="module")
def specs(make_settings):
    settings = make_settings()
    return {key: settings.models[key] for key in DEMO_KEYS}


def test_overlapping_loads_of_five_models_all_serve_correctly(specs):
    from transformers import PreTrainedModel
    original_tie_weights = PreTrainedModel.tie_weights
    solo = {}
    for key, spec in specs.items():  # each model's answer when it loaded alone
        adapter = load_family(spec, "cpu")
        solo[key] = _answer(adapter)
        adapter.release()
    rng = random.Random(7)
    for round_ in range(6):
        keys = list(DEMO_KEYS) * 2  # ten threads, two loads of each model, in a shuffled order
        rng.shuffle(keys)
        barrier = threading.Barrier(len(keys))

        def load(key):
            barrier.wait()
            return load_family(specs[key], "cpu")

        with ThreadPoolExecutor(len(keys)) as pool:
            adapters = list(pool.map(load, keys))
        assert PreTrainedModel.tie_weights is original_tie_weights, f"round {round_}: tie_weights left patched"
        for key, adapter in zip(keys, adapters):
            check_loaded_weights(adapter.model)
            assert _answer(adapter) == solo[key], f"round {round_}: {key} answers differently after a shared load"
            adapter.release()


def test_meta_tensors_fail_the_check(specs):
    import torch
    adapter = load_family(specs["blip_vqa"], "cpu")
    check_loaded_weights(adapter.model)  # a good load passes
    decoder = adapter.model.text_decoder.cls.predictions
    decoder.bias = torch.nn.Parameter(torch.empty_like(decoder.bias, device="meta"))
    with pytest.raises(BrokenWeights, match="meta device"):
        check_loaded_weights(adapter.model)


def test_untied_weights_fail_the_check(specs):
    import torch
    adapter = load_family(specs["blip_vqa"], "cpu")
    tied = adapter.model.all_tied_weights_keys
    assert tied, "BLIP ties its decoder's output weights to its embeddings"
    target = next(iter(tied))
    module_name, _, attr = target.rpartition(".")
    module = adapter.model.get_submodule(module_name)
    setattr(module, attr, torch.nn.Parameter(getattr(module, attr).detach().clone()))
    with pytest.raises(BrokenWeights, match="not tied"):
        check_loaded_weights(adapter.model)


def test_load_queue_runs_one_load_at_a_time_and_reports_who_waits():
    queue = WeightLoadQueue()
    inside, peak, seen_waiting = [0], [0], set()
    guard = threading.Lock()

    def load(key):
        with queue.turn(key):
            with guard:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.05)
            seen_waiting.update(queue.waiting())
            with guard:
                inside[0] -= 1

    threads = [threading.Thread(target=load, args=(k,)) for k in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1
    assert seen_waiting and seen_waiting <= {"a", "b", "c"}
    assert queue.waiting() == frozenset() and queue.loading() is None


def test_a_load_that_fails_the_check_is_a_failed_load_not_a_served_model(make_settings, tmp_path):
    """BLIP's checkpoint stores its tied decoder weights once; with tying disabled (the state an
    overlapping load used to leave behind) they stay on the meta device. The manager must answer
    503 and keep the model out of service."""
    from app import create_app
    from utils.errors import ModelUnavailable
    settings = make_settings(MAX_LOADED_MODELS="5")
    app = create_app(settings, background=False)
    manager = app.extensions["model_server"].manager
    from transformers import PreTrainedModel
    original = PreTrainedModel.tie_weights
    PreTrainedModel.tie_weights = lambda *a, **k: None  # the state an overlapping load used to leave behind
    try:
        with pytest.raises(ModelUnavailable, match="meta device|not tied"):
            with manager.lease("blip_vqa"):
                pass
    finally:
        PreTrainedModel.tie_weights = original
    info = manager.snapshot_one("blip_vqa")
    assert info["state"] == "error" and not info["loaded"]
    manager.shutdown()


@pytest.fixture(scope="module")
def churn_server(start_server):
    return start_server(MAX_LOADED_MODELS=2, MODEL_IDLE_TIMEOUT=600, SWEEP_INTERVAL=0.5)


def test_mixed_traffic_over_five_models_with_two_slots_has_no_errors(churn_server):
    image, audio = ms.b64(ms.png(40, 32)), ms.b64(ms.wav(0.5, rate=16000, channels=1))
    bodies = {"deepseek": {}, "qwen_vl": {"image": image}, "blip_vqa": {"image": image},
              "qwen_audio": {"audio": audio}, "qwen_omni": {"image": image, "audio": audio}}
    deadline = time.monotonic() + 25
    statuses: dict[int, int] = {}
    failures: list[str] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            key = rng.choice(DEMO_KEYS)
            body = dict(bodies[key], prompt=f"client {seed} asks {key}", max_new_tokens=4)
            response = requests.post(f"{churn_server.url}/generate/{key}", json=body, timeout=120)
            with lock:
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code != 200:
                    failures.append(f"{key}: {response.status_code} {response.text[:200]}")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(client, range(8)))
    total = sum(statuses.values())
    assert total > 40, f"too little traffic to mean anything: {statuses}"
    assert not failures, f"{len(failures)} of {total} failed: {failures[:5]}"
    status = requests.get(churn_server.url + "/admin/model_status", timeout=10).json()["models"]
    assert sum(status[k]["load_count"] for k in DEMO_KEYS) > 5, "traffic never made models trade places"
    assert all(status[k]["error"] is None for k in DEMO_KEYS)


@pytest.fixture(scope="module")
def one_slot_server(start_server):
    """Default grouping (GROUP_WINDOW unset), room for one model."""
    return start_server(MAX_LOADED_MODELS=1, MODEL_IDLE_TIMEOUT=600)


def test_one_client_alternating_two_models_never_waits_for_the_model_it_left(one_slot_server):
    """A, B, A, B, A, B from one client: each request evicts the other model at once. The manager
    records every load's wait for a model spared by grouping (status, metric, log): none here. With
    the old automatic window each switch waited for the other model's whole load time."""
    image = ms.b64(ms.png(40, 32))
    bodies = {"deepseek": {"prompt": "switch", "max_new_tokens": 2},
              "qwen_vl": {"prompt": "switch", "image": image, "max_new_tokens": 2}}
    for key in ["deepseek", "qwen_vl"] * 3:
        response = requests.post(f"{one_slot_server.url}/generate/{key}", json=bodies[key], timeout=120)
        assert response.status_code == 200, response.text
    status = requests.get(one_slot_server.url + "/admin/model_status", timeout=10).json()["models"]
    for key in bodies:
        assert status[key]["load_count"] == 3 and status[key]["last_unload_reason"] in ("count", None)
        assert status[key]["grouping_waits"] == 0 and status[key]["last_grouping_wait"] is None, status[key]
    metrics = requests.get(one_slot_server.url + "/metrics", timeout=10).text
    assert "model_server_grouping_wait_seconds_count{" not in metrics
    assert "waits for room" not in one_slot_server.log_path.read_text(errors="replace")
