"""Audio, video and omni through /generate on the real tiny checkpoints: base64 and uploads alike."""
from __future__ import annotations

import io
import itertools

import pytest

from tests import media_samples as ms

AUDIO_FORMATS = ["wav", "flac", "mp3", "ogg", "m4a"]
VIDEO_FORMATS = ["mp4", "avi", "mov", "webm"]


@pytest.fixture(scope="module")
def samples():
    return {
        "image": ms.b64(ms.png(56, 56, color=(10, 200, 30))),
        "image2": ms.data_url(ms.jpeg(40, 72), "image/jpeg"),
        "audio": ms.b64(ms.wav(seconds=1.0, rate=44100, channels=2)),
        "video": ms.b64(ms.video("mp4", frames=8, fps=4, w=64, h=48)),
    }


def post(client, model, body):
    return client.post(f"/generate/{model}", json=body)


def ok(response):
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def bad(response, status=400):
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True)[:300])
    body = response.get_json()
    assert body["error"] and body["details"]
    return body


# ------------------------------------------------------------------ qwen_audio

@pytest.mark.parametrize("fmt", AUDIO_FORMATS)
def test_qwen_audio_each_format(client, fmt):
    audio = ms.audio(fmt, seconds=1.0, rate=44100, channels=2)
    body = ok(post(client, "qwen_audio", {"prompt": "transcribe the clip", "audio": ms.b64(audio),
                                          "max_new_tokens": 4}))
    assert body["model"] == "qwen_audio"
    assert "transcribe the clip" not in body["response"]


def test_qwen_audio_features_come_from_the_audio(client, samples):
    short = ok(post(client, "qwen_audio", {"prompt": "p", "audio": ms.b64(ms.wav(seconds=1.0)),
                                           "max_new_tokens": 1}))
    longer = ok(post(client, "qwen_audio", {"prompt": "p", "audio": ms.b64(ms.wav(seconds=3.0)),
                                            "max_new_tokens": 1}))
    # the processor expands <|AUDIO|> by the clip's length: the audio is really in the prompt
    assert longer["usage"]["prompt_tokens"] > short["usage"]["prompt_tokens"]


def test_qwen_audio_upload(client):
    data = {"prompt": "what is this", "max_new_tokens": "3",
            "audio": (io.BytesIO(ms.audio("flac", seconds=1.0)), "clip.flac")}
    ok(client.post("/generate/qwen_audio", data=data, content_type="multipart/form-data"))


# ------------------------------------------------------------------ qwen_vl video

@pytest.mark.parametrize("fmt", VIDEO_FORMATS)
def test_qwen_vl_video_each_container(client, fmt):
    video = ms.video(fmt, frames=8, fps=4, w=64, h=48)
    body = ok(post(client, "qwen_vl", {"prompt": "what happens", "video": ms.b64(video), "max_new_tokens": 3}))
    assert body["usage"]["prompt_tokens"] > 20


def test_qwen_vl_images_and_video_together(client, samples):
    video_only = ok(post(client, "qwen_vl", {"prompt": "p", "video": samples["video"], "max_new_tokens": 1}))
    both = ok(post(client, "qwen_vl", {"prompt": "p", "video": samples["video"],
                                       "images": [samples["image"], samples["image2"]], "max_new_tokens": 1}))
    assert both["usage"]["prompt_tokens"] > video_only["usage"]["prompt_tokens"]


def test_qwen_vl_video_upload(client):
    data = {"prompt": "describe", "max_new_tokens": "2",
            "video": (io.BytesIO(ms.video("webm", frames=6)), "clip.webm")}
    ok(client.post("/generate/qwen_vl", data=data, content_type="multipart/form-data"))


# ------------------------------------------------------------------ qwen_omni: every combination

OMNI_MEDIA = ["image", "audio", "video"]
OMNI_COMBOS = [c for n in range(0, 4) for c in itertools.combinations(OMNI_MEDIA, n)]


@pytest.fixture(scope="module")
def omni_prompt_tokens(client, samples):
    """prompt_tokens of each combination, so tests can check every medium reached the model."""
    out = {}
    for combo in OMNI_COMBOS:
        body = {"prompt": "tell me everything", "max_new_tokens": 2}
        body.update({kind: samples[kind] for kind in combo})
        out[combo] = ok(post(client, "qwen_omni", body))["usage"]["prompt_tokens"]
    return out


@pytest.mark.parametrize("combo", [c for c in OMNI_COMBOS if c], ids=lambda c: "+".join(c))
def test_qwen_omni_every_medium_reaches_the_model(omni_prompt_tokens, combo):
    tokens = omni_prompt_tokens[combo]
    for kind in combo:  # dropping any one medium shortens the prompt: nothing was silently thrown away
        without = tuple(k for k in combo if k != kind)
        assert tokens > omni_prompt_tokens[without], (combo, kind)


def test_qwen_omni_several_images_and_audio_upload(client, samples):
    one = ok(post(client, "qwen_omni", {"prompt": "p", "images": [samples["image"]], "max_new_tokens": 1}))
    data = {"prompt": "p", "max_new_tokens": "1",
            "images": [(io.BytesIO(ms.png(56, 56)), "a.png"), (io.BytesIO(ms.jpeg(40, 72)), "b.jpg")],
            "audio": (io.BytesIO(ms.audio("ogg", seconds=1.0)), "c.ogg"),
            "video": (io.BytesIO(ms.video("mov", frames=4)), "d.mov")}
    body = ok(client.post("/generate/qwen_omni", data=data, content_type="multipart/form-data"))
    assert body["usage"]["prompt_tokens"] > one["usage"]["prompt_tokens"]


# ------------------------------------------------------------------ corrupt media, wrong media

CORRUPT = [
    ("qwen_audio", "audio", lambda: ms.truncated(ms.audio("mp3", seconds=2.0), 0.3)),
    ("qwen_audio", "audio", lambda: ms.truncated(ms.wav(seconds=2.0), 0.5)),
    ("qwen_audio", "audio", lambda: ms.garbage(5000)),
    ("qwen_audio", "audio", lambda: ms.png()),
    ("qwen_vl", "video", lambda: ms.truncated(ms.video("mp4", frames=8), 0.4)),
    ("qwen_vl", "video", lambda: ms.truncated(ms.video("webm", frames=8), 0.4)),
    ("qwen_vl", "video", lambda: ms.garbage(8000)),
    ("qwen_vl", "video", lambda: ms.wav()),
    ("qwen_omni", "image", lambda: ms.truncated(ms.jpeg(64, 64), 0.3)),
    ("qwen_omni", "audio", lambda: ms.truncated(ms.audio("m4a", seconds=2.0), 0.3)),
    ("qwen_omni", "video", lambda: ms.truncated(ms.video("avi", frames=8), 0.3)),
]


@pytest.mark.parametrize("model,field,make", CORRUPT)
def test_corrupt_media_is_a_400_naming_the_field(client, model, field, make):
    err = bad(post(client, model, {"prompt": "p", field: ms.b64(make())}))
    assert err["field"] == field


@pytest.mark.parametrize("model,field,make", CORRUPT[:6])
def test_corrupt_upload_is_a_400_too(client, model, field, make):
    data = {"prompt": "p", field: (io.BytesIO(make()), "upload.bin")}
    err = bad(client.post(f"/generate/{model}", data=data, content_type="multipart/form-data"))
    assert err["field"] == field


@pytest.mark.parametrize("model,field", [("deepseek", "audio"), ("qwen_vl", "audio"), ("blip_vqa", "video"),
                                         ("qwen_audio", "image"), ("qwen_audio", "video")])
def test_media_a_model_does_not_take(client, samples, model, field):
    err = bad(post(client, model, {"prompt": "p", field: samples[field]}))
    assert err["error"] == "unsupported input"


def test_too_many_media_items(client, samples):
    err = bad(post(client, "qwen_vl", {"prompt": "p", "videos": [samples["video"], samples["video"]]}))
    assert "at most 1" in err["details"]


def test_server_still_serves_after_bad_media(client, samples):
    ok(post(client, "qwen_omni", {"prompt": "p", "audio": samples["audio"], "image": samples["image"],
                                  "max_new_tokens": 2}))


# ------------------------------------------------------------------ temp files

def test_tmp_is_empty_after_a_mixed_run_with_failures(app, client, samples):
    tmp_root = app.extensions["model_server"].settings.tmp_dir
    big_audio = ms.wav(seconds=5.0)   # over the spool threshold: the upload is spooled into tmp/
    assert len(big_audio) > 512 * 1024
    responses = [
        client.post("/generate/qwen_audio", content_type="multipart/form-data",
                    data={"prompt": "p", "max_new_tokens": "1", "audio": (io.BytesIO(big_audio), "a.wav")}),
        client.post("/generate/qwen_audio", content_type="multipart/form-data",
                    data={"prompt": "p", "audio": (io.BytesIO(ms.truncated(big_audio, 0.5)), "a.wav")}),
        client.post("/generate/qwen_audio", content_type="multipart/form-data",
                    data={"prompt": "", "audio": (io.BytesIO(ms.garbage(600_000)), "a.wav")}),
        client.post("/generate/qwen_omni", content_type="multipart/form-data",
                    data={"prompt": "p", "max_new_tokens": "1", "image": (io.BytesIO(ms.png()), "i.png"),
                          "audio": (io.BytesIO(ms.wav(seconds=4.0)), "a.wav")}),
        post(client, "qwen_omni", {"prompt": "p", "video": samples["video"], "max_new_tokens": 1}),
    ]
    assert [r.status_code for r in responses] == [200, 400, 400, 200, 200]
    leftovers = [p for p in tmp_root.rglob("*")]
    assert leftovers == []
    status = client.get("/admin/temp_status").get_json()
    assert status["files"] == 0 and status["active_scopes"] == 0
