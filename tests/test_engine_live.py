"""The engines through the real server process (gunicorn, one worker, threads) on loopback:
concurrent answers equal solo answers per family, back-pressure statuses, a client that leaves,
unloads and evictions that wait for the engine to drain."""
from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests import media_samples as ms
from tests.conftest import wait_for

FAMILIES = ("deepseek", "qwen_vl", "blip_vqa", "qwen_audio", "qwen_omni")
LONG = {"prompt": "tell a very long story", "max_new_tokens": 3000, "temperature": 0}


def body_for(key: str, i: int) -> dict:
    image = ms.b64(ms.png(24 + 4 * i, 20 + 2 * i, color=(10 * i, 255 - 9 * i, 40)))
    audio = ms.b64(ms.wav(0.25 + 0.05 * i, rate=16000, channels=1, freq=200 + 40 * i))
    media = {"deepseek": {}, "qwen_vl": {"image": image}, "blip_vqa": {"image": image},
             "qwen_audio": {"audio": audio}, "qwen_omni": {"image": image, "audio": audio}}[key]
    return dict(media, prompt=f"question {i}: " + "why " * (1 + i % 9), max_new_tokens=3 + (i * 3) % 8,
                temperature=0)


def status(server, key: str) -> dict:
    return requests.get(server.url + "/admin/model_status", timeout=10).json()["models"][key]



@pytest.fixture(scope="module")
def server(start_server):
    return start_server(MAX_LOADED_MODELS=5, MODEL_IDLE_TIMEOUT=600)


@pytest.mark.parametrize("key", FAMILIES)
def test_sixteen_concurrent_http_requests_get_their_solo_answers(server, key):
    url = f"{server.url}/generate/{key}"
    solo = [requests.post(url, json=body_for(key, i), timeout=120).json() for i in range(16)]
    barrier = threading.Barrier(16)

    def one(i):
        barrier.wait()
        return requests.post(url, json=body_for(key, i), timeout=120)

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(one, range(16)))
    assert [r.status_code for r in together] == [200] * 16
    for i, (alone, response) in enumerate(zip(solo, together)):
        got = response.json()
        assert (got["response"], got["usage"], got["finish_reason"]) == \
            (alone["response"], alone["usage"], alone["finish_reason"]), f"request {i} of {key}"
    engine = status(server, key)["engine"]
    assert engine["kind"] == ("continuous" if key == "deepseek" else "dynamic")
    assert engine["peak_batch"] > 1, f"{key} never batched: {engine}"


def test_engine_shows_in_status_and_metrics(server):
    requests.post(server.url + "/generate/blip_vqa", json=body_for("blip_vqa", 1), timeout=60)
    engine = status(server, "blip_vqa")["engine"]
    assert {"kind", "queue_depth", "running_batch", "max_batch_size", "max_queue", "tokens_per_second"} <= set(engine)
    text = requests.get(server.url + "/metrics", timeout=10).text
    for name in ("model_server_queue_wait_seconds_bucket", "model_server_batch_size_bucket",
                 'model_server_engine_queue_depth{model="blip_vqa"}', "model_server_engine_tokens_per_second"):
        assert name in text


@pytest.fixture(scope="module")
def narrow(start_server):
    """One row at a time and one queued request: back-pressure shows at once."""
    return start_server(MAX_LOADED_MODELS=5, MAX_BATCH_SIZE=1, MAX_QUEUE=1, QUEUE_TIMEOUT=1.5)


def start_long(server, results: dict, key: str = "deepseek") -> threading.Thread:
    def run():
        results[key] = requests.post(f"{server.url}/generate/{key}", json=LONG, timeout=120)
        results["finished_at"] = time.monotonic()
    thread = threading.Thread(target=run)
    thread.start()
    assert wait_for(lambda: (status(server, key).get("engine") or {}).get("running_batch") == 1), \
        "the long request never started"
    return thread


def test_full_queue_and_queue_timeout_answer_503_and_the_running_request_is_unharmed(narrow):
    results: dict = {}
    long_request = start_long(narrow, results)
    short = {"prompt": "short", "max_new_tokens": 2}
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: requests.post(narrow.url + "/generate/deepseek", json=short,
                                                          timeout=60), range(4)))
    errors = sorted(r.json()["error"] for r in responses)
    assert [r.status_code for r in responses] == [503] * 4, [r.text for r in responses]
    assert errors.count("queue full") >= 2 and "queue timeout" in errors  # one waited, timed out; others refused
    assert all(int(r.headers["Retry-After"]) >= 1 for r in responses)
    long_request.join()
    assert results["deepseek"].status_code == 200
    assert requests.post(narrow.url + "/generate/deepseek", json=short, timeout=60).status_code == 200


def test_a_client_that_disconnects_while_queued_leaves_the_queue(narrow):
    results: dict = {}
    long_request = start_long(narrow, results)
    with socket.create_connection(("127.0.0.1", narrow.port)) as raw:
        payload = b'{"prompt": "queued then gone", "max_new_tokens": 2}'
        raw.sendall(b"POST /generate/deepseek HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        assert wait_for(lambda: status(narrow, "deepseek")["engine"]["queue_depth"] == 1)
    assert wait_for(lambda: status(narrow, "deepseek")["engine"]["queue_depth"] == 0, timeout=1.2), \
        "the abandoned request stayed queued"
    assert status(narrow, "deepseek")["engine"]["running_batch"] == 1  # the long one goes on
    long_request.join()
    assert results["deepseek"].status_code == 200


def test_unload_and_emergency_cleanup_wait_for_a_running_batch(narrow):
    results: dict = {}
    long_request = start_long(narrow, results)
    busy = requests.post(narrow.url + "/admin/models/deepseek/unload", timeout=30)
    assert busy.status_code == 409 and busy.json()["error"] == "model busy"
    cleanup = requests.post(narrow.url + "/admin/emergency_cleanup", timeout=30)
    assert cleanup.status_code == 200 and status(narrow, "deepseek")["loaded"]
    waited = requests.post(narrow.url + "/admin/models/deepseek/unload?wait=60", timeout=90)
    long_request.join()
    assert waited.status_code == 200 and results["deepseek"].status_code == 200
    assert results["deepseek"].json()["usage"]["completion_tokens"] >= 1
    assert not status(narrow, "deepseek")["loaded"]


def test_eviction_waits_until_the_evicted_models_engine_drained(start_server):
    server = start_server(MAX_LOADED_MODELS=1, MAX_BATCH_SIZE=1)
    assert requests.post(server.url + "/generate/deepseek", json={"prompt": "warm", "max_new_tokens": 2},
                         timeout=60).status_code == 200
    results: dict = {}
    long_request = start_long(server, results)
    other = requests.post(server.url + "/generate/blip_vqa", json=body_for("blip_vqa", 2), timeout=120)
    finished_other = time.monotonic()
    long_request.join()
    assert results["deepseek"].status_code == 200 and other.status_code == 200, other.text
    info = status(server, "deepseek")
    assert info["last_unload_reason"] == "count" and info["unload_count"] == 1
    # blip_vqa could only load once deepseek's running request had finished and its engine drained
    assert results["finished_at"] <= finished_other


def test_a_request_past_its_deadline_gets_408_with_what_was_generated(server):
    body = dict(LONG, timeout=0.5)
    started = time.monotonic()
    response = requests.post(server.url + "/generate/deepseek", json=body, timeout=60)
    took = time.monotonic() - started
    assert response.status_code == 408, response.text
    error = response.json()
    assert error["error"] == "request timeout" and "generated so far" in error["details"]
    assert took < 3, f"the deadline was 0.5 s; the answer took {took:.1f} s"
    assert wait_for(lambda: status(server, "deepseek")["engine"]["running_batch"] == 0, timeout=2)
    quick = requests.post(server.url + "/generate/deepseek", json={"prompt": "next", "max_new_tokens": 2},
                          timeout=10)
    assert quick.status_code == 200  # the next request to the same model is served at once


def test_a_stream_past_its_deadline_ends_with_finish_reason_timeout(server):
    import json
    body = {"model": "deepseek", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 3000,
            "temperature": 0, "stream": True, "timeout": 0.5}
    with requests.post(server.url + "/v1/chat/completions", json=body, stream=True, timeout=60) as response:
        events = [line[6:] for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    finishes = [c["choices"][0]["finish_reason"] for c in map(json.loads, events[:-1]) if c.get("choices")]
    assert finishes[-1] == "timeout"
    per_model = requests.post(server.url + "/generate/deepseek", json=dict(LONG, timeout="x"), timeout=10)
    assert per_model.status_code == 400 and per_model.json()["field"] == "timeout"
