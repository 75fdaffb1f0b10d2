"""n, prompt lists, logprobs, echo and the sampling parameters through a real server process, driven by
the official openai client: one server for the module. Greedy choices equal their solo answers."""
from __future__ import annotations

import openai
import pytest
import requests

HI = [{"role": "user", "content": "tell me about the sea"}]


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(MAX_LOADED_MODELS=2, MODEL_IDLE_TIMEOUT=600)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(models_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(models_dir / "demo" / "deepseek")


def test_n_greedy_choices_equal_the_solo_answer_and_usage_is_summed(client):
    solo = client.chat.completions.create(model="deepseek", messages=HI, max_tokens=8, temperature=0)
    three = client.chat.completions.create(model="deepseek", messages=HI, max_tokens=8, temperature=0, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {solo.choices[0].message.content}
    assert [c.finish_reason for c in three.choices] == [solo.choices[0].finish_reason] * 3
    assert three.usage.prompt_tokens == solo.usage.prompt_tokens  # the prompt counts once
    assert three.usage.completion_tokens == 3 * solo.usage.completion_tokens


def test_seeded_choices_differ_from_each_other_and_repeat(client):
    ask = dict(model="deepseek", messages=HI, max_tokens=10, temperature=1.0, seed=5, n=3)
    first = [c.message.content for c in client.chat.completions.create(**ask).choices]
    again = [c.message.content for c in client.chat.completions.create(**ask).choices]
    alone = client.chat.completions.create(**dict(ask, n=1)).choices[0].message.content
    assert first == again and first[0] == alone
    assert len(set(first)) > 1, "each choice draws from its own seed"


def test_streamed_choices_carry_their_index_logprobs_and_usage(client):
    whole = client.chat.completions.create(model="deepseek", messages=HI, max_tokens=6, temperature=0, n=2,
                                           logprobs=True, top_logprobs=2)
    stream = client.chat.completions.create(model="deepseek", messages=HI, max_tokens=6, temperature=0, n=2,
                                            logprobs=True, top_logprobs=2, stream=True,
                                            stream_options={"include_usage": True})
    text, tokens, finish, usage = {0: "", 1: ""}, {0: [], 1: []}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text[choice.index] += choice.delta.content or ""
            if choice.logprobs is not None:
                tokens[choice.index] += [(t.token, round(t.logprob, 4)) for t in choice.logprobs.content]
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    for choice in whole.choices:
        assert text[choice.index] == choice.message.content
        assert tokens[choice.index] == [(t.token, round(t.logprob, 4)) for t in choice.logprobs.content]
        assert finish[choice.index] == choice.finish_reason
        assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
                   for t in choice.logprobs.content)
        assert all(t.bytes == list(t.token.encode()) for t in choice.logprobs.content)
    assert len(whole.choices[0].logprobs.content) == whole.usage.completion_tokens // 2
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_a_list_of_prompts_answers_prompt_major_and_ids_are_prompts_too(client, tokenizer):
    prompts = ["the old lighthouse", "a song about rain"]
    solo = [client.completions.create(model="deepseek", prompt=p, max_tokens=5, temperature=0).choices[0].text
            for p in prompts]
    batch = client.completions.create(model="deepseek", prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [solo[0], solo[0], solo[1], solo[1]]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    as_ids = client.completions.create(model="deepseek", prompt=ids, max_tokens=5, temperature=0)
    assert [c.text for c in as_ids.choices] == solo
    assert as_ids.usage.prompt_tokens == sum(map(len, ids))


def test_completion_logprobs_and_echo_in_the_legacy_shape(client, tokenizer):
    prompt = "the old lighthouse"
    plain = client.completions.create(model="deepseek", prompt=prompt, max_tokens=4, temperature=0, logprobs=2)
    logprobs = plain.choices[0].logprobs
    assert len(logprobs.tokens) == plain.usage.completion_tokens == len(logprobs.token_logprobs)
    assert all(len(top) <= 3 and token in top for token, top in zip(logprobs.tokens, logprobs.top_logprobs))
    echoed = client.completions.create(model="deepseek", prompt=prompt, max_tokens=4, temperature=0, logprobs=2,
                                       echo=True)
    choice = echoed.choices[0]
    prompt_ids = tokenizer(prompt)["input_ids"]
    prompt_tokens = tokenizer.convert_ids_to_tokens(prompt_ids)
    assert choice.text.startswith(prompt) and choice.text[len(prompt):] == plain.choices[0].text
    assert choice.logprobs.tokens[:len(prompt_tokens)] == [tokenizer.decode([i]) for i in prompt_ids]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in choice.logprobs.token_logprobs[1:])
    assert choice.logprobs.token_logprobs[len(prompt_tokens):] == logprobs.token_logprobs


def test_logit_bias_and_penalties_reach_the_engine(client, server, tokenizer):
    forced = tokenizer.convert_tokens_to_ids("river")
    biased = client.chat.completions.create(model="deepseek", messages=HI, max_tokens=4, temperature=0,
                                            logit_bias={str(forced): 100}, logprobs=True)
    assert [t.token for t in biased.choices[0].logprobs.content] == ["river"] * 4
    plain = client.completions.create(model="deepseek", prompt="the sea", max_tokens=12, temperature=0)
    penalised = client.completions.create(model="deepseek", prompt="the sea", max_tokens=12, temperature=0,
                                          presence_penalty=2.0, frequency_penalty=2.0)
    words, plain_words = penalised.choices[0].text.split(), plain.choices[0].text.split()
    assert words != plain_words and len(set(words)) > len(set(plain_words))  # fewer repeats
    generated = requests.post(server.url + "/generate/deepseek", json={
        "prompt": "hi", "max_new_tokens": 3, "temperature": 0, "logit_bias": {str(forced): 100}}, timeout=60).json()
    assert generated["response"].split() == ["river"] * 3


@pytest.mark.parametrize("route,body,param", [
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": 1}, "logprobs"),
    ("chat", {"echo": True}, "echo"),
    ("chat", {"n": 0}, "n"),
    ("chat", {"n": 129}, "n"),
    ("chat", {"frequency_penalty": 2.5}, "frequency_penalty"),
    ("chat", {"min_p": 1.5}, "min_p"),
    ("chat", {"logit_bias": {"5": 101}}, "logit_bias.5"),
    ("chat", {"logit_bias": {"123456": 1}}, "logit_bias.123456"),
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"logprobs": True}, "logprobs"),
    ("completions", {"prompt": ["a"] * 40, "n": 2}, "n"),
    ("completions", {"prompt": [[1, 2], [3, 99999]]}, "prompt"),
    ("completions", {"prompt": [[1, 2]], "echo": True}, "echo"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"suffix": "x"}, "suffix"),
])
def test_what_cannot_be_served_is_refused_naming_the_parameter(server, route, body, param):
    base = {"model": "deepseek", "max_tokens": 2}
    base.update({"messages": HI} if route == "chat" else {"prompt": "hi"})
    response = requests.post(f"{server.url}/v1/{'chat/completions' if route == 'chat' else 'completions'}",
                             json={**base, **body}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
