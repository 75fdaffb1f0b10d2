"""Structured outputs and forced tool calls: grammar-constrained decoding (utils/engine/grammar.py) on
the random-weight demo models, through the Flask test client, then the openai client's `parse`
against a live server. The random weights write whatever the grammar leaves them, so every check
is that the text parses and validates; schemas bound their strings so a row can finish."""
from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pydantic
import pytest

from tests.media_samples import png

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pet": {"enum": ["cat", "dog", "fish"]},
    "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
    "required": ["name", "age", "pet", "tags"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "lookup_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "strict": True, "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def chat(client, content="describe a person", model="deepseek", **body):
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 64,
            "temperature": 0, **body}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)[:400]
    return response.get_json()["choices"][0]


def test_json_schema_output_validates_and_the_row_stops_with_its_grammar(client):
    choice = chat(client, response_format=schema_format(PERSON))
    jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
    assert choice["finish_reason"] == "stop"
    free = chat(client)["message"]["content"]  # the same request unconstrained: words, not JSON
    with pytest.raises(ValueError):
        json.loads(free)


def test_legacy_completions_take_a_schema_too(client):
    body = {"model": "deepseek", "prompt": "a person:", "max_tokens": 64, "temperature": 0,
            "response_format": schema_format(PERSON)}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    jsonschema.validate(json.loads(response.get_json()["choices"][0]["text"]), PERSON)


def test_json_object_gives_an_object(client):
    choice = chat(client, response_format={"type": "json_object"}, max_tokens=6)
    text = choice["message"]["content"]
    assert text.lstrip().startswith("{")
    if choice["finish_reason"] == "stop":  # random weights may still be inside a string at max_tokens
        assert isinstance(json.loads(text), dict)


def test_constrained_and_free_rows_share_a_batch_and_free_rows_keep_their_solo_answers(client):
    prompts = [f"tell me about {word}" for word in ("cats", "the sea", "music", "a red car", "trees", "snow")]
    solo = {p: chat(client, p)["message"]["content"] for p in prompts}
    jobs = [(p, None) for p in prompts] + [(p, schema_format(PERSON)) for p in prompts]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: chat(client, job[0], **({"response_format": job[1]} if job[1] else {})),
                                jobs))
    for (prompt, constrained), choice in zip(jobs, answers):
        if constrained:
            jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
        else:
            assert choice["message"]["content"] == solo[prompt]
    engine = client.get("/admin/model_status").get_json()["models"]["deepseek"]["engine"]
    assert engine["peak_batch"] > 1


def test_a_vision_language_model_answers_in_the_schema(client):
    image = "data:image/png;base64," + base64.b64encode(png()).decode()
    content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "who is this?"}]
    choice = chat(client, content, model="qwen_vl", response_format=schema_format(PERSON))
    jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)


@pytest.mark.parametrize("tool_choice,names", [
    ("required", {"lookup_weather", "add"}),
    ({"type": "function", "function": {"name": "add"}}, {"add"})])
def test_forced_tool_calls_validate_against_their_schemas(client, tool_choice, names):
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, ADD)}
    choice = chat(client, "weather in paris and 2+3?", tools=[WEATHER, ADD], tool_choice=tool_choice,
                  parallel_tool_calls=False, max_tokens=96)
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] in names
    jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])


def test_a_forced_call_streams_as_tool_call_deltas(client):
    body = {"model": "deepseek", "messages": [{"role": "user", "content": "2+3?"}], "max_tokens": 96,
            "temperature": 0, "tools": [ADD], "tool_choice": "required", "stream": True}
    events = client.post("/v1/chat/completions", json=body).get_data(as_text=True).split("\n\n")
    chunks = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    calls = [c for chunk in chunks for c in chunk["choices"][0]["delta"].get("tool_calls", [])]
    assert [c["function"]["name"] for c in calls if c["function"].get("name")] == ["add"]
    jsonschema.validate(json.loads("".join(c["function"].get("arguments", "") for c in calls)),
                        ADD["function"]["parameters"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}}, "response_format.json_schema.name"),
    ({"response_format": schema_format({"type": "object", "properties": {"a": {"type": 5}}})},
     "response_format.json_schema.schema"),
    ({"response_format": schema_format({"type": "string", "pattern": "("})}, "response_format.json_schema.schema"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [ADD]}, "tools[0].function.strict"),
])
def test_bad_schemas_are_400_before_the_model_loads(client, body, param):
    client.post("/admin/models/qwen_vl/unload")
    request = {"model": "qwen_vl", "messages": [{"role": "user", "content": "x"}], **body}
    if "tools" in body:
        request["model"] = "deepseek"
    response = client.post("/v1/chat/completions", json=request)
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    assert response.get_json()["error"]["param"] == param
    assert client.get("/admin/model_status").get_json()["models"]["qwen_vl"]["loaded"] is False


# ------------------------------------------------------------------ the openai client's parse, live

class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    age: int = pydantic.Field(ge=0, le=120)
    pet: str = pydantic.Field(json_schema_extra={"enum": ["cat", "dog", "fish"]})


@pytest.fixture(scope="module")
def live(start_server):
    server = start_server()
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_parse_with_a_pydantic_model(live):
    completion = live.chat.completions.parse(model="deepseek", messages=[{"role": "user", "content": "a person"}],
                                             response_format=Person, temperature=0, max_tokens=64)
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person) and person.pet in ("cat", "dog", "fish") and 0 <= person.age <= 120
