"""backend: ray (utils/cluster/): one real server (`main.py --backend ray`) over a local Ray instance
on the CPU: 2 replicas of 0.5 CPU, one model per replica, one torch thread each. Started once for
the module; the replica kill runs last."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")

from tests.conftest import LiveServer, wait_for  # noqa: E402
from tests.conftest import test_env as server_env  # noqa: E402

GREEDY = {"prompt": "Say something about cats.", "temperature": 0, "max_new_tokens": 8}


class RayServer(LiveServer):
    def _wait_ready(self, timeout: float = 240) -> None:  # Ray and two replicas importing torch
        super()._wait_ready(timeout)


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    env = server_env(models_dir, tmp, TORCH_THREADS="1", RAY_REPLICAS="2", RAY_REPLICA_NUM_CPUS="0.5",
                   RAY_NUM_CPUS="2", RAY_MAX_MODELS_PER_REPLICA="1", MODEL_IDLE_TIMEOUT="-1")
    live = RayServer(env, ["--backend", "ray", "--threads", "16"], log_path=tmp / "server.log")
    yield live
    live.stop()


def post(server, model, body, **kw):
    return requests.post(f"{server.url}/generate/{model}", json=body, timeout=kw.pop("timeout", 60), **kw)


def model_status(server) -> dict:
    return requests.get(f"{server.url}/admin/model_status", timeout=30).json()


def loads(server) -> int:
    return sum(info["load_count"] for info in model_status(server)["models"].values())


def test_generate_through_ray_equals_local(server, client):
    remote = post(server, "deepseek", GREEDY)
    local = client.post("/generate/deepseek", json=GREEDY)
    assert remote.status_code == 200, remote.text
    assert remote.json()["response"] == local.get_json()["response"]
    assert remote.json()["usage"] == local.get_json()["usage"]


def test_bad_input_is_the_same_400(server, client):
    body = dict(GREEDY, temperature=5)
    remote, local = post(server, "deepseek", body), client.post("/generate/deepseek", json=body)
    assert remote.status_code == local.status_code == 400
    assert remote.json() == local.get_json()
    assert post(server, "nope", GREEDY).status_code == 404


def test_a_job_runs_through_the_replicas_and_answers_what_generate_answers(server):
    submitted = requests.post(f"{server.url}/jobs/deepseek", json=GREEDY, timeout=60)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]
    assert wait_for(lambda: requests.get(f"{server.url}/jobs/{job_id}", timeout=30).json()["status"] == "succeeded",
                    timeout=120), requests.get(f"{server.url}/jobs/{job_id}", timeout=30).json()
    result = requests.get(f"{server.url}/jobs/{job_id}/result", timeout=30).json()
    assert result == post(server, "deepseek", GREEDY).json()


def test_streaming_through_the_handle(server):
    whole = post(server, "deepseek", GREEDY).json()["response"]
    with requests.post(f"{server.url}/generate/deepseek", json=dict(GREEDY, stream=True), stream=True,
                       timeout=60) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["text"] for e in events[:-1]) == whole
    chat = requests.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": "deepseek", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": True}})
    assert chat.status_code == 200 and chat.text.rstrip().endswith("data: [DONE]")
    assert '"completion_tokens": 4' in chat.text


def test_multiplexing_holds_and_admin_names_the_replicas(server):
    for _ in range(3):  # warm-up: each model lands on a replica of its own
        for model in ("deepseek", "qwen_vl"):
            assert post(server, model, GREEDY).status_code == 200
        time.sleep(0.5)
    before = loads(server)
    for i in range(60):
        response = post(server, ("deepseek", "qwen_vl")[i % 2], GREEDY)
        assert response.status_code == 200, response.text
    assert loads(server) == before, "alternating requests caused loads: multiplexing did not hold"
    replicas = model_status(server)["replicas"]
    assert replicas["count"] == 2
    holders = replicas["by_model"]
    assert len(holders["deepseek"]) == 1 and len(holders["qwen_vl"]) == 1
    assert holders["deepseek"] != holders["qwen_vl"]
    for rid, info in replicas["by_replica"].items():
        assert info["pid"] and info["loaded_models"] and len(info["loaded_models"]) <= 1
    memory = requests.get(f"{server.url}/admin/memory_status", timeout=30).json()
    assert set(memory["replicas"]) == set(replicas["by_replica"])
    assert all(m["ram"]["process_rss"] > 0 for m in memory["replicas"].values())
    metrics = requests.get(f"{server.url}/metrics", timeout=30).text
    assert 'model_server_replica_model_loaded{model="deepseek"' in metrics \
        or "model_server_replica_model_loaded{replica=" in metrics


def test_admin_load_and_unload_act_on_every_replica(server):
    response = requests.post(f"{server.url}/admin/models/qwen_audio/unload", timeout=60)
    assert response.status_code == 200
    response = requests.post(f"{server.url}/admin/models/deepseek/unload", timeout=60)
    assert response.status_code == 200 and response.json()["unloaded"] is True
    assert "deepseek" not in model_status(server)["replicas"]["by_model"]
    response = requests.post(f"{server.url}/admin/models/deepseek/load", timeout=120)
    assert response.status_code == 200, response.text
    by_replica = model_status(server)["replicas"]["by_replica"]
    assert all(info["loaded_models"] == ["deepseek"] for info in by_replica.values())


def test_a_killed_replica_gives_503_then_200_never_500(server):
    in_flight: list = []
    slow = threading.Thread(target=lambda: in_flight.append(
        post(server, "deepseek", dict(GREEDY, max_new_tokens=4000), timeout=120)))
    slow.start()
    busy = {}
    assert wait_for(lambda: busy.update(
        (info["pid"], rid) for rid, info in model_status(server)["replicas"]["by_replica"].items()
        if info["models"].get("deepseek", {}).get("in_flight")) or busy, timeout=20, interval=0.05)
    victim = next(iter(busy))
    os.kill(victim, signal.SIGKILL)  # the replica running the slow request
    seen = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        response = post(server, "deepseek", GREEDY, timeout=60)
        seen.append(response.status_code)
        assert response.status_code in (200, 503), response.text
        if response.status_code == 503:
            assert response.headers.get("Retry-After"), response.headers
            assert response.json()["error"] == "replica unavailable"
        if response.status_code == 200 and seen.count(200) >= 5:
            break
        time.sleep(0.1)
    slow.join(120)
    assert in_flight and in_flight[0].status_code == 503, in_flight
    assert in_flight[0].headers.get("Retry-After") and in_flight[0].json()["error"] == "replica unavailable"
    assert seen[-1] == 200, seen
    assert wait_for(lambda: model_status(server)["replicas"]["count"] == 2, timeout=90, interval=1)
    assert victim not in [info["pid"] for info in model_status(server)["replicas"]["by_replica"].values()]
