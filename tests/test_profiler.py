"""POST /admin/profile: torch.profiler on a real engine thread while real requests run on the tiny
deepseek checkpoint; the trace holds the forward passes' operators and the engine's named phases."""
from __future__ import annotations

import gzip
import json
import threading

from utils.ops import profiler

PHASES = {"engine.join", "engine.prefill", "engine.step", "engine.forward", "engine.sample", "engine.emit"}


def test_profile_records_the_engine_phases_while_a_request_runs(app, client):
    assert client.post("/admin/models/deepseek/load").status_code == 200
    stop, answers = threading.Event(), []

    def traffic():  # requests back to back, so every phase falls inside the recorded window
        own = app.test_client()
        while not stop.is_set():
            answers.append(own.post("/generate/deepseek", json={"prompt": "Tell me about the sea",
                                                                "max_new_tokens": 16, "temperature": 0}).status_code)

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        reply = client.post("/admin/profile?seconds=1.5&model=deepseek")
    finally:
        stop.set()
        sender.join(60)
    assert reply.status_code == 200, reply.get_data(as_text=True)
    assert reply.content_type == "application/gzip"
    assert answers and set(answers) == {200}
    events = json.loads(gzip.decompress(reply.data))["traceEvents"]
    names = {event.get("name") for event in events}
    assert PHASES <= names, PHASES - names
    assert "aten::linear" in names or "aten::addmm" in names or "aten::mm" in names  # the forward's operators
    engine = app.extensions["model_server"].manager.snapshot_one("deepseek")["engine"]["thread_id"]
    cpu_threads = {event["tid"] for event in events if event.get("ph") == "X" and event.get("cat") == "cpu_op"}
    assert cpu_threads == {engine}  # the request threads' operators (tokenizer, route) are left out
    assert {"name": "engine-deepseek"} in [e["args"] for e in events if e.get("name") == "thread_name"]
    totals = profiler.phase_totals(events)
    assert totals["engine.forward"]["count"] >= 2 and totals["engine.step"]["seconds"] > 0


def test_profile_refuses_a_second_one_and_bad_arguments(app, client):
    first: list = []
    recording = threading.Thread(target=lambda: first.append(app.test_client().post("/admin/profile?seconds=1")))
    recording.start()
    try:
        while not profiler._ONE_AT_A_TIME.locked() and recording.is_alive():
            recording.join(0.01)
        second = client.post("/admin/profile?seconds=1")
    finally:
        recording.join(30)
    assert first[0].status_code == 200
    assert second.status_code == 409 and second.get_json()["error"] == "profiler busy"
    assert client.post("/admin/profile?seconds=61").status_code == 400   # above profile_max_seconds (60)
    assert client.post("/admin/profile").status_code == 400              # seconds is required
    assert client.post("/admin/profile?seconds=abc").status_code == 400
    assert client.post("/admin/profile?seconds=1&model=nope").status_code == 404
    client.post("/admin/models/flux/unload")
    reply = client.post("/admin/profile?seconds=1&model=flux")
    assert reply.status_code == 409 and reply.get_json()["error"] == "model not loaded"
