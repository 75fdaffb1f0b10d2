"""POST /generate/<model> on the real stack (tiny random-weight checkpoints), via Flask's test client."""
from __future__ import annotations

import io

import pytest

from tests import media_samples as ms


def post(client, model, body, **kw):
    return client.post(f"/generate/{model}", json=body, **kw)


def ok(response):
    assert response.status_code == 200, response.get_json()
    return response.get_json()


# ------------------------------------------------------------------ each route

def test_deepseek_text(client):
    body = ok(post(client, "deepseek", {"prompt": "zebra quantum lighthouse", "max_new_tokens": 6}))
    assert body["model"] == "deepseek"
    assert isinstance(body["response"], str)
    usage = body["usage"]
    assert usage["prompt_tokens"] > 3
    assert 1 <= usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert "zebra quantum lighthouse" not in body["response"]
    assert body["finish_reason"] in ("stop", "length")


def test_seed_makes_sampling_reproducible(client):
    req = {"prompt": "tell me a story", "max_new_tokens": 12, "do_sample": True, "temperature": 1.0, "seed": 7}
    first = ok(post(client, "deepseek", req))["response"]
    second = ok(post(client, "deepseek", req))["response"]
    other = [ok(post(client, "deepseek", dict(req, seed=s)))["response"] for s in (8, 9, 10)]
    assert first == second
    assert any(o != first for o in other)


def test_greedy_is_deterministic(client):
    req = {"prompt": "hello", "max_new_tokens": 8, "temperature": 0}
    assert ok(post(client, "deepseek", req))["response"] == ok(post(client, "deepseek", req))["response"]


def test_reasoning_is_split_not_dropped(app):
    from utils.families.text import split_reasoning
    with app.extensions["model_server"].manager.lease("deepseek") as model:
        tok = model.adapter.processor
        ids = tok.convert_tokens_to_ids(["<think>"]) + tok.encode("the sky", add_special_tokens=False) \
            + tok.convert_tokens_to_ids(["</think>"]) + tok.encode("blue", add_special_tokens=False)
        assert split_reasoning(tok, ids) == ("the sky", "blue")
        # R1 templates open <think> in the prompt: only the closing tag is generated
        assert split_reasoning(tok, ids[1:]) == ("the sky", "blue")
        # cut short inside the thought: reasoning so far, no answer yet
        assert split_reasoning(tok, ids[:3]) == ("the sky", "")
        assert split_reasoning(tok, tok.encode("blue", add_special_tokens=False)) == (None, "blue")


def test_qwen_vl_one_image(client):
    body = ok(post(client, "qwen_vl", {"prompt": "describe", "image": ms.b64(ms.png(64, 48)),
                                       "max_new_tokens": 5}))
    assert body["model"] == "qwen_vl" and body["usage"]["completion_tokens"] <= 5


def test_qwen_vl_images_change_the_prompt(client):
    one = ok(post(client, "qwen_vl", {"prompt": "compare", "images": [ms.b64(ms.png(64, 48))],
                                      "max_new_tokens": 2}))
    two = ok(post(client, "qwen_vl", {"prompt": "compare",
                                      "images": [ms.b64(ms.png(64, 48)), ms.data_url(ms.jpeg(40, 90), "image/jpeg")],
                                      "max_new_tokens": 2}))
    # the second image's visual tokens are really in the prompt
    assert two["usage"]["prompt_tokens"] > one["usage"]["prompt_tokens"]


def test_blip_vqa(client):
    body = ok(post(client, "blip_vqa", {"prompt": "what color is it?", "image": ms.b64(ms.png(color=(0, 0, 255)))}))
    assert body["model"] == "blip_vqa" and isinstance(body["response"], str)


def test_multipart_upload(client):
    data = {"prompt": "describe", "max_new_tokens": "3", "image": (io.BytesIO(ms.png(48, 48)), "a.png")}
    body = ok(client.post("/generate/qwen_vl", data=data, content_type="multipart/form-data"))
    assert body["usage"]["completion_tokens"] <= 3


def test_health_and_models(client):
    assert client.get("/health").get_json()["status"] == "ok"
    keys = [m["key"] for m in client.get("/models").get_json()["models"]]
    assert keys == ["deepseek", "qwen_vl", "qwen_audio", "qwen_omni", "blip_vqa", "flux", "qwen_image_edit", "janus",
                    "whisper", "qwen3_openvino"]


# ------------------------------------------------------------------ bad input: 4xx JSON, never a 500

def error_of(response, status):
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True)[:300])
    body = response.get_json()
    assert set(body) >= {"error", "details"} and body["details"]
    return body


@pytest.mark.parametrize("raw,ctype,status", [
    (b"{not json", "application/json", 400),
    (b"", "application/json", 400),
    (b"[1, 2]", "application/json", 400),
    (b'"just a string"', "application/json", 400),
    (b"prompt=hi", "application/x-www-form-urlencoded", 415),
    (b"prompt hi", "text/plain", 415),
])
def test_malformed_bodies(client, raw, ctype, status):
    error_of(client.post("/generate/deepseek", data=raw, content_type=ctype), status)


@pytest.mark.parametrize("body,field", [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": ["a"]}, "prompt"),
    ({"prompt": "hi", "max_new_tokens": "many"}, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": 10**9}, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": 1.5}, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": True}, "max_new_tokens"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "seed": -3}, "seed"),
    ({"prompt": "hi", "do_sample": "maybe"}, "do_sample"),
    ({"prompt": "hi", "keep_alive": -5}, "keep_alive"),
    ({"prompt": "x" * 40000}, "prompt"),
])
def test_invalid_fields(client, body, field):
    err = error_of(post(client, "deepseek", body), 400)
    assert err.get("field") == field


def test_max_new_tokens_above_model_cap_names_the_cap(client):
    err = error_of(post(client, "blip_vqa", {"prompt": "q", "image": ms.b64(ms.png()), "max_new_tokens": 65}), 400)
    assert "64" in err["details"]


@pytest.mark.parametrize("model,body,status,field", [
    ("qwen_vl", {"prompt": "d", "image": "not base64 at all!!"}, 400, "image"),
    ("qwen_vl", {"prompt": "d", "image": 12345}, 400, "image"),
    ("qwen_vl", {"prompt": "d", "image": ms.b64(b"these bytes are not an image")}, 400, "image"),
    ("qwen_vl", {"prompt": "d", "image": ms.b64(ms.truncated(ms.png(64, 64)))}, 400, "image"),
    ("qwen_vl", {"prompt": "d", "images": [ms.b64(ms.png()), "%%%"]}, 400, "images[1]"),
    ("qwen_vl", {"prompt": "d", "images": "x" * 3}, 400, "images[0]"),
    ("qwen_vl", {"prompt": "d", "images": {"a": 1}}, 400, "images"),
    ("deepseek", {"prompt": "d", "image": ms.b64(ms.png())}, 400, "image"),
    ("blip_vqa", {"prompt": "d"}, 400, "image"),
    ("blip_vqa", {"prompt": "d", "images": [ms.b64(ms.png()), ms.b64(ms.png())]}, 400, "images[1]"),  # the item over the count, before decoding
])
def test_bad_media(client, model, body, status, field):
    err = error_of(post(client, model, body), status)
    assert err.get("field") == field


def test_decompression_bomb_is_refused(client):
    err = error_of(post(client, "qwen_vl", {"prompt": "d", "image": ms.b64(ms.png_bomb())}), 413)
    assert "pixels" in err["details"]


def test_unknown_model_is_404(client):
    err = error_of(post(client, "gpt-17", {"prompt": "hi"}), 404)
    assert "deepseek" in err["details"]


def test_body_over_max_content_length_is_413(app, client):
    limit = app.config["MAX_CONTENT_LENGTH"]
    app.config["MAX_CONTENT_LENGTH"] = 1024
    try:
        error_of(post(client, "deepseek", {"prompt": "x" * 4096}), 413)
    finally:
        app.config["MAX_CONTENT_LENGTH"] = limit
    ok(post(client, "deepseek", {"prompt": "still serving", "max_new_tokens": 2}))


def test_wrong_method_and_route(client):
    error_of(client.get("/generate/deepseek"), 405)
    error_of(client.get("/nope"), 404)


@pytest.mark.parametrize("model,body,field", [
    ("deepseek", {"prompt": "\ud800 lone surrogate"}, "prompt"),
    ("deepseek", {"prompt": "hi", "system": "\udfff"}, "system"),
    ("deepseek", {"prompt": "hi", "temperature": 1e-300}, "temperature"),
    ("blip_vqa", {"prompt": "what " * 600, "image": ms.b64(ms.png())}, "prompt"),
])
def test_inputs_that_used_to_crash_the_model(client, model, body, field):
    err = error_of(post(client, model, body), 400)
    assert err["field"] == field


def test_deeply_nested_json_is_a_400(client):
    raw = b'{"prompt": "x", "a": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    error_of(client.post("/generate/deepseek", data=raw, content_type="application/json"), 400)


def test_empty_file_part_from_a_browser_form_is_ignored(client):
    data = {"prompt": "what color?", "image": (io.BytesIO(ms.png()), "a.png"),
            "images": (io.BytesIO(b""), "")}
    ok(client.post("/generate/blip_vqa", data=data, content_type="multipart/form-data"))
