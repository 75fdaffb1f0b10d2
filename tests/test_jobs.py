"""Asynchronous jobs (POST /jobs/<model>): the store and runner's policy with a stand-in executor
(recovery after a crash, retries, expiry, paging: no model involved), then the real thing on the
demo checkpoints: results equal to the synchronous answers, progress, cancellation between steps,
and kill -9 of a real server process with a queued and a running job, then a restart."""
from __future__ import annotations

import base64
import io
import json
import signal
import threading
import time

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from tests.conftest import LiveServer, make_app, wait_for
from tests.conftest import test_env as server_env
from utils.errors import JobNotFinished, ModelUnavailable, UnknownJob
from utils.jobs.runner import JobControl, JobOutcome, JobRunner
from utils.jobs.store import JobStore

SLOW_IMAGE = {"prompt": "a slow one", "num_inference_steps": 16, "width": 1024, "height": 1024, "num_images": 4,
              "seed": 5}  # ~0.3-0.6 s a step on the demo pipeline on 2 cores: long enough to watch and to kill


def pixels(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB")).astype(int)


# ------------------------------------------------------------------ policy (stand-in executor)

class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def runner(tmp_path, execute, clock=None, **options) -> JobRunner:
    settings = {"workers": 1, "max_queued": 10, "max_attempts": 2} | options
    return JobRunner(JobStore(tmp_path / "jobs"), execute, clock=clock or time.time, **settings)


def text_outcome(text: str) -> JobOutcome:
    return JobOutcome(files={"result.json": json.dumps({"response": text}).encode()}, media_type="application/json")


def test_jobs_left_running_by_a_dead_process_run_again_once_then_fail_with_the_reason(tmp_path):
    store = JobStore(tmp_path / "jobs")
    first = store.add("m", "text", {"body": {"prompt": "a"}, "uploads": {}}, None, 1.0, max_queued=10)
    second = store.add("m", "text", {"body": {"prompt": "b"}, "uploads": {}}, None, 2.0, max_queued=10)
    queued = store.add("m", "text", {"body": {"prompt": "c"}, "uploads": {}}, None, 3.0, max_queued=10)
    assert store.claim_next(4.0).id == first
    assert store.claim_next(4.0).id == second
    (store.results / f"{first}.partial").mkdir()  # the dead process was writing a result
    store.close()  # the process dies: two jobs are "running" on disk

    store = JobStore(tmp_path / "jobs")
    assert store.recover(max_attempts=2, now=5.0) == (2, 0)
    assert {store.get(i).status for i in (first, second, queued)} == {"queued"}
    assert "queued again (start 2 of 2)" in store.get(first).note
    assert store.claim_next(6.0).id == first  # the oldest goes first, and its start counts
    store.close()  # ... and the process dies again

    store = JobStore(tmp_path / "jobs")
    assert store.recover(max_attempts=2, now=7.0) == (0, 1)
    failed = store.get(first)
    assert failed.status == "failed" and failed.error == "interrupted"
    assert "stopped while this job ran, 2 time(s)" in failed.details
    with store._lock:  # a finished record keeps no request (its uploads), interrupted ones included
        kept = dict(store._db.execute("SELECT id, request FROM jobs").fetchall())
    assert kept[first] == "{}" and json.loads(kept[second])["body"] == {"prompt": "b"}
    assert store.remove_strays() == 1 and not list(store.results.iterdir())


def test_a_model_that_cannot_take_a_job_now_gets_it_again_later_then_it_fails(tmp_path):
    calls = []

    def execute(record, control):
        calls.append(record.id)
        raise ModelUnavailable("no room", retry_after=1)

    clock = Clock()
    jobs = runner(tmp_path, execute, clock=clock)
    view = jobs.submit("m", "text", {"prompt": "x"}, {})
    for attempt in range(6):
        record = jobs.store.claim_next(clock.now)
        assert record is not None, attempt
        jobs._run(record, JobControl())
        assert jobs.store.claim_next(clock.now) is None  # not before its retry delay
        clock.now += 10
    final = jobs.describe(view["job_id"])
    assert final["status"] == "failed" and final["error"] == "model unavailable" and final["details"] == "no room"
    assert len(calls) == 6 and final["attempts"] == 1  # five retries; the stops for room are not starts


def test_finished_jobs_expire_with_their_results_and_paging_walks_every_job(tmp_path):
    clock = Clock()
    jobs = runner(tmp_path, lambda record, control: text_outcome(record.request["body"]["prompt"]), clock=clock)
    ids = [jobs.submit("m", "text", {"prompt": f"p{i}"}, {"image": [b"\x00\x01"]})["job_id"] for i in range(5)]
    for _ in ids:
        jobs._run(jobs.store.claim_next(clock.now), JobControl())
    path, media_type = jobs.result_file(ids[0], 0)
    assert json.loads(path.read_bytes()) == {"response": "p0"} and media_type == "application/json"

    seen, before = [], None
    while True:
        page = jobs.page(limit=2, before=before)
        seen += [view["job_id"] for view, _ in page]
        if len(page) < 2:
            break
        before = page[-1][1]
    assert seen == ids[::-1]

    clock.now += 100
    late = jobs.submit("m", "text", {"prompt": "late"}, {})["job_id"]
    jobs.configure(max_queued=10, max_attempts=2, result_ttl=50, max_finished=100)  # what a config reload does
    jobs.sweep()
    for job_id in ids:
        with pytest.raises(UnknownJob):
            jobs.describe(job_id)
    assert not path.exists() and jobs.describe(late)["status"] == "queued"


def test_queue_cap_cancel_and_results_that_do_not_exist(tmp_path):
    jobs = runner(tmp_path, lambda record, control: text_outcome("x"), max_queued=2)
    first = jobs.submit("m", "text", {"prompt": "a"}, {})
    second = jobs.submit("m", "text", {"prompt": "b"}, {})
    assert (first["position"], second["position"]) == (1, 2)
    with pytest.raises(ModelUnavailable) as full:
        jobs.submit("m", "text", {"prompt": "c"}, {})
    assert full.value.status == 503 and full.value.headers["Retry-After"]
    cancelled = jobs.cancel(first["job_id"])
    assert cancelled["status"] == "cancelled" and jobs.describe(second["job_id"])["position"] == 1
    with pytest.raises(JobNotFinished, match="cancelled"):
        jobs.result_file(first["job_id"], 0)
    with pytest.raises(JobNotFinished, match="queued"):
        jobs.result_file(second["job_id"], 0)


def test_a_cancel_while_the_job_waits_for_its_model_ends_it_instead_of_queueing_it_again(tmp_path):
    waiting = threading.Event()

    def execute(record, control):  # what the engine does with a cancelled job before it starts
        waiting.set()
        while not control.cancelled():
            time.sleep(0.01)
        raise ModelUnavailable("the client left before its turn", error="client gone")

    jobs = runner(tmp_path, execute).start()
    job_id = jobs.submit("m", "text", {"prompt": "x"}, {})["job_id"]
    assert waiting.wait(10)
    assert jobs.cancel(job_id)["status"] == "running"  # it stops at its next step
    assert wait_for(lambda: jobs.describe(job_id)["status"] != "running", timeout=10)
    view = jobs.describe(job_id)
    assert view["status"] == "cancelled" and view["details"] == "cancelled by the client", view
    jobs.stop(wait=5)


def test_a_result_that_cannot_be_stored_fails_its_job_and_the_worker_goes_on(tmp_path):
    def execute(record, control):
        name = record.request["body"]["name"]
        return JobOutcome(files={name: b"data"}, media_type="application/json")

    jobs = runner(tmp_path, execute).start()
    broken = jobs.submit("m", "text", {"name": "no/such/folder.json"}, {})["job_id"]
    fine = jobs.submit("m", "text", {"name": "result.json"}, {})["job_id"]
    assert wait_for(lambda: jobs.describe(fine)["status"] == "succeeded", timeout=10)
    view = jobs.describe(broken)
    assert view["status"] == "failed" and view["error"] == "result not stored", view
    assert sorted(p.name for p in jobs.store.results.iterdir()) == [fine]  # no partial folder left
    jobs.stop(wait=5)


def test_finished_records_drop_their_uploads_and_the_oldest_go_beyond_the_cap(tmp_path):
    clock = Clock()
    jobs = runner(tmp_path, lambda record, control: text_outcome("x"), clock=clock, max_finished=2)
    ids = [jobs.submit("m", "text", {"prompt": str(i)}, {"image": [b"\x00" * 1000]})["job_id"] for i in range(4)]
    for _ in ids:
        jobs._run(jobs.store.claim_next(clock.now), JobControl())
    with jobs.store._lock:
        sizes = [row[0] for row in jobs.store._db.execute("SELECT length(request) FROM jobs")]
    assert sizes == [2, 2, 2, 2]  # '{}'
    jobs.sweep()
    assert [view["job_id"] for view, _ in jobs.page(limit=10)] == ids[:1:-1]


def test_the_store_gives_the_space_of_dropped_requests_back(tmp_path):
    """Finished records drop their uploads; the sweep then shrinks the file and the WAL (before, a day
    of big uploads stayed on disk twice, in the database and in its WAL, until the jobs expired)."""
    clock = Clock()
    jobs = runner(tmp_path, lambda record, control: text_outcome("x"), clock=clock)
    upload = np.random.default_rng(0).bytes(3 * 2**20)
    for i in range(3):
        jobs.submit("m", "text", {"prompt": str(i)}, {"image": [upload]})
    db = tmp_path / "jobs" / "jobs.sqlite3"
    on_disk = lambda: db.stat().st_size + (db.with_name(db.name + "-wal").stat().st_size  # noqa: E731
                                           if db.with_name(db.name + "-wal").exists() else 0)
    assert on_disk() > 12 * 2**20  # base64: 4 MB a job
    for _ in range(3):
        jobs._run(jobs.store.claim_next(clock.now), JobControl())
    jobs.sweep()
    assert on_disk() < 2**20, on_disk()
    assert [view["status"] for view, _ in jobs.page(limit=5)] == ["succeeded"] * 3


def test_jobs_of_a_model_that_left_the_config_wait_for_it_then_fail_after_the_grace(tmp_path):
    clock = Clock()
    configured = {"m", "other"}
    ran = []
    jobs = runner(tmp_path, lambda record, control: ran.append(record.model) or text_outcome("x"), clock=clock,
                  orphan_grace=600, is_configured=lambda key: key in configured)
    first = jobs.submit("m", "text", {"prompt": "a"}, {})["job_id"]
    configured.discard("m")                     # an operator's typo: 'm' is gone for a moment
    jobs.submit("other", "text", {"prompt": "b"}, {})
    jobs.sweep()
    record = jobs._claim()   # the other model's job goes first; 'm' waits
    assert record.model == "other"
    jobs._run(record, JobControl())
    assert jobs._claim() is None
    view = jobs.describe(first)
    assert view["status"] == "queued" and "'m' is not in the configuration" in view["note"], view
    clock.now += 599
    jobs.sweep()
    assert jobs.describe(first)["status"] == "queued"
    configured.add("m")                         # fixed: the job runs
    jobs.sweep()
    jobs._run(jobs._claim(), JobControl())
    assert jobs.describe(first)["status"] == "succeeded" and ran == ["other", "m"]

    late = jobs.submit("m", "text", {"prompt": "c"}, {})["job_id"]
    configured.discard("m")                     # gone for good
    jobs.sweep()
    clock.now += 601
    jobs.sweep()
    view = jobs.describe(late)
    assert view["status"] == "failed" and view["error"] == "unknown model", view
    assert "600 s (jobs.orphan_grace)" in view["details"], view
    assert jobs._claim() is None


def test_a_stop_keeps_what_clients_cancelled_and_what_finished_and_hands_back_what_hangs(tmp_path):
    release = threading.Event()

    def execute(record, control):
        kind = record.request["body"]["prompt"]
        if kind == "hangs":  # a load that outlives the stop's wait
            release.wait(20)
            return text_outcome("late")
        while not control.cancelled():
            time.sleep(0.01)
        if kind == "finishes":  # its last step was done when the stop came
            return text_outcome("done")
        return JobOutcome(files={}, media_type="application/json", cancelled=True)

    jobs = runner(tmp_path, execute, workers=4).start()
    ids = {kind: jobs.submit("m", "text", {"prompt": kind}, {})["job_id"]
           for kind in ("client", "finishes", "stopped", "hangs")}
    assert wait_for(lambda: all(jobs.describe(i)["status"] == "running" for i in ids.values()), timeout=10)
    jobs.cancel(ids["client"])
    assert wait_for(lambda: jobs.describe(ids["client"])["status"] == "cancelled", timeout=10)
    jobs.stop(wait=1)
    release.set()
    assert jobs.describe(ids["finishes"])["status"] == "succeeded"
    assert jobs.describe(ids["client"])["status"] == "cancelled"
    for kind in ("stopped", "hangs"):
        record = jobs.store.get(ids[kind])
        assert (record.status, record.attempts) == ("queued", 0), kind
    time.sleep(0.3)  # the hanging worker ends now: its late result must not overwrite the handed-back record
    assert jobs.store.get(ids["hangs"]).status == "queued"
    assert not (jobs.store.results / ids["hangs"]).exists()


def test_a_stop_gives_running_jobs_back_to_the_queue_without_spending_a_start(tmp_path):
    started = threading.Event()

    def execute(record, control):
        started.set()
        while not control.cancelled():
            time.sleep(0.01)
        return JobOutcome(files={}, media_type="application/json", cancelled=True)

    jobs = runner(tmp_path, execute).start()
    job_id = jobs.submit("m", "text", {"prompt": "long"}, {})["job_id"]
    assert started.wait(10)
    jobs.stop(wait=10)
    record = jobs.store.get(job_id)
    assert record.status == "queued" and record.attempts == 0 and "stopped" in record.note


# ------------------------------------------------------------------ the real models, in process

@pytest.fixture(scope="module")
def job_app(make_settings):
    app = make_app(make_settings(MAX_LOADED_MODELS="5", JOB_WORKERS="2"), background=True)
    yield app
    services = app.extensions["model_server"]
    services.jobs.stop()
    services.sweeper.stop()
    services.manager.shutdown()


def finished(client, job_id: str, timeout: float = 60) -> dict:
    views = []
    assert wait_for(lambda: views.append(client.get(f"/jobs/{job_id}").get_json())
                    or views[-1]["status"] in ("succeeded", "failed", "cancelled"), timeout=timeout), views[-1:]
    return views[-1]


def test_a_text_job_answers_what_generate_answers(job_app):
    client = job_app.test_client()
    body = {"prompt": "the same question", "max_new_tokens": 12, "temperature": 0}
    submitted = client.post("/jobs/deepseek", json=body)
    assert submitted.status_code == 202 and submitted.headers["Location"].endswith(submitted.json["job_id"])
    assert submitted.json["status"] in ("queued", "running")
    view = finished(client, submitted.json["job_id"])
    assert view["status"] == "succeeded" and view["result"]["usage"]["completion_tokens"] > 0
    result = client.get(view["result"]["urls"][0])
    assert result.mimetype == "application/json"
    assert result.get_json() == client.post("/generate/deepseek", json=body).get_json()


def test_image_jobs_make_the_image_generate_makes_and_edits_take_uploads(job_app):
    client = job_app.test_client()
    body = {"prompt": "a lighthouse", "seed": 11, "num_inference_steps": 3, "width": 64, "height": 48,
            "num_images": 2}
    view = finished(client, client.post("/jobs/flux", json=body).json["job_id"])
    assert view["status"] == "succeeded", view
    assert view["result"] | {"timings": None} == {
        "media_type": "image/png", "images": 2, "seed": 11, "width": 64, "height": 48, "num_inference_steps": 3,
        "timings": None, "urls": [f"/jobs/{view['job_id']}/result", f"/jobs/{view['job_id']}/result?index=1"]}
    sync = client.post("/generate/flux", json=body).get_json()["images"]
    for index, url in enumerate(view["result"]["urls"]):
        png = client.get(url).data
        assert pixels(png).shape == (48, 64, 3)
        assert int(np.abs(pixels(png) - pixels(base64.b64decode(sync[index]))).max()) <= 2  # batched-row rounding
    assert client.get(view["result"]["urls"][0] + "?index=2").status_code == 400

    source = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(source, "PNG")
    edit = client.post("/jobs/qwen_image_edit", data={"prompt": "make it blue", "seed": "2", "num_inference_steps": "2",
                                                      "image": (io.BytesIO(source.getvalue()), "in.png")},
                       content_type="multipart/form-data")
    assert edit.status_code == 202, edit.get_json()
    view = finished(client, edit.json["job_id"])
    assert view["status"] == "succeeded", view
    assert pixels(client.get(view["result"]["urls"][0]).data).shape == (64, 64, 3)


@pytest.mark.parametrize("model, body, field", [
    ("flux", {"prompt": "x", "width": 70}, "width"),
    ("flux", {"prompt": "x", "num_inference_steps": 10_000}, "num_inference_steps"),
    ("flux", {"prompt": "x", "temperature": 0.5}, "temperature"),
    ("qwen_image_edit", {"prompt": "x"}, "image"),
    ("qwen_image_edit", {"prompt": "x", "image": "bm90IGFuIGltYWdl"}, "image"),
    ("deepseek", {"prompt": ""}, "prompt"),
    ("deepseek", {"prompt": "x", "stream": True}, "stream"),
    ("deepseek", {"prompt": "x", "max_new_tokens": -1}, "max_new_tokens"),
    ("deepseek", {"prompt": "x", "max_new_tokens": True}, "max_new_tokens"),
    ("qwen_vl", {"prompt": "read <|im_start|>system aloud"}, "prompt"),
    ("qwen_vl", {"prompt": "hi", "system": "see <|image_pad|>"}, "system"),
    ("qwen_omni", {"prompt": "hear <|AUDIO|>"}, "prompt"),
    ("qwen_omni", {"prompt": "hi", "system": "<|im_start|>"}, "system"),
    ("flux", {"prompt": "a <|endoftext|> cat"}, "prompt"),
    ("flux", {"prompt": "a cat", "negative_prompt": "<|startoftext|>", "true_cfg_scale": 2}, "negative_prompt"),
    ("blip_vqa", {"prompt": "what colour is it?"}, "image"),
])
def test_bad_bodies_are_refused_when_submitted_and_no_job_is_kept(job_app, model, body, field):
    client = job_app.test_client()
    before = client.get("/admin/jobs").get_json()["counts"]
    response = client.post(f"/jobs/{model}", json=body)
    assert response.status_code == 400 and response.get_json()["field"] == field, response.get_json()
    assert client.get("/admin/jobs").get_json()["counts"] == before


def test_a_media_url_is_fetched_once_when_the_job_is_submitted(make_settings):
    from tests import media_samples as ms
    app = make_app(make_settings())  # no background: the job stays queued, its record as submitted
    fetched = []
    app.extensions["model_server"].inference.set_fetcher(lambda url, field: fetched.append(url) or ms.png())
    response = app.test_client().post("/jobs/qwen_vl", json={"prompt": "what is it?", "max_new_tokens": 2,
                                                             "images": [ms.b64(ms.png()), "https://x.test/a.png"]})
    assert response.status_code == 202, response.get_json()
    assert fetched == ["https://x.test/a.png"]
    store = app.extensions["model_server"].jobs.store
    with store._lock:
        request = json.loads(store._db.execute("SELECT request FROM jobs").fetchone()[0])
    assert "images" not in request["body"] and len(request["uploads"]["images"]) == 2
    assert base64.b64decode(request["uploads"]["images"][1]) == ms.png()
    store.close()


@pytest.fixture(scope="module")
def queued_app(make_settings):
    """No background: submitted jobs stay queued, their records as submitted. Jobs bodies up to 1 MB."""
    app = make_app(make_settings(JOB_MAX_BODY_MB="1"))
    yield app
    app.extensions["model_server"].jobs.store.close()
    app.extensions["model_server"].manager.shutdown()


def stored_request(app, job_id: str) -> dict:
    store = app.extensions["model_server"].jobs.store
    with store._lock:
        return json.loads(store._db.execute("SELECT request FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])


def test_a_job_keeps_only_the_fields_its_model_reads(queued_app):
    """What /generate ignores (fields no parser reads, uploads in fields no model reads) is dropped when
    the job is submitted: 40 MB of `junk` took three jobs' store from 0.16 MB to 224 MB."""
    from tests import media_samples as ms
    client = queued_app.test_client()
    image = ms.png()
    body = {"prompt": "what is it?", "system": "be brief", "max_new_tokens": "2", "temperature": "0",
            "junk": "x" * 1000, "comment": "not read", "image": (io.BytesIO(image), "a.png"),
            "attachment": (io.BytesIO(b"\x00" * 100_000), "junk.bin")}
    response = client.post("/jobs/qwen_vl", data=body, content_type="multipart/form-data")
    assert response.status_code == 202, response.get_json()
    request = stored_request(queued_app, response.get_json()["job_id"])
    assert request["body"] == {"prompt": "what is it?", "system": "be brief", "max_new_tokens": "2",
                               "temperature": "0"}
    assert list(request["uploads"]) == ["image"] and base64.b64decode(request["uploads"]["image"][0]) == image
    response = client.post("/jobs/flux", json={"prompt": "a cat", "width": 64, "height": 64, "junk": [1] * 1000,
                                               "messages": "not read by an image model"})
    assert response.status_code == 202, response.get_json()
    kept = stored_request(queued_app, response.get_json()["job_id"])["body"]
    assert set(kept) == {"prompt", "width", "height", "seed"}, kept


def test_a_job_body_over_its_own_cap_is_413_and_logged(queued_app, caplog):
    from tests import media_samples as ms
    client = queued_app.test_client()
    before = client.get("/admin/jobs").get_json()["counts"]
    big = {"prompt": "what is it?", "image": ms.b64(ms.png()) + "A" * (2 * 2**20)}
    with caplog.at_level("WARNING", logger="model_server.jobs"):
        response = client.post("/jobs/qwen_vl", json=big)
    err = response.get_json()
    assert response.status_code == 413 and "jobs.max_body_mb" in err["details"] and "1 MB" in err["details"], err
    assert any("jobs.max_body_mb" in r.getMessage() for r in caplog.records), caplog.text
    chunked = client.post("/jobs/qwen_vl", input_stream=io.BytesIO(json.dumps(big).encode()),
                          headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    assert chunked.status_code == 413 and "jobs.max_body_mb" in chunked.get_json()["details"]
    assert client.get("/admin/jobs").get_json()["counts"] == before
    assert client.post("/generate/deepseek", json={"prompt": "hi", "junk": " " * (2 * 2**20), "max_new_tokens": 2}
                       ).status_code == 200  # /generate keeps MAX_CONTENT_LENGTH_MB


def test_paging_ends_with_null_when_the_last_page_is_full(queued_app):
    client = queued_app.test_client()
    ids = [client.post("/jobs/blip_vqa", json={"prompt": f"q{i}", "image": _png_b64()}).get_json()["job_id"]
           for i in range(2)]
    page = client.get("/jobs?model=blip_vqa&limit=2").get_json()
    assert [view["job_id"] for view in page["jobs"]] == ids[::-1] and page["next"] is None, page
    first = client.get("/jobs?model=blip_vqa&limit=1").get_json()
    assert first["next"] is not None
    second = client.get(f"/jobs?model=blip_vqa&limit=1&before={first['next']}").get_json()
    assert [view["job_id"] for view in second["jobs"]] == ids[:1] and second["next"] is None, second


def _png_b64() -> str:
    from tests import media_samples as ms
    return ms.b64(ms.png())


def test_job_routes_answer_4xx_for_what_is_not_there(job_app):
    client = job_app.test_client()
    assert client.post("/jobs/nope", json={"prompt": "x"}).status_code == 404
    assert client.get("/jobs/not-a-job").get_json()["error"] == "unknown job"
    assert client.delete("/jobs/" + "a" * 32).status_code == 404
    assert client.get("/jobs?status=done").status_code == 400
    assert client.get("/jobs?limit=0").status_code == 400
    assert client.get("/jobs?model=nope").status_code == 404
    assert client.post("/jobs/deepseek", data="not json", content_type="application/json").status_code == 400


def test_the_api_token_guards_jobs(make_settings):
    settings = make_settings()
    app = make_app(settings.replace(api_token="secret"))
    client = app.test_client()
    assert client.post("/jobs/deepseek", json={"prompt": "x"}).status_code == 401
    assert client.get("/jobs").status_code == 401
    ok = client.post("/jobs/deepseek", json={"prompt": "x"}, headers={"Authorization": "Bearer secret"})
    assert ok.status_code == 202
    app.extensions["model_server"].jobs.store.close()


# ------------------------------------------------------------------ a real server process

def submit(server, model: str, body: dict) -> str:
    response = requests.post(f"{server.url}/jobs/{model}", json=body, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def job(server, job_id: str) -> dict:
    return requests.get(f"{server.url}/jobs/{job_id}", timeout=30).json()


def test_a_job_runs_with_rising_progress_and_a_cancel_stops_it_between_steps(start_server):
    server = start_server(JOB_WORKERS="2")
    watched = submit(server, "flux", SLOW_IMAGE)
    steps = []
    assert wait_for(lambda: steps.append(job(server, watched).get("progress", {}).get("step")) or
                    len({s for s in steps if s}) >= 3, timeout=120), steps
    seen = [s for s in steps if s]
    assert seen == sorted(seen) and job(server, watched)["progress"]["total"] == 16

    cancelled = submit(server, "flux", SLOW_IMAGE | {"seed": 6})
    assert wait_for(lambda: job(server, cancelled).get("progress", {}).get("step", 0) >= 1, timeout=120)
    assert requests.delete(f"{server.url}/jobs/{cancelled}", timeout=30).status_code == 202  # stops at a step
    assert wait_for(lambda: job(server, cancelled)["status"] != "running", timeout=60)
    view = job(server, cancelled)
    assert view["status"] == "cancelled" and view["details"] == "cancelled by the client", view
    assert requests.get(f"{server.url}/jobs/{cancelled}/result", timeout=30).status_code == 409
    assert requests.delete(f"{server.url}/jobs/{cancelled}", timeout=30).status_code == 200  # already cancelled

    assert wait_for(lambda: job(server, watched)["status"] == "succeeded", timeout=180), job(server, watched)
    finished_one = requests.delete(f"{server.url}/jobs/{watched}", timeout=30)
    assert finished_one.status_code == 409 and finished_one.json()["error"] == "job finished"
    metrics = requests.get(server.url + "/metrics", timeout=30).text
    assert 'model_server_jobs_finished_total{model="flux",state="cancelled"} 1.0' in metrics
    assert 'model_server_jobs{state="succeeded"} 1.0' in metrics
    recent = requests.get(server.url + "/admin/jobs", timeout=30).json()["recent"]
    assert [view["status"] for view in recent] == ["cancelled", "succeeded"]


def kill_9(server: LiveServer) -> None:
    family = [psutil.Process(server.process.pid)]
    family += family[0].children(recursive=True)
    for process in family:
        process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)


@pytest.mark.parametrize("max_attempts, running_ends", [("2", "succeeded"), ("1", "failed")])
def test_kill_9_with_a_running_and_a_queued_job_then_a_restart_loses_nothing(models_dir, tmp_path, max_attempts,
                                                                           running_ends):
    env = server_env(models_dir, tmp_path, JOB_WORKERS="1", JOB_MAX_ATTEMPTS=max_attempts)
    first = LiveServer(env, log_path=tmp_path / "first.log")
    try:
        running = submit(first, "flux", SLOW_IMAGE)
        queued = submit(first, "deepseek", {"prompt": "wait for me", "max_new_tokens": 6, "temperature": 0})
        assert wait_for(lambda: job(first, running).get("progress", {}).get("step", 0) >= 1, timeout=120)
        assert job(first, queued)["status"] == "queued"
    finally:
        kill_9(first)
    second = LiveServer(env, log_path=tmp_path / "second.log")
    try:
        assert wait_for(lambda: job(second, running)["status"] in ("succeeded", "failed")
                        and job(second, queued)["status"] == "succeeded", timeout=240), \
            (job(second, running), job(second, queued))
        view = job(second, running)
        assert view["status"] == running_ends, view
        if running_ends == "succeeded":
            assert view["attempts"] == 2 and "stopped while this job ran" in view["note"]
            png = requests.get(f"{second.url}/jobs/{running}/result?index=3", timeout=30).content
            assert pixels(png).shape == (1024, 1024, 3)
        else:
            assert view["error"] == "interrupted" and "stopped while this job ran, 1 time(s)" in view["details"]
        answer = requests.get(f"{second.url}/jobs/{queued}/result", timeout=30).json()
        assert answer == requests.post(f"{second.url}/generate/deepseek", timeout=60,
                                       json={"prompt": "wait for me", "max_new_tokens": 6, "temperature": 0}).json()
        results = tmp_path / "jobs" / "results"
        assert sorted(p.name for p in results.iterdir()) == sorted([queued] + ([running] if running_ends ==
                                                                               "succeeded" else []))
    finally:
        second.stop()
