"""The soak (bench/soak.py) in 30 seconds through the same code: mixed valid traffic over the five demo
models with MAX_LOADED_MODELS=2 against a live gunicorn server; no errors, no temp files left, every
model served. The full run is `.venv/bin/python bench/soak.py` (5 minutes; bench/README.md)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from bench import soak

SECONDS = 30


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(MAX_LOADED_MODELS=2)


@pytest.fixture(scope="module")
def report(server):
    return soak.soak(server.url, server.process.pid, server.tmp / "tmp", seconds=SECONDS, concurrency=16, seed=0,
                     warmup=10, window=10, sample_every=5, timeout=120, log_dir=server.tmp / "logs")


def test_thirty_second_soak_has_no_errors_and_serves_every_model(report):
    traffic = report["traffic"]
    assert traffic["requests"] >= 50, f"too little traffic to mean anything: {traffic['requests']} requests"
    assert report["warmup"]["ok"] == len(soak.KEYS), report["warmup"]
    assert traffic["errors"] == 0, (
        f"{traffic['errors']} of {traffic['requests']} failed ({traffic['errors_by_status']}): "
        f"{json.dumps(traffic['first_errors'])[:3000]}\nserver log: "
        f"{json.dumps(traffic['server_log_for_first_errors'])[:3000]}")
    served = {key: traffic["per_model"][key]["ok"] for key in soak.KEYS}
    assert all(served.values()), f"a model was never served: {served}"
    assert traffic["streamed"]["ok"] > 0 and traffic["multipart"]["ok"] > 0, traffic
    models = report["models"]
    assert models["loads"] > 0, "two slots for five models, yet no model was loaded during the traffic"
    assert all(info["error"] is None for info in models["per_model"].values()), models
    assert len(report["rss"]["worker_pids"]) == 1, f"the gunicorn worker was replaced: {report['rss']['worker_pids']}"
    assert all(s["rss_mb"] for s in report["rss"]["samples"]), "the worker's RSS could not be read"


def test_thirty_second_soak_leaves_no_temp_files(report, server):
    tmp = report["tmp"]
    assert tmp["tmp_dir_entries_at_end"] == 0, f"left in TMP_DIR: {tmp['left']}"
    assert soak.tmp_entries(server.tmp / "tmp") == []


def test_plan_is_deterministic_and_covers_the_mix():
    assert soak.plan(17, 0) == soak.plan(17, 0)
    assert [soak.plan(i, 0).key for i in range(50)] != [soak.plan(i, 1).key for i in range(50)]
    plans = [soak.plan(i, 0) for i in range(400)]
    variants = {p.variant for p in plans}
    for part in ("deepseek/text/json/plain", "deepseek/text/multipart/plain", "qwen_vl/image:1/", "qwen_vl/images:2/",
                 "qwen_vl/video:1/", "blip_vqa/image:1/", "qwen_audio/audio:1/", "qwen_omni/audio:1+image:1/",
                 "/stream"):
        assert any(part in v for v in variants), f"the first 400 requests never send {part}"
    assert {p.fields["max_new_tokens"] for p in plans} == set(range(1, 25))


def test_the_measurements_see_what_goes_wrong(server, tmp_path):
    """The checks the soak relies on report failures: an error response, a stray temp file, RSS growth."""
    media = soak.build_media()
    wrong = soak.Planned(0, "no_such_model", False, False, {"prompt": "x", "max_new_tokens": 2}, {})
    assert soak.send(server.url, wrong, media, 30).status == "404"
    too_many = soak.Planned(1, "blip_vqa", True, False, {"prompt": "x", "max_new_tokens": 2},
                            {"images": ["png_small", "png_wide"]})  # BLIP takes exactly one image
    result = soak.send(server.url, too_many, media, 30)
    assert result.status == "400" and not result.ok, result
    good = soak.Planned(2, "qwen_vl", True, True, {"prompt": "x", "max_new_tokens": 3, "temperature": 0},
                        {"video": ["mp4"]})
    result = soak.send(server.url, good, media, 60)
    assert result.ok, result
    assert result.request_id == "soak-000002"

    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "file.bin").write_bytes(b"x")
    assert soak.tmp_entries(tmp_path) == ["stray", str(Path("stray") / "file.bin")]

    samples = [{"t": t, "rss_mb": 100.0 + (60 if t >= 20 else 0)} for t in range(0, 31, 5)]
    growth = soak.rss_growth(samples, 30, warmup=5, window=10)
    assert growth["baseline_median_mb"] == 100.0 and growth["growth_mb"] == 60.0
    assert growth["window_medians_mb"] == [100.0, 100.0, 160.0]

    pid = soak.worker_pid(server.process.pid)
    assert pid and pid != server.process.pid
    reported = requests.get(server.url + "/admin/memory_status", timeout=10).json()["ram"]["process_rss"]
    assert abs(soak.rss_bytes(pid) - reported) < 64 * 2**20, "the pid read is not the worker serving requests"
