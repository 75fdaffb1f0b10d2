"""What the schemathesis run (tests/test_schemathesis.py) found, and issue 24's findings 1 and 2 that
its schema now describes, each pinned by the request that showed it. Real app, demo models."""
from __future__ import annotations

import pytest


def loaded(client, key: str) -> bool:
    return client.get("/admin/model_status").get_json()["models"][key]["loaded"]


@pytest.mark.parametrize("device", ["cuda:999", "cuda:05740220206", "cuda:\u0663", "mps", "cuda:x"])
def test_a_device_this_machine_lacks_is_the_clients_mistake(client, device):
    """Found by schemathesis: ?device=cuda:05740220206 answered 503 'insufficient memory' (its budget
    there is 0), ?device=mps on Linux 503 'failed to load' and left the model in the error state with
    a backoff. Now 400 before anything is tried; the model stays as it was."""
    response = client.post("/admin/models/qwen_omni/load", query_string={"device": device})
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["field"] == "device"
    state = client.get("/admin/model_status").get_json()["models"]["qwen_omni"]
    assert state["manager_state"] != "error" and not state.get("error")


def test_a_device_it_has_still_loads_there(client):
    response = client.post("/admin/models/deepseek/load", query_string={"device": "cpu"})
    assert response.status_code == 200 and response.get_json()["model"]["device"] == "cpu"


@pytest.mark.parametrize("model", ["flux", "black-forest-labs/FLUX.1-schnell", "qwen_image_edit"])
@pytest.mark.parametrize("stream", [False, True])
def test_chat_with_an_image_model_is_refused_before_its_load(client, model, stream):
    """Issue 24, finding 1: the image model loaded (34 GB on real hardware), then 500 KeyError."""
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
               {"type": "text", "text": "hi"}] if model == "qwen_image_edit" else "hi"
    response = client.post("/v1/chat/completions", json={"model": model, "stream": stream,
                                                          "messages": [{"role": "user", "content": content}]})
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["param"] == "model" and error["code"] == "unsupported_model" and "/v1/images/" in error["message"]
    assert not loaded(client, "flux") and not loaded(client, "qwen_image_edit")


@pytest.mark.parametrize("size", ["\u00b2x\u00b2", "64x\u00b2", "\u2460x64", "9" * 5000 + "x64", "64x64x64", "x64",
                                  " x ", "-64x64"])
def test_odd_sizes_are_400_naming_size(client, size):
    """Issue 24, finding 2: str.isdigit() took what int() refuses; 500."""
    response = client.post("/v1/images/generations", json={"model": "flux", "prompt": "a fox", "size": size})
    assert response.status_code == 400
    assert response.get_json()["error"]["param"] == "size"
    assert len(response.get_json()["error"]["message"]) < 200  # 5,000 digits are not echoed


def test_sizes_that_were_valid_stay_valid(client):
    from utils.api.openai_translation import SIZE
    assert [SIZE.match(s).groups() for s in ("64x64", " 64 X 48 ", "1024x768")] == \
        [("64", "64"), ("64", "48"), ("1024", "768")]


@pytest.mark.parametrize("field, value", [("echo", 0), ("logprobs", 0), ("best_of", {}), ("best_of", True),
                                          ("n", True), ("presence_penalty", False)])
def test_true_is_not_1_and_false_is_not_0_for_parameters_taken_only_at_their_neutral(make_settings, field, value):
    """Found by schemathesis (negative_data_rejection, run by hand): `echo: 0`, `partial_images:
    false` and `best_of: {}` passed as the neutral value; issue 24's `"n": true` taken as 1."""
    from utils.errors import InvalidInput
    from utils.api.openai_translation import parse_chat
    spec = make_settings().models["deepseek"]
    body = {"model": "deepseek", "messages": [{"role": "user", "content": "hi"}]}
    parse_chat({**body, "echo": False, "logprobs": False, "best_of": 1, "n": 1, "presence_penalty": 0.0,
                "tools": [], "logit_bias": {}}, spec)  # the neutral values themselves still pass
    with pytest.raises(InvalidInput) as refused:
        parse_chat({**body, field: value}, spec)
    assert refused.value.field == field


@pytest.mark.parametrize("field, value", [("partial_images", False), ("stream", 0), ("output_compression", True)])
def test_image_parameters_taken_only_at_their_neutral_tell_bools_from_numbers(make_settings, field, value):
    from utils.errors import InvalidInput
    from utils.api.openai_translation import parse_image_request
    spec = make_settings().models["flux"]
    body = {"model": "flux", "prompt": "a fox", "size": "64x64"}
    parse_image_request({**body, "partial_images": 0, "stream": False, "output_compression": 100}, spec, edit=False)
    with pytest.raises(InvalidInput) as refused:
        parse_image_request({**body, field: value}, spec, edit=False)
    assert refused.value.field == field
