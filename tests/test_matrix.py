"""The architecture matrix (utils/demo_matrix.py) served as `--demo all` serves it: for every architecture
a greedy answer through /v1/chat/completions with each medium it takes, a batch of different requests
whose answers equal their solo answers in its engine, and the 400 naming a medium it does not take.
Family, media and limits come from each checkpoint folder (utils/hub/model_folder.py), never from
the key. The checkpoints are built once per session, beside the default demo set."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import media_samples
from tests.matrix_table import DOCS, docs_table, engine_kind
from utils.config.settings import load_settings
from utils.engine import Engine
from utils.engine.continuous import ContinuousEngine
from utils.families import GenerationParams, GenerationRequest, family_class, load_family
from utils.hub.demo_matrix import MATRIX, MATRIX_KEYS
from utils.hub.model_folder import read_capabilities
from utils.media.decode import MediaLimits, load_video



@pytest.fixture(scope="module")
def matrix_app(make_settings):
    from app import create_app
    application = create_app(make_settings(DEMO_MODE="all", MAX_LOADED_MODELS="40"), background=False)
    yield application
    application.extensions["model_server"].manager.shutdown()


@pytest.fixture(scope="module")
def matrix_client(matrix_app):
    return matrix_app.test_client()


@pytest.fixture(scope="module")
def demo_root(matrix_app) -> Path:
    return matrix_app.extensions["model_server"].settings.models_dir / "demo"


def _png(seed: int, w: int, h: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


VIDEO = media_samples.video("mp4", frames=4, fps=4, w=32, h=32)
VIDEO_URL = media_samples.data_url(VIDEO, "video/mp4")
AUDIO_B64 = media_samples.b64(media_samples.wav(seconds=0.5, rate=16000, channels=1))
PARTS = {"image": lambda: {"type": "image_url", "image_url": {"url": _png(5, 40, 32)}},
         "video": lambda: {"type": "video_url", "video_url": {"url": VIDEO_URL}},
         "audio": lambda: {"type": "input_audio", "input_audio": {"data": AUDIO_B64, "format": "wav"}}}


# What each real checkpoint takes (its processor and model), written down here independently of the
# server's reading of the folders: LLaVA, Gemma 3, Idefics3 and PaliGemma have no video processor.
EXPECTED_MEDIA = {key: [] for key in ("llama", "mistral", "gemma2", "phi3", "granite")}
EXPECTED_MEDIA.update({key: ["image", "video"] for key in ("qwen2_vl", "llava_onevision", "smolvlm", "internvl")})
EXPECTED_MEDIA.update({key: ["image"] for key in ("llava", "gemma3", "idefics3", "paligemma")})


def chat(client, key: str, content: list, **extra):
    body = {"model": key, "messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0}
    return client.post("/v1/chat/completions", json={**body, **extra})


def test_family_architecture_and_media_are_read_from_each_folder(matrix_client, demo_root):
    cards = {card["id"]: card for card in matrix_client.get("/v1/models").get_json()["data"]}
    status = matrix_client.get("/admin/model_status").get_json()["models"]
    for key, entry in MATRIX.items():
        found = read_capabilities(demo_root / key)
        assert (found.architecture, found.family) == (entry.architecture, entry.family), key
        assert cards[key]["architecture"] == entry.architecture and cards[key]["family"] == entry.family
        assert status[key]["architecture"] == entry.architecture
        assert status[key]["capabilities"] == cards[key]["capabilities"]
    # what differs by checkpoint, not by family: video only where the processor takes it, Gemma 2's
    # template takes no system turn, the tool-call format from template and tokens
    assert [k for k in MATRIX if cards[k]["capabilities"]["video"]] == ["qwen2_vl", "llava_onevision", "smolvlm",
                                                                       "internvl"]
    templated = [k for k in MATRIX if cards[k]["capabilities"]["chat_template"]]
    assert [k for k in MATRIX if k not in templated] == ["paligemma"]
    assert [k for k in templated if not cards[k]["capabilities"]["system_role"]] == ["gemma2"]
    assert cards["mistral"]["capabilities"]["tool_format"] == "mistral"
    assert cards["granite"]["capabilities"]["tool_call_tokens"] == ["<tool_call>"]


def test_a_models_yaml_entry_with_only_a_path_gets_its_family_from_the_checkpoint(demo_root, tmp_path):
    config = tmp_path / "models.yaml"
    config.write_text(f"models:\n  mine:\n    path: {demo_root / 'llava'}\n  text:\n    path: {demo_root / 'phi3'}\n"
                      f"  set:\n    path: {demo_root / 'phi3'}\n    family: vision_language\n")
    settings = load_settings(config, env={})
    assert settings.models["mine"].family == "vision_language"
    assert settings.models["text"].family == "text"
    assert settings.models["set"].family == "vision_language"  # still settable
    config.write_text(f"models:\n  gone:\n    path: {tmp_path / 'nothing'}\n")
    with pytest.raises(Exception, match="family"):
        load_settings(config, env={})


def test_the_docs_table_is_current(demo_root):
    assert DOCS.read_text() == docs_table(demo_root), "docs/models.md is stale: python -m tests.matrix_table"


@pytest.mark.parametrize("key", MATRIX_KEYS)
def test_answers_with_each_medium_it_takes_and_refuses_the_others(matrix_client, key):
    caps = matrix_client.get(f"/v1/models/{key}").get_json()["capabilities"]
    taken = [kind for kind in ("image", "video", "audio") if caps[{"image": "images"}.get(kind, kind)]]
    assert taken == EXPECTED_MEDIA[key], caps
    text = {"type": "text", "text": "what is there"}
    needs_image = family_class(MATRIX[key].family).min_images > 0  # VQA: a question about an image
    asks = [] if needs_image else [[text]]
    if "image" in taken:  # several images in one request
        asks.append([PARTS["image"](), {"type": "image_url", "image_url": {"url": _png(6, 24, 24)}}, text])
    if "video" in taken:
        asks.append([PARTS["video"](), text])
    for content in asks:
        response = chat(matrix_client, key, content)
        assert response.status_code == 200, (content[0].get("type"), response.get_json())
        answer = response.get_json()["choices"][0]["message"]["content"]
        assert answer and response.get_json()["usage"]["completion_tokens"] == 6
        again = chat(matrix_client, key, content).get_json()["choices"][0]["message"]["content"]
        assert again == answer, "greedy decoding answers the same twice"
    body = {"prompt": "hello there", "max_new_tokens": 4}
    generated = matrix_client.post(f"/generate/{key}", json=body)
    if needs_image:
        assert generated.status_code == 400 and generated.get_json()["field"] == "image"
        generated = matrix_client.post(f"/generate/{key}", json={**body, "image": _png(7, 30, 20)})
    assert generated.status_code == 200 and generated.get_json()["response"]
    for kind in sorted({"image", "video", "audio"} - set(taken)):
        refused = chat(matrix_client, key, [PARTS[kind](), text])
        assert refused.status_code == 400, refused.get_json()
        error = refused.get_json()["error"]
        assert error["code"] == "unsupported_input" and f"does not take {kind}" in error["message"], error
        assert error["param"].startswith("messages[0].content[0]")


def test_a_system_turn_to_a_template_without_one_is_refused_before_the_lease(matrix_app, matrix_client):
    manager = matrix_app.extensions["model_server"].manager
    manager.unload("gemma2")
    response = matrix_client.post("/v1/chat/completions", json={
        "model": "gemma2", "max_tokens": 4,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]})
    assert response.status_code == 400
    assert response.get_json()["error"]["param"] == "messages[0]"
    assert not manager.snapshot_one("gemma2")["loaded"], "refused without loading the model"
    assert chat(matrix_client, "llama", [{"type": "text", "text": "hi"}],
                messages=[{"role": "system", "content": "be brief"},
                          {"role": "user", "content": "hi"}]).status_code == 200


def _requests(key: str, caps) -> list[GenerationRequest]:
    """Four different requests: prompts of different lengths, 1 or 2 images of different sizes, a video."""
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    out = []
    for i in range(4):
        rng = np.random.default_rng(i)
        images = [Image.fromarray(rng.integers(0, 255, (20 + 6 * i + 4 * j, 28 + 3 * i, 3), dtype=np.uint8))
                  for j in range(1 + i % 2)] if "image" in caps.media else []
        videos = [load_video(VIDEO, "video", MediaLimits())] if "video" in caps.media and i == 3 else []
        if videos:
            images = []
        out.append(GenerationRequest(prompt=" ".join(words[: 1 + 2 * i]) + f" number {i}", images=images,
                                     videos=videos))
    return out


@pytest.mark.parametrize("key", MATRIX_KEYS)
def test_a_batch_of_different_requests_gets_each_solo_answer(matrix_app, demo_root, key, caplog):
    spec = matrix_app.extensions["model_server"].settings.models[key]
    adapter = load_family(spec, "cpu")
    try:
        caps = read_capabilities(spec.path)
        prepared = [adapter.prepare(r) for r in _requests(key, caps)]
        params = [GenerationParams(max_new_tokens=3 + i, temperature=1.0, top_p=1.0, do_sample=False)
                  for i in range(4)]
        solo = [adapter.generate(p, q) for p, q in zip(prepared, params)]
        assert len({r.text for r in solo}) > 1, "different requests must give different answers to catch mix-ups"
        continuous = ContinuousEngine.supports(adapter)
        assert ("continuous" if continuous else "dynamic") == engine_kind(spec.family, spec.path)
        engine = (ContinuousEngine if continuous else Engine)(adapter, key=key, max_batch_size=8, max_queue=16,
                                                              queue_timeout=60.0)
        jobs = [engine.submit(p, q) for p, q in zip(prepared, params)]  # all queued before the worker starts
        engine.start()
        batched = [job.wait() for job in jobs]
        engine.stop()
        stats = engine.stats()
        assert stats["peak_batch"] > 1, stats
        assert not [r for r in caplog.records if "failed" in r.getMessage()], "the batch fell back to single rows"
        if not continuous:
            assert stats["batches"] == 1, stats  # one padded generate over the four rows
        assert [(r.text, r.completion_tokens) for r in batched] == [(r.text, r.completion_tokens) for r in solo]
    finally:
        adapter.release()
