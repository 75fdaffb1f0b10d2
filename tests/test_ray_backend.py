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


def in_flight(server, model) -> int:
    return model_status(server)["models"][model]["in_flight"]


def test_a_dropped_openai_stream_stops_generating_on_the_replica(server):
    body = {"model": "deepseek", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000,
            "temperature": 0, "stream": True}
    with requests.post(f"{server.url}/v1/chat/completions", json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines(decode_unicode=True)
        assert any(line.startswith("data: ") for line in lines)  # the first chunk; then the client leaves
    # 4000 tokens take far longer than this: only a cancelled row frees the model this fast
    assert wait_for(lambda: in_flight(server, "deepseek") == 0, timeout=8, interval=0.2), \
        model_status(server)["replicas"]


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
    # the front's own collector ran through (it stops at the first error): the RAM tier, summed,
    # and each replica's own
    assert "\nmodel_server_ram_tier_bytes " in metrics and "model_server_requests_in_flight{" in metrics
    assert "model_server_replica_ram_tier_budget_bytes{replica=" in metrics
    assert "metrics collector" not in server.log_path.read_text()
    assert set(memory["pressure"]) <= {f"{rid}/{d}" for rid in replicas["by_replica"] for d in ("cpu", "cuda:0")}
    assert {"used", "budget", "models"} <= set(memory["ram_tier"])
    assert requests.get(f"{server.url}/health", timeout=5).status_code == 200


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
    def replaced():  # statuses are cached for a second: ask until the replacement shows
        replicas = model_status(server)["replicas"]
        return replicas["count"] == 2 and victim not in [info["pid"] for info in replicas["by_replica"].values()]
    assert wait_for(replaced, timeout=90, interval=1), model_status(server)["replicas"]


# ---------------------------------------------------------------------- the front's policy, without Ray

class FakeCluster:
    def __init__(self, settings, outcomes):
        self.settings, self.outcomes, self.calls = settings, outcomes, []

    def each_replica(self, method, *args, **kwargs):
        self.calls.append((method, args, kwargs))
        return self.outcomes

    def forget_statuses(self):
        pass


def test_admin_load_goes_to_the_models_group_and_never_succeeds_silently(make_settings):
    from utils.cluster.front import ClusterManager, ReplicaUnavailable, StillLoading
    from utils.errors import ServerError
    settings = make_settings()
    key = next(iter(settings.models))
    manager = ClusterManager(FakeCluster(settings, {}))
    with pytest.raises(ReplicaUnavailable):  # nobody answered: 503, not 200
        manager.unload(key)
    method, _, kwargs = manager.cluster.calls[-1]
    assert kwargs["group"] == settings.ray.group_of(key).name and kwargs["timeout"] > settings.ray.call_timeout
    manager.cluster.outcomes = {"r1": ("timeout", "r1 did not answer")}
    with pytest.raises(StillLoading) as caught:
        manager.unload(key)
    assert isinstance(caught.value, ServerError) and caught.value.status == 503 and caught.value.retry_after


def test_a_models_view_shows_a_replicas_load_error_when_none_holds_it(make_settings):
    from utils.cluster.front import _merge
    spec = next(iter(make_settings().models.values()))
    fine = {"loaded": False, "error": None, "state": "unloaded", "load_count": 0}
    failed = {"loaded": False, "error": "boom", "state": "error", "load_count": 0, "failures": 1}
    merged = _merge("m", spec, [("r1", fine), ("r2", failed)])
    assert merged["error"] == "boom" and merged["state"] == "error" and merged["failures"] == 1
