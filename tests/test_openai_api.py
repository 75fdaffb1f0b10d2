"""/v1 through a real server process, driven by the official openai client (and raw HTTP where the
client hides what is checked)."""
from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import openai
import pytest
import requests

from tests import media_samples as ms
from tests.conftest import ROOT, wait_for

FAMILIES = ("deepseek", "qwen_vl", "blip_vqa", "qwen_audio", "qwen_omni")
THINKER_YAML = """
  thinker:       # the demo text model, but two of its words are printed as <think> and </think>
    repo_id: test/thinker
    family: text
    path: demo/thinker
    generation: {max_new_tokens: 16}
"""
THINK_PROMPT = "think about the sky"


def image_url(w: int = 40, h: int = 30, color=(200, 20, 20)) -> str:
    return ms.data_url(ms.png(w, h, color=color), "image/png")


def audio_part(seconds: float = 0.5) -> dict:
    return {"type": "input_audio", "input_audio": {"data": ms.b64(ms.wav(seconds, rate=16000, channels=1)),
                                                   "format": "wav"}}


def user_content(key: str) -> list[dict]:
    media = {"deepseek": [], "qwen_vl": [{"type": "image_url", "image_url": {"url": image_url()}}],
             "blip_vqa": [{"type": "image_url", "image_url": {"url": image_url()}}],
             "qwen_audio": [audio_part()],
             "qwen_omni": [{"type": "image_url", "image_url": {"url": image_url()}}, audio_part()]}[key]
    return media + [{"type": "text", "text": f"what do you make of this, {key}?"}]


def _build_thinker(demo: Path) -> None:
    """A copy of the demo text model in which two words it says become the think tags: same
    embeddings and output rows, so it answers exactly as before, but with reasoning in it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    target = demo / "thinker"
    if target.exists():
        return
    tokenizer = AutoTokenizer.from_pretrained(demo / "deepseek")
    model = AutoModelForCausalLM.from_pretrained(demo / "deepseek", dtype=torch.float32)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": THINK_PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    said = model.generate(**inputs, max_new_tokens=16, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    words = list(dict.fromkeys(said))
    first, second = words[0], words[3]  # the answer opens with a thought and closes it a few words later
    with torch.no_grad():
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        for word, tag in ((first, "<think>"), (second, "</think>")):
            tag_id = tokenizer.convert_tokens_to_ids(tag)
            embed[tag_id] = embed[word]
            head[tag_id] = head[word]
            head[word] = 0.0  # a logit of 0, like every non-word: the tag now wins wherever the word did
    staging = target.with_name("thinker.building")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)


@pytest.fixture(scope="module")
def server(start_server, models_dir):
    _build_thinker(models_dir / "demo")
    config = models_dir / "openai-models.yaml"
    config.write_text((ROOT / "models.yaml").read_text() + THINKER_YAML)
    return start_server(MODELS_CONFIG=config, MAX_LOADED_MODELS=6, MODEL_IDLE_TIMEOUT=600, REMOTE_MEDIA=1)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_list_and_alias(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(FAMILIES) <= set(models)
    assert models["deepseek"].owned_by == "deepseek-ai"
    assert client.models.retrieve("Qwen/Qwen2.5-VL-3B-Instruct").id == "qwen_vl"  # the Hub id is an alias


@pytest.mark.parametrize("key", FAMILIES)
def test_chat_plain_and_streamed_for_every_family(client, key):
    messages = [{"role": "user", "content": user_content(key)}]
    plain = client.chat.completions.create(model=key, messages=messages, max_tokens=6, temperature=0)
    choice = plain.choices[0]
    assert plain.object == "chat.completion" and plain.model == key and plain.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length") and plain.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(model=key, messages=messages, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.strip() == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_several_images_video_data_url_and_frame_list_video(client):
    two_images = [{"type": "image_url", "image_url": {"url": image_url(40, 30)}},
                  {"type": "image_url", "image_url": {"url": image_url(32, 48, (10, 200, 10))}},
                  {"type": "text", "text": "compare them"}]
    one = client.chat.completions.create(model="qwen_vl", max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": two_images[:1] + two_images[2:]}])
    both = client.chat.completions.create(model="qwen_vl", max_tokens=4, temperature=0,
                                          messages=[{"role": "user", "content": two_images}])
    assert both.usage.prompt_tokens > one.usage.prompt_tokens  # the second image reached the model
    video = ms.data_url(ms.video("mp4", frames=8), "video/mp4")
    clip = client.chat.completions.create(model="qwen_vl", max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}},
                                     {"type": "text", "text": "what happens?"}]}])
    frames = [ms.data_url(ms.png(64, 48, color=(30 * i, 0, 0)), "image/png") for i in range(4)]
    listed = client.chat.completions.create(model="qwen_vl", max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "what happens?"}]}])
    text_only = client.chat.completions.create(model="qwen_vl", max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": "what happens?"}])
    assert clip.usage.prompt_tokens > text_only.usage.prompt_tokens
    assert listed.usage.prompt_tokens > text_only.usage.prompt_tokens


def test_omni_takes_image_video_and_audio_at_once(client):
    video = ms.data_url(ms.video("mp4", frames=4), "video/mp4")
    parts = [{"type": "image_url", "image_url": {"url": image_url()}},
             {"type": "video_url", "video_url": {"url": video}}, audio_part(), {"type": "text", "text": "all?"}]
    everything = client.chat.completions.create(model="qwen_omni", max_tokens=4, temperature=0,
                                                messages=[{"role": "user", "content": parts}])
    for dropped in range(3):
        fewer = client.chat.completions.create(model="qwen_omni", max_tokens=4, temperature=0, messages=[
            {"role": "user", "content": [p for i, p in enumerate(parts) if i != dropped]}])
        assert fewer.usage.prompt_tokens < everything.usage.prompt_tokens, f"part {dropped} did not reach the model"


@pytest.mark.parametrize("key", ["deepseek", "qwen_vl"])
def test_multi_turn_history_reaches_the_model(client, key):
    last = {"role": "user", "content": "and now?"}
    alone = client.chat.completions.create(model=key, max_tokens=4, temperature=0, messages=[last])
    history = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": user_content(key)},
               {"role": "assistant", "content": "a short answer"}, last]
    with_history = client.chat.completions.create(model=key, max_tokens=4, temperature=0, messages=history)
    assert with_history.usage.prompt_tokens > alone.usage.prompt_tokens + 5
    developer = client.chat.completions.create(model=key, max_tokens=4, temperature=0,
                                               messages=[{"role": "developer", "content": "You answer briefly."}] + history[1:])
    assert developer.usage.prompt_tokens == with_history.usage.prompt_tokens  # developer is the system role


def test_reasoning_is_split_into_reasoning_content(client):
    messages = [{"role": "user", "content": THINK_PROMPT}]
    plain = client.chat.completions.create(model="thinker", messages=messages, max_tokens=16, temperature=0)
    message = plain.choices[0].message
    reasoning = message.model_extra.get("reasoning_content")
    assert reasoning and message.content and "<think>" not in message.content + reasoning
    chunks = list(client.chat.completions.create(model="thinker", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed_reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    streamed_content = "".join(d.content or "" for d in deltas)
    assert streamed_reasoning.strip() == reasoning and streamed_content.strip().endswith(message.content)


def test_responses_carry_the_reasoning_as_a_reasoning_item(client):
    """/v1/responses (tests/test_responses_api.py) on this module's thinker: reasoning before the message."""
    plain = client.chat.completions.create(model="thinker", messages=[{"role": "user", "content": THINK_PROMPT}],
                                           max_tokens=16, temperature=0).choices[0].message
    response = client.responses.create(model="thinker", input=THINK_PROMPT, max_output_tokens=16, temperature=0)
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == plain.model_extra["reasoning_content"]
    assert message.type == "message" and response.output_text == plain.content
    events = list(client.responses.create(model="thinker", input=THINK_PROMPT, max_output_tokens=16, temperature=0,
                                          stream=True))
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    said = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert thought.strip() == reasoning.content[0].text and said.strip().endswith(message.content[0].text)
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["reasoning", "message"] and events[-1].response.output[0].type == "reasoning"


def test_stop_strings_end_generation_and_are_not_returned(client):
    messages = [{"role": "user", "content": "tell me something"}]
    full = client.chat.completions.create(model="deepseek", messages=messages, max_tokens=12, temperature=0)
    words = full.choices[0].message.content.split()
    assert len(words) >= 4
    stop = " " + words[2]
    cut = client.chat.completions.create(model="deepseek", messages=messages, max_tokens=12, temperature=0,
                                         stop=[stop, "never appears"])
    assert cut.choices[0].message.content == " ".join(words[:2]) and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < full.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="deepseek", messages=messages, max_tokens=12, temperature=0,
                                                 stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == " ".join(words[:2])


def test_legacy_completions_plain_and_streamed(client):
    plain = client.completions.create(model="deepseek", prompt="once upon a time", max_tokens=5, temperature=0)
    assert plain.object == "text_completion" and plain.choices[0].text and plain.usage.completion_tokens == 5
    streamed = list(client.completions.create(model="deepseek", prompt="once upon a time", max_tokens=5,
                                              temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed).strip() == plain.choices[0].text
    chat = client.chat.completions.create(model="deepseek", max_tokens=5, temperature=0,
                                          messages=[{"role": "user", "content": "once upon a time"}])
    assert plain.usage.prompt_tokens < chat.usage.prompt_tokens  # no chat template around the prompt


def test_transcription_json_and_text(client, server):
    audio = ms.wav(0.6, rate=16000, channels=1)
    result = client.audio.transcriptions.create(model="qwen_audio", file=("clip.wav", audio))
    assert isinstance(result.text, str) and result.text
    text = requests.post(server.url + "/v1/audio/transcriptions", data={"model": "qwen_audio",
                         "response_format": "text"}, files={"file": ("clip.wav", audio)}, timeout=60)
    assert text.status_code == 200 and text.headers["Content-Type"].startswith("text/plain")
    assert text.text == result.text
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.transcriptions.create(model="deepseek", file=("clip.wav", audio))
    assert refused.value.body["param"] == "model"


@pytest.mark.parametrize("call,status,param", [
    (dict(model="nope"), 404, None),
    (dict(model="deepseek", max_tokens=0), 400, "max_tokens"),
    (dict(model="deepseek", temperature=7), 400, "temperature"),
    (dict(model="deepseek", n=0), 400, "n"),
    (dict(model="deepseek", presence_penalty=2.5), 400, "presence_penalty"),
    (dict(model="deepseek", logit_bias={"abc": 1}), 400, "logit_bias.abc"),
    (dict(model="deepseek", stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (dict(model="deepseek", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}]}]), 400, "messages[0].content[0].image_url"),
    (dict(model="qwen_vl", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}]}]), 400,
     "messages[0].content[0].image_url"),
    (dict(model="deepseek", messages=[{"role": "function", "content": "x"}]), 400, "messages[0].role"),
    (dict(model="deepseek", messages=[{"role": "tool", "content": "x"}]), 400, "messages[0].tool_call_id"),
])
def test_errors_come_in_openais_shape(client, call, status, param):
    kwargs = dict(messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    kwargs.update(call)
    with pytest.raises(openai.APIStatusError) as failure:
        client.chat.completions.create(**kwargs)
    error = failure.value
    assert error.status_code == status
    assert set(error.body) >= {"message", "type", "param", "code"} and error.body["param"] == param
    assert error.body["type"] == "invalid_request_error" and error.body["message"]


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}/cat.png", "http://localhost:{port}/cat.png",
                                 "http://169.254.169.254/latest/meta-data", "file:///etc/passwd"])
def test_urls_to_loopback_metadata_or_files_are_refused_with_the_reason(server, url):
    """Remote media are enabled on this server; these URLs are still refused, before any connection."""
    body = {"model": "qwen_vl", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url.format(port=server.port)}}, {"type": "text", "text": "?"}]}]}
    response = requests.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "url_refused", error
    assert error["param"] == "messages[0].content[0].image_url"
    assert any(word in error["message"] for word in ("loopback", "link-local", "metadata", "scheme")), error


def test_api_token_guards_v1(start_server):
    guarded = start_server(API_TOKEN="v1-secret")
    anonymous = openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        anonymous.models.list()
    assert refused.value.status_code == 401 and refused.value.body["type"] == "authentication_error"
    allowed = openai.OpenAI(base_url=guarded.url + "/v1", api_key="v1-secret", max_retries=0)
    assert allowed.chat.completions.create(model="deepseek", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2).choices[0].message.content is not None


def engine(server, key="deepseek") -> dict:
    return requests.get(server.url + "/admin/model_status", timeout=10).json()["models"][key]["engine"]



@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_stops_its_generation(server, stream):
    requests.post(server.url + "/v1/chat/completions", json={"model": "deepseek", "max_tokens": 2,
                  "messages": [{"role": "user", "content": "warm"}]}, timeout=60)
    before = engine(server)["tokens_generated"]
    body = json.dumps({"model": "deepseek", "max_tokens": 8000, "temperature": 0, "stream": stream,
                       "messages": [{"role": "user", "content": "tell a very long story"}]}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert wait_for(lambda: engine(server)["running_batch"] == 1), "the request never started"
        if stream:
            assert raw.recv(4096)  # the first chunks arrived
        time.sleep(0.2)
    assert wait_for(lambda: engine(server)["running_batch"] == 0, timeout=5), "generation went on"
    stopped_at = engine(server)["tokens_generated"]
    time.sleep(0.5)
    assert engine(server)["tokens_generated"] == stopped_at  # nothing more is being generated
    assert stopped_at - before < 8000
