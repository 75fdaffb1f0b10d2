"""Janus-Pro (family janus, the tiny demo checkpoint): it understands images through chat and draws
them through /generate (generation_mode image), /v1/images/generations and jobs, with seed 002's
parameters (CFG weight, seed, number of images). The real JanusForConditionalGeneration runs every
time; its random weights draw noise, so the tests check PNGs, sizes, seeds and batched-versus-solo
equality, never content."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests import media_samples as ms
from tests.conftest import make_app, wait_for
from utils.engine import Engine
from utils.families import GenerationParams, GenerationRequest, load_family
from utils.families.diffusion import ImageParams

SIZE = (64, 64)  # the demo checkpoint's 4x4 codes, decoded 16x up


@pytest.fixture(scope="module")
def app(make_settings):
    application = make_app(make_settings(MAX_LOADED_MODELS="3", JOB_WORKERS="1"), background=True)
    yield application
    services = application.extensions["model_server"]
    services.jobs.stop()
    services.sweeper.stop()
    services.manager.shutdown()


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def draw(client, **body):
    return client.post("/generate/janus", json={"prompt": "a red cat on a chair", "generation_mode": "image", **body})


def photo(seed: int, w: int = 40, h: int = 30) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------ understanding

def test_it_answers_about_one_or_several_images(client):
    one = client.post("/generate/janus", json={"prompt": "what is in the picture?", "image": ms.b64(photo(1)),
                                               "max_new_tokens": 6, "temperature": 0})
    assert one.status_code == 200, one.get_json()
    assert one.get_json()["response"] and one.get_json()["usage"]["completion_tokens"] == 6
    two = client.post("/generate/janus", json={"prompt": "what differs?", "max_new_tokens": 6, "temperature": 0,
                                               "images": [ms.b64(photo(1)), ms.b64(photo(2))]}).get_json()
    assert two["usage"]["prompt_tokens"] > one.get_json()["usage"]["prompt_tokens"] + 10  # 16 more image tokens
    chat = client.post("/v1/chat/completions", json={"model": "janus", "max_tokens": 6, "temperature": 0, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": ms.data_url(photo(1), "image/png")}},
                                     {"type": "text", "text": "what is in the picture?"}]}]})
    assert chat.status_code == 200 and chat.get_json()["choices"][0]["message"]["content"] == one.get_json()["response"]
    text_only = client.post("/v1/chat/completions", json={"model": "janus", "max_tokens": 4,
                                                          "messages": [{"role": "user", "content": "hello"}]})
    assert text_only.status_code == 200 and text_only.get_json()["choices"][0]["message"]["content"]


def test_it_refuses_media_it_does_not_take(client):
    for field, payload in (("video", ms.b64(ms.video())), ("audio", ms.b64(ms.wav(0.5)))):
        response = client.post("/generate/janus", json={"prompt": "what is it?", field: payload})
        assert response.status_code == 400 and response.get_json()["field"] == field
        assert field in response.get_json()["details"]


# ------------------------------------------------------------------ drawing

def test_generate_draws_n_pngs_and_the_same_seed_draws_the_same_images(client):
    first = draw(client, seed=5, num_images=2)
    assert first.status_code == 200, first.get_json()
    body = first.get_json()
    assert (body["seed"], body["width"], body["height"], body["num_inference_steps"]) == (5, 64, 64, 16)
    images = [base64.b64decode(b) for b in body["images"]]
    assert len(images) == 2 and all(png(i).size == SIZE and png(i).mode == "RGB" for i in images)
    assert images[0] != images[1]  # image i uses seed + i
    again = [base64.b64decode(b) for b in draw(client, seed=5, num_images=2).get_json()["images"]]
    assert again == images
    assert base64.b64decode(draw(client, seed=6).get_json()["images"][0]) == images[1]
    weighted = draw(client, seed=5, cfg_weight=1.5).get_json()["images"][0]
    assert base64.b64decode(weighted) != images[0]  # the CFG weight steers the codes
    assert draw(client, seed=5, guidance_scale=1.5).get_json()["images"][0] == weighted  # the same weight, two names
    unseeded = draw(client).get_json()
    assert isinstance(unseeded["seed"], int) and len(unseeded["images"]) == 1


def test_openai_images_generations(client):
    response = client.post("/v1/images/generations", json={"model": "janus", "prompt": "a red cat on a chair", "n": 2,
                                                           "size": "64x64", "seed": 5})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["size"] == "64x64" and body["seed"] == 5 and body["output_format"] == "png"
    images = [base64.b64decode(d["b64_json"]) for d in body["data"]]
    assert images == [base64.b64decode(b) for b in draw(client, seed=5, num_images=2).get_json()["images"]]
    for body, param in (({"size": "32x32"}, "size"), ({"response_format": "url"}, "response_format"),
                        ({"n": 9}, "n"), ({"num_inference_steps": 4}, "num_inference_steps")):
        refused = client.post("/v1/images/generations", json={"model": "janus", "prompt": "x", **body})
        assert refused.status_code == 400 and refused.get_json()["error"]["param"] == param, (body, refused.get_json())
    edit = client.post("/v1/images/edits", content_type="multipart/form-data",
                       data={"model": "janus", "prompt": "x", "image": (io.BytesIO(photo(1)), "a.png")})
    assert edit.status_code == 400 and edit.get_json()["error"]["param"] == "model"


def test_the_official_openai_client_draws(app, client):
    import httpx2
    import openai

    api = openai.OpenAI(base_url="http://server/v1", api_key="x",
                        http_client=httpx2.Client(transport=httpx2.WSGITransport(app=app)))
    drawn = api.images.generate(model="janus", prompt="a red cat on a chair", n=2, extra_body={"seed": 5})
    assert [base64.b64decode(d.b64_json) for d in drawn.data] == \
        [base64.b64decode(b) for b in draw(client, seed=5, num_images=2).get_json()["images"]]


def test_a_drawing_job_makes_the_images_generate_makes(client):
    submitted = client.post("/jobs/janus", json={"prompt": "a red cat on a chair", "generation_mode": "image",
                                                 "seed": 5, "num_images": 2})
    assert submitted.status_code == 202, submitted.get_json()
    job_id = submitted.get_json()["job_id"]
    views = []
    assert wait_for(lambda: views.append(client.get(f"/jobs/{job_id}").get_json())
                    or views[-1]["status"] in ("succeeded", "failed", "cancelled"), timeout=60)
    assert views[-1]["status"] == "succeeded", views[-1]
    result = views[-1]["result"]
    assert result["images"] == 2 and (result["width"], result["height"], result["seed"]) == (64, 64, 5)
    pngs = [client.get(url).data for url in result["urls"]]
    assert pngs == [base64.b64decode(b) for b in draw(client, seed=5, num_images=2).get_json()["images"]]
    text_job = client.post("/jobs/janus", json={"prompt": "what is it?", "image": ms.b64(photo(1)),
                                                "max_new_tokens": 3})
    assert text_job.status_code == 202


@pytest.mark.parametrize("body,field", [
    ({"generation_mode": "video"}, "generation_mode"),
    ({"num_inference_steps": 8}, "num_inference_steps"),
    ({"negative_prompt": "dogs"}, "negative_prompt"),
    ({"temperature": 0.5}, "temperature"),
    ({"width": 128}, "width"),
    ({"num_images": 5}, "num_images"),
    ({"cfg_weight": -1}, "cfg_weight"),
    ({"cfg_weight": 2, "guidance_scale": 3}, "cfg_weight"),
    ({"image": ms.b64(ms.png())}, "image"),
    ({"prompt": "draw <begin_of_image> now"}, "prompt"),
    ({"stream": True}, "stream"),
])
def test_bad_drawing_requests_are_400s_naming_the_field(client, body, field):
    response = draw(client, **body)
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["field"] == field


def test_models_that_do_not_draw_refuse_generation_mode_image(client):
    response = client.post("/generate/deepseek", json={"prompt": "x", "generation_mode": "image"})
    assert response.status_code == 400 and response.get_json()["field"] == "generation_mode"
    flux = client.post("/generate/flux", json={"prompt": "x", "generation_mode": "text"})
    assert flux.status_code == 400 and flux.get_json()["field"] == "generation_mode"


# ------------------------------------------------------------------ the engine: batching and cancellation

@pytest.fixture(scope="module")
def janus(make_settings):
    adapter = load_family(make_settings().models["janus"], "cpu")
    yield adapter
    adapter.release()


PROMPTS = ["a red cat", "two blue dogs running on the beach at night", "a tree",
           "green mountain under the sun and moon"]


def test_concurrent_requests_of_both_kinds_equal_their_solo_answers(janus):
    greedy = GenerationParams(max_new_tokens=5, temperature=1.0, top_p=1.0, do_sample=False)
    images = [Image.open(io.BytesIO(photo(i, 20 + 9 * i, 30))) for i in range(len(PROMPTS))]
    asks = [janus.prepare(GenerationRequest(prompt=p, images=[images[i]] * (1 + i % 2))) for i, p in enumerate(PROMPTS)]
    draws = [(janus.prepare_images(GenerationRequest(prompt=p)),
              ImageParams(num_inference_steps=16, guidance_scale=5.0, true_cfg_scale=1.0, width=64, height=64,
                          num_images=1 + i % 2, seed=100 + i)) for i, p in enumerate(PROMPTS)]
    solo_text = [janus.generate(p, greedy) for p in asks]
    solo_images = [janus.generate(p, q).images for p, q in draws]
    assert len({r.text for r in solo_text}) > 2 and len({i[0] for i in solo_images}) == 4
    engine = Engine(janus, key="janus", max_batch_size=16, max_queue=64, queue_timeout=60.0)
    text_jobs = [engine.submit(p, greedy) for p in asks]
    image_jobs = [engine.submit(p, q) for p, q in draws]
    engine.start()  # everything was queued first: one batch of each kind
    try:
        texts = [engine.run(job) for job in text_jobs]
        images = [engine.run(job).images for job in image_jobs]
    finally:
        engine.stop()
    assert [r.text for r in texts] == [r.text for r in solo_text]
    assert images == solo_images
    assert engine.stats()["batches"] == 2 and engine.stats()["peak_batch"] == 4


class LeavingRow:
    streaming, expired = False, False

    def __init__(self, prepared, params, checks: int) -> None:
        self.prepared, self.params, self.result, self._checks = prepared, params, None, checks
        self.steps = []

    @property
    def cancelled(self) -> bool:
        self._checks -= 1
        return self._checks < 0

    def progress(self, step: int, total: int) -> None:
        self.steps.append((step, total))

    def finish(self, result) -> None:
        self.result = result


def test_a_drawing_whose_client_leaves_stops_between_steps(janus):
    params = ImageParams(num_inference_steps=16, guidance_scale=5.0, true_cfg_scale=1.0, width=64, height=64,
                         num_images=1, seed=3)
    leaving = LeavingRow(janus.prepare_images(GenerationRequest(prompt="a red cat")), params, 4)
    staying = LeavingRow(janus.prepare_images(GenerationRequest(prompt="a tree")), params, 10**6)
    janus.generate_batch([leaving, staying])
    assert leaving.result.finish_reason == "cancelled" and not leaving.result.images
    assert leaving.steps == [(s, 16) for s in range(1, 5)] and staying.steps[-1] == (16, 16)
    assert staying.result.images == janus.generate(staying.prepared, params).images
    alone = LeavingRow(janus.prepare_images(GenerationRequest(prompt="a tree")), params, 2)
    janus.generate_batch([alone])
    assert alone.result.finish_reason == "cancelled" and len(alone.steps) == 2
