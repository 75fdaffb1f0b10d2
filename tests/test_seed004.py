"""Seed 004's requests unchanged: per-part media options (fps, nframes, max_pixels, min_pixels) through
the real Qwen2.5-VL demo processor, GET/POST /device, and default_seed (VLM_SEED)."""
from __future__ import annotations

import pytest

from tests import media_samples as ms
from tests.conftest import make_app
from utils.errors import InvalidInput
from utils.media.options import frame_count, parse_media_options, parse_pixels, pixel_bounds


def chat(client, content, model="qwen_vl", **extra):
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 2, "temperature": 0}
    return client.post("/v1/chat/completions", json={**body, **extra})


def prompt_tokens(client, content, model="qwen_vl") -> int:
    response = chat(client, content, model)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["usage"]["prompt_tokens"]


def image_part(w=200, h=150, **options):
    return {"type": "image_url", "image_url": {"url": ms.data_url(ms.png(w, h), "image/png")}, **options}


@pytest.fixture(scope="module")
def clip_url():
    return ms.data_url(ms.video("mp4", frames=8, fps=4, w=128, h=96), "video/mp4")  # 2 s


def video_part(url, **options):
    return {"type": "video_url", "video_url": {"url": url}, **options}


# ------------------------------------------------------------------ parsing, no model

@pytest.mark.parametrize("given,pixels", [(1024, 1024), ("360*420", 151200), (" 28 * 28 * 1280 ", 1003520),
                                          ("5000", 5000), (4096.0, 4096)])
def test_pixel_counts_parse_without_eval(given, pixels):
    assert parse_pixels(given, "max_pixels") == pixels


@pytest.mark.parametrize("given", ["360*", "__import__('os')", "2**40", "360x420", "-5", 0, True, 1.5, "", [1]])
def test_bad_pixel_counts_are_400(given):
    with pytest.raises(InvalidInput):
        parse_pixels(given, "max_pixels")


def test_options_are_read_beside_and_inside_the_url_object_and_checked():
    part = {"type": "video_url", "video_url": {"url": "x", "nframes": 4}, "max_pixels": "56*56"}
    assert parse_media_options(part, "video", "p") == {"nframes": 4, "max_pixels": 3136}
    for bad in ({"fps": 1, "nframes": 2}, {"fps": 0}, {"fps": float("nan")}, {"nframes": 0},
                {"min_pixels": 5000, "max_pixels": 4000}):
        with pytest.raises(InvalidInput):
            parse_media_options({"video_url": {"url": "x"}, **bad}, "video", "p")
    with pytest.raises(InvalidInput, match="videos only"):
        parse_media_options({"image_url": {"url": "x"}, "fps": 1}, "image", "p")
    with pytest.raises(InvalidInput, match="twice"):
        parse_media_options({"video_url": {"url": "x", "fps": 2}, "fps": 1}, "video", "p")


def test_frame_counts_and_pixel_bounds_clamp_to_the_limits():
    assert frame_count(None, total=100, duration=10, cap=8) == 8
    assert frame_count({"fps": 0.5}, total=100, duration=10, cap=8) == 5
    assert frame_count({"fps": 30}, total=100, duration=10, cap=8) == 8      # the server's max_video_frames
    assert frame_count({"nframes": 50}, total=6, duration=3, cap=8) == 6      # the clip's own frames
    assert frame_count({"nframes": 3}, total=100, duration=10, cap=8) == 3
    assert pixel_bounds({}, 3136, 12544) is None
    assert pixel_bounds({"max_pixels": 151200}, 3136, 12544) == (3136, 12544)   # the processor's bounds
    assert pixel_bounds({"max_pixels": 100}, 3136, 12544) == (3136, 3136)
    assert pixel_bounds({"min_pixels": 5000}, 3136, 12544) == (5000, 12544)


# ------------------------------------------------------------------ through the real processor

def test_image_pixel_bounds_change_the_prompt(client):
    text = {"type": "text", "text": "describe it"}
    default = prompt_tokens(client, [image_part(), text])
    fewer = prompt_tokens(client, [image_part(max_pixels="56*56"), text])
    assert fewer < default  # 200x150 shrinks to 56x56: 4 merged patches instead of 12
    small = prompt_tokens(client, [image_part(40, 30), text])
    upscaled = prompt_tokens(client, [image_part(40, 30, min_pixels=112 * 112), text])
    assert upscaled > small
    assert prompt_tokens(client, [image_part(max_pixels=10**12), text]) == default  # clamped to the processor's


def test_video_fps_nframes_and_max_pixels_change_the_prompt(client, clip_url):
    text = {"type": "text", "text": "Describe this video"}
    default = prompt_tokens(client, [text, video_part(clip_url)])
    one_fps = prompt_tokens(client, [text, video_part(clip_url, fps=1)])   # 2 frames of 8
    four = prompt_tokens(client, [text, video_part(clip_url, nframes=4)])
    assert one_fps < four < default
    smaller = prompt_tokens(client, [text, video_part(clip_url, max_pixels="28*28*3")])
    assert smaller < default
    # seed 004's own request: "360*420" is above this processor's per-frame bound, so it clamps to it
    seed = prompt_tokens(client, [text, video_part(clip_url, max_pixels="360*420", fps=1)])
    assert seed == one_fps


def test_frame_list_video_takes_nframes(client):
    frames = [ms.data_url(ms.png(64, 48, color=(30 * i, 0, 0)), "image/png") for i in range(8)]
    text = {"type": "text", "text": "what happens?"}
    all_frames = prompt_tokens(client, [{"type": "video", "video": frames}, text])
    two = prompt_tokens(client, [{"type": "video", "video": frames, "nframes": 2}, text])
    assert two < all_frames


def test_options_a_model_cannot_honour_are_refused_before_loading(client, clip_url):
    client.post("/admin/models/blip_vqa/unload")
    response = chat(client, [image_part(max_pixels=4096), {"type": "text", "text": "what?"}], model="blip_vqa")
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["param"] == "messages[0].content[0].max_pixels" and "blip_vqa" in error["message"]
    assert client.get("/admin/model_status").get_json()["models"]["blip_vqa"]["loaded"] is False
    bad = chat(client, [video_part(clip_url, max_pixels="360*abc")])
    assert bad.status_code == 400 and bad.get_json()["error"]["param"] == "messages[0].content[0].max_pixels"


# ------------------------------------------------------------------ /device

def test_device_list_and_one_device(client):
    assert chat(client, "hello", model="deepseek").status_code == 200  # something runs on the CPU
    report = client.get("/device").get_json()
    assert report["devices"][0] == "CPU" and report["devices"] == [d["device"] for d in report["details"]]
    cpu = report["details"][0]
    assert cpu["id"] == "cpu" and cpu["memory"]["total"] > 0 and cpu["cores"] >= 1
    assert "deepseek" in [m["model"] for m in cpu["models"]]
    for name in ("CPU", "cpu"):
        one = client.post(f"/device?device={name}")
        assert one.status_code == 200 and one.get_json()["id"] == "cpu"
    assert client.get("/device?device=CPU").get_json()["id"] == "cpu"
    unknown = client.post("/device?device=GPU.7")
    assert unknown.status_code == 400 and "CPU" in unknown.get_json()["details"]
    assert client.post("/device").status_code == 400


def test_device_names_follow_seed_004_for_gpus():
    from utils.serving.device_status import devices_from, find_device
    gpu = lambda i: {"device": f"cuda:{i}", "name": "H100", "total": 80, "free": 70, "budget": 79,  # noqa: E731
                     "models_bytes": 5}
    memory = {"ram": {"total": 10, "available": 5}, "gpus": [gpu(0), gpu(1)]}
    models = {"qwen_vl": {"state": "loaded", "placement": {"cuda:1": 5}, "device": "cuda:1", "in_flight": 1}}
    details = devices_from(memory, models)
    report = {"devices": [d["device"] for d in details], "details": details}
    assert report["devices"] == ["CPU", "GPU.0", "GPU.1"]
    assert find_device(report, "gpu.1")["models"] == [{"model": "qwen_vl", "state": "loaded", "bytes": 5,
                                                        "in_flight": 1}]
    assert find_device(report, "GPU")["id"] == find_device(report, "cuda")["id"] == "cuda:0"
    assert find_device(report, "cuda:1")["device"] == "GPU.1"
    single = devices_from({"ram": {}, "gpus": [gpu(0)]}, {})
    assert [d["device"] for d in single] == ["CPU", "GPU"]


# ------------------------------------------------------------------ default_seed

def test_default_seed_makes_unseeded_sampling_reproducible(make_settings):
    settings = make_settings(DEFAULT_SEED="1234", VLM_SEED="99")
    assert settings.default_seed == 1234 and settings.models["deepseek"].generation.seed == 1234
    assert make_settings(VLM_SEED="99").default_seed == 99  # seed 004's name
    from utils.errors import ConfigError
    for bad in ("-1", "abc", str(2**63)):
        with pytest.raises(ConfigError, match="default_seed"):
            make_settings(DEFAULT_SEED=bad)
    app = make_app(settings)
    try:
        client = app.test_client()
        body = {"model": "deepseek", "messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 12,
                "temperature": 1.0}
        first, second = (client.post("/v1/chat/completions", json=body).get_json() for _ in range(2))
        assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
        other = client.post("/v1/chat/completions", json={**body, "seed": 5}).get_json()  # a request's seed wins
        answers = {other["choices"][0]["message"]["content"]}
        answers |= {client.post("/v1/chat/completions", json={**body, "seed": s}).get_json()["choices"][0]
                    ["message"]["content"] for s in (6, 7)}
        assert len(answers | {first["choices"][0]["message"]["content"]}) > 1  # sampling really varies by seed
        assert app.extensions["model_server"].settings.public_dict()["default_seed"] == 1234
    finally:
        app.extensions["model_server"].manager.shutdown()
