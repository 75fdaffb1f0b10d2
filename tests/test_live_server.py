"""The real process: `python main.py --demo` under gunicorn (one worker, threads) on loopback."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests import media_samples as ms
from tests.conftest import wait_for


@pytest.fixture(scope="module")
def server(start_server, extra_config):
    return start_server(MODELS_CONFIG=extra_config, MAX_LOADED_MODELS=3, MODEL_IDLE_TIMEOUT=600,
                        SWEEP_INTERVAL=0.2)


def model_status(server, key):
    return requests.get(server.url + "/admin/model_status", timeout=10).json()["models"][key]


def test_the_libraries_are_imported_before_the_server_answers(server):
    """A quantized model is configured (big8): no first load pays torch's, transformers' or
    bitsandbytes' import; they are in before /health answers."""
    assert "warmed torch, transformers and bitsandbytes in" in server.log_path.read_text(errors="replace")


def test_sixteen_simultaneous_requests_load_once(server):
    assert model_status(server, "qwen_vl")["loaded"] is False
    barrier = threading.Barrier(16)
    image = ms.b64(ms.png(48, 48))

    def one(i):
        barrier.wait()
        return requests.post(server.url + "/generate/qwen_vl",
                             json={"prompt": f"request {i}", "image": image, "max_new_tokens": 4}, timeout=120)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(16)))
    assert [r.status_code for r in responses] == [200] * 16
    assert all(r.json()["model"] == "qwen_vl" for r in responses)
    assert len({r.headers["X-Request-ID"] for r in responses}) == 16
    info = model_status(server, "qwen_vl")
    assert info["load_count"] == 1 and info["in_flight"] == 0


def test_slow_load_does_not_stall_a_loaded_model(server):
    url = server.url + "/generate/"
    assert requests.post(url + "deepseek", json={"prompt": "warm", "max_new_tokens": 2}, timeout=60).ok
    requests.post(server.url + "/admin/models/big8/unload", timeout=30)
    finished = {}

    def load_big():
        response = requests.post(url + "big8", json={"prompt": "slow", "max_new_tokens": 2}, timeout=300)
        finished["big"] = (time.monotonic(), response.status_code)

    loader = threading.Thread(target=load_big)
    loader.start()
    deadline = time.monotonic() + 30
    while model_status(server, "big8")["state"] != "loading" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert model_status(server, "big8")["state"] == "loading"  # 8-bit quantization takes seconds
    completed = []  # deepseek answers that came back while big was still loading or generating
    while "big" not in finished and len(completed) < 50:
        response = requests.post(url + "deepseek", json={"prompt": "fast", "max_new_tokens": 2}, timeout=60)
        assert response.status_code == 200
        completed.append(time.monotonic())
    loader.join()
    assert finished["big"][1] == 200
    served_during_load = sum(1 for t in completed if t < finished["big"][0])
    assert served_during_load >= 1, "no deepseek request completed while big was loading"


def test_bad_requests_do_not_disturb_requests_in_flight(server):
    url = server.url + "/generate/"
    good = {"prompt": "fine", "max_new_tokens": 4}
    bad = [(b"{oops", "application/json"), (b'{"prompt": 5}', "application/json"),
           (b'{"prompt": "x", "image": "###"}', "application/json"), (b"x", "text/plain")]

    def send_good(_):
        return requests.post(url + "deepseek", json=good, timeout=60).status_code

    def send_bad(i):
        raw, ctype = bad[i % len(bad)]
        target = "qwen_vl" if b"image" in raw else "deepseek"
        return requests.post(url + target, data=raw, headers={"Content-Type": ctype}, timeout=60).status_code

    with ThreadPoolExecutor(8) as pool:
        goods = pool.map(send_good, range(12))
        bads = pool.map(send_bad, range(12))
        assert list(goods) == [200] * 12
        assert all(400 <= s < 500 for s in bads)
    assert requests.get(server.url + "/health", timeout=5).json()["status"] == "ok"


def test_idle_models_unload_in_the_background(start_server):
    server = start_server(MODEL_IDLE_TIMEOUT=1, SWEEP_INTERVAL=0.2)
    assert requests.post(server.url + "/generate/deepseek", json={"prompt": "x", "max_new_tokens": 2},
                         timeout=60).ok
    assert model_status(server, "deepseek")["loaded"] is True
    deadline = time.monotonic() + 10
    while model_status(server, "deepseek")["loaded"] and time.monotonic() < deadline:
        time.sleep(0.1)
    info = model_status(server, "deepseek")
    assert info["loaded"] is False and info["last_unload_reason"] == "idle"


def test_streaming_sends_pieces_then_done(server):
    with requests.post(server.url + "/generate/deepseek", json={"prompt": "stream", "max_new_tokens": 6,
                                                                "stream": True}, stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    import json
    assert events[-1] == "[DONE]"
    pieces = [json.loads(e)["text"] for e in events[:-1]]
    assert len(pieces) >= 2 and "".join(pieces).strip()
    assert model_status(server, "deepseek")["in_flight"] == 0  # the lease ended with the stream


def stream_text(server, body):
    import json
    with requests.post(server.url + "/generate/deepseek", json=dict(body, stream=True), stream=True,
                       timeout=60) as r:
        events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    return "".join(json.loads(e)["text"] for e in events[:-1])


def test_seeded_stream_matches_the_plain_answer(server):
    body = {"prompt": "once upon a time", "max_new_tokens": 10, "do_sample": True, "temperature": 1.0,
            "seed": 1234}
    plain = requests.post(server.url + "/generate/deepseek", json=body, timeout=60).json()["response"]
    assert stream_text(server, body).strip() == plain
    assert stream_text(server, body).strip() == plain


def test_client_disconnect_stops_generation_and_ends_the_lease(server):
    body = {"prompt": "go on forever", "max_new_tokens": 8000, "stream": True}
    r = requests.post(server.url + "/generate/deepseek", json=body, stream=True, timeout=60)
    lines = r.iter_lines(decode_unicode=True)
    assert next(line for line in lines if line.startswith("data: "))
    assert model_status(server, "deepseek")["in_flight"] == 1
    r.close()  # the client goes away after the first piece
    deadline = time.monotonic() + 10
    while model_status(server, "deepseek")["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert model_status(server, "deepseek")["in_flight"] == 0
