"""utils/api/tool_parsers.py: each format whole and streamed in random cuts, malformed calls kept as content,
partial tags held back, and the format read from a checkpoint's files."""
from __future__ import annotations

import json
import random

import pytest

from utils.api.tool_parsers import FORMATS, ToolCallStream, checkpoint_tool_support, detect_format, parse

DS_BEGIN, DS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


def ds_v3(name: str, args: str) -> str:
    return f"{DS_CALL}function{DS_SEP}{name}\n```json\n{args}\n```{DS_CALL_END}"


WEATHER = '{"city": "Paris", "days": [1, 2.5e3, -0.5], "metric": true, "note": null}'
TRICKY = '{"text": "a</tool_call>b \\"q\\" caf\\u00e9 ☕ [TOOL_CALLS] }{", "nested": {"x": [{"y": {}}]}}'

# (format, text, content, [(name, arguments as written)])
CASES = [
    ("hermes", f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>', None,
     [("get_weather", WEATHER)]),
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
               '<tool_call>{"arguments": {"k": "v"}, "name": "b"}</tool_call>', "Let me check.",
     [("a", "{}"), ("b", '{"k": "v"}')]),
    ("hermes", f'<tool_call>{{"name": "echo", "arguments": {TRICKY}}}</tool_call>', None, [("echo", TRICKY)]),
    ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', None, [("f", '{"a": 1}')]),
    ("hermes", '<tool_call>{"name": "ping"}</tool_call> done', "done", [("ping", "{}")]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1}}', None, [("f", '{"a": 1}')]),  # no closing tag
    ("hermes", "Plain answer: 3 < 4 and <b>bold</b>, <tool without a call.", "Plain answer: 3 < 4 and <b>bold</b>, "
                                                                             "<tool without a call.", []),
    ("deepseek", f"{DS_BEGIN}{ds_v3('get_weather', WEATHER)}{DS_END}", None, [("get_weather", WEATHER)]),
    ("deepseek", f"I'll look.{DS_BEGIN}{ds_v3('a', '{}')}\n{ds_v3('b', TRICKY)}{DS_END}", "I'll look.",
     [("a", "{}"), ("b", TRICKY)]),
    ("deepseek", f'{DS_BEGIN}{DS_CALL}get_weather{DS_SEP}{{"city": "Paris"}}{DS_CALL_END}{DS_END}', None,  # V3.1
     [("get_weather", '{"city": "Paris"}')]),
    ("deepseek", f'{DS_BEGIN} {DS_CALL} function {DS_SEP} lookup_weather {{"city": "Paris"}} {DS_CALL_END} {DS_END}',
     None, [("lookup_weather", '{"city": "Paris"}')]),  # as a WordPiece tokenizer decodes it (spaces between tokens)
    ("deepseek", "No tools needed.", "No tools needed.", []),
    ("llama3_json", f'{{"name": "get_weather", "parameters": {WEATHER}}}', None, [("get_weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}', None,
     [("a", "{}"), ("b", '{"x": 1}')]),
    ("llama3_json", 'Sure <|python_tag|>{"type": "function", "name": "a", "parameters": {"q": "{}"}}', "Sure",
     [("a", '{"q": "{}"}')]),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),   # JSON that is no call stays content
    ("llama3_json", "The set is {1, 2}.", "The set is {1, 2}.", []),
    ("mistral", f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {WEATHER}}}]', None, [("get_weather", WEATHER)]),
    ("mistral", 'Sure. [TOOL_CALLS] [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": [1, {"y": null}]}}]',
     "Sure.", [("a", "{}"), ("b", '{"x": [1, {"y": null}]}')]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]now[ARGS]{}', None,
     [("get_weather", '{"city": "Paris"}'), ("now", "{}")]),
    ("mistral", '[TOOL_CALLS]get_weather[CALL_ID]abc123XYZ[ARGS]{"city": "Paris"}', None,
     [("get_weather", '{"city": "Paris"}')]),
]

# Malformed before the call could be streamed: whole and streamed alike, the text stays content.
MALFORMED = [
    ("hermes", "<tool_call>{\"name\": get_weather}</tool_call>"),
    ("hermes", "<tool_call>not json at all</tool_call> ok"),
    ("hermes", '<tool_call>{"name": "f", "arguments": 5}</tool_call>'),          # arguments that are no object
    ("hermes", '<tool_call>{"name": "bad name!", "arguments": {}}</tool_call>'),
    ("deepseek", f"{DS_CALL}function get_weather {{}}{DS_CALL_END}"),            # outside the block: plain text
    ("llama3_json", '{"name": 5, "parameters": {}}'),
    ("mistral", "[TOOL_CALLS]get weather[ARGS]{}"),
    ("mistral", "[TOOL_CALLS][oops]"),
]


def replay(fmt: str, pieces: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """Streams the pieces and rebuilds what a client would: content, and per call index its name and
    arguments; each call's id, type and name must come exactly once."""
    stream = ToolCallStream(fmt)
    deltas = [d for piece in pieces for d in stream.feed(piece)] + stream.finish()
    content = ""
    calls: dict[int, dict] = {}
    for delta in deltas:
        assert set(delta) <= {"content", "tool_calls"} and len(delta) == 1
        if "content" in delta:
            assert delta["content"]
            content += delta["content"]
        for call in delta.get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"ids": [], "names": [], "arguments": ""})
            if "id" in call:
                assert call["type"] == "function" and call["id"].startswith("call_") or fmt == "mistral"
                entry["ids"].append(call["id"])
            if "name" in call["function"]:
                entry["names"].append(call["function"]["name"])
            entry["arguments"] += call["function"].get("arguments", "")
    assert sorted(calls) == list(range(len(calls)))
    for entry in calls.values():
        assert len(entry["ids"]) == 1 and len(entry["names"]) == 1
    return content or None, [(calls[i]["names"][0], calls[i]["arguments"]) for i in sorted(calls)]


def cuts(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    points = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, max(1, len(text) // 3)))))
    return [text[a:b] for a, b in zip([0] + points, points + [len(text)])]


def chunkings(text: str):
    yield [text]
    yield list(text)
    for seed in range(20):
        yield cuts(text, seed)


@pytest.mark.parametrize("fmt,text,content,calls", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_whole_and_streamed(fmt, text, content, calls):
    parsed = parse(fmt, text)
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == calls
    for call in parsed.tool_calls:
        assert isinstance(json.loads(call.arguments), dict)
        assert call.to_openai()["type"] == "function" and call.to_openai()["function"]["name"] == call.name
    assert len({c.id for c in parsed.tool_calls}) == len(calls)
    for pieces in chunkings(text):
        assert replay(fmt, pieces) == (content, calls), pieces


@pytest.mark.parametrize("fmt,text", MALFORMED, ids=[f"{m[0]}-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_calls_stay_content(fmt, text):
    parsed = parse(fmt, text)
    assert parsed.tool_calls == [] and parsed.content == text.strip()
    for pieces in chunkings(text):
        assert replay(fmt, pieces) == (text.strip(), []), pieces


def test_a_broken_call_among_good_ones_is_content_where_it_stood():
    text = ('<tool_call>{"name": "a", "arguments": {}}</tool_call>'
            '<tool_call>{"name": oops}</tool_call>'
            '<tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call>')
    parsed = parse("hermes", text)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("a", "{}"), ("b", '{"x": 1}')]
    assert parsed.content == '<tool_call>{"name": oops}</tool_call>'
    broken_args = f'{DS_BEGIN}{ds_v3("a", "{}")}{ds_v3("b", "{oops}")}{DS_END}'
    parsed = parse("deepseek", broken_args)
    assert [c.name for c in parsed.tool_calls] == ["a"] and parsed.content == ds_v3("b", "{oops}")


def test_partial_tags_are_held_back_until_the_next_piece_tells():
    stream = ToolCallStream("hermes")
    assert stream.feed("Hello <tool") == [{"content": "Hello"}]
    assert stream.feed("_call>") == []
    assert stream.feed('{"name": "f"') == []                     # no arguments yet: not committed
    deltas = stream.feed(', "arguments": {"a"')
    header, args = deltas[0]["tool_calls"]
    assert header["function"] == {"name": "f", "arguments": ""} and header["index"] == 0
    assert args == {"index": 0, "function": {"arguments": '{"a"'}}
    assert stream.feed(": 1}}</tool") == [{"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}]
    assert stream.feed("_call> bye") == [{"content": "  bye"}] and stream.called  # "Hello " + " bye"
    not_a_tag = ToolCallStream("hermes")
    assert not_a_tag.feed("a <tool") == [{"content": "a"}]
    assert not_a_tag.feed("box>") == [{"content": " <toolbox>"}]
    spaces = ToolCallStream("mistral")
    assert spaces.feed("  ok  ") == [{"content": "ok"}] and spaces.feed("then") == [{"content": "  then"}]


def test_a_call_that_breaks_after_it_was_streamed_keeps_what_was_sent():
    text = '<tool_call>{"name": "f", "arguments": {"a": 1, oops}}</tool_call> after'
    assert parse("hermes", text).tool_calls == []                 # whole: the text is content
    content, calls = replay("hermes", list(text))
    assert calls == [("f", '{"a": 1, ')] and content == "after"   # streamed: committed, cut where it broke
    truncated = '<tool_call>{"name": "f", "arguments": {"a": 1'     # generation cut short (finish_reason length)
    assert parse("hermes", truncated).tool_calls == []
    assert replay("hermes", [truncated[:30], truncated[30:]])[1] == [("f", '{"a": 1')]


def test_mistral_ids_are_nine_letters_and_digits():
    calls = parse("mistral", '[TOOL_CALLS][{"name": "a", "arguments": {}}]').tool_calls
    assert len(calls[0].id) == 9 and calls[0].id.isalnum()


def test_format_detection_from_templates_and_tokens(models_dir):
    qwen3 = "{%- if tools %}...<tool_call>\\n{\"name\": <function-name>...{%- endif %}"
    assert detect_format(qwen3).format == "hermes" and detect_format(qwen3).renders_tools
    assert detect_format("{{ messages }}", ["[TOOL_CALLS]", "[ARGS]"]).format == "mistral"
    assert detect_format("{% for m in messages %}{{ m.content }}{% endfor %}").renders_tools is False
    llama = '{%- if tools is not none %}{{- "ipython" }}{"name": function name, "parameters": ...}{%- endif %}'
    assert detect_format(llama, ["<|eot_id|>"]).format == "llama3_json"
    assert detect_format("no tools here", ["<|python_tag|>"]).format == "llama3_json"
    demo = models_dir / "demo"
    deepseek = checkpoint_tool_support(demo / "deepseek")
    assert deepseek.format == "deepseek" and deepseek.renders_tools
    vision = checkpoint_tool_support(demo / "qwen_vl")
    assert vision.renders_tools is False
    assert set(FORMATS) == {"hermes", "deepseek", "llama3_json", "mistral"}


SNIPPETS = {
    "hermes": {"call": ['<tool_call>{"name": "a", "arguments": {"x": [1, "y"]}}</tool_call>',
                        '<tool_call>\n{"arguments": {}, "name": "b_2"}\n</tool_call>',
                        f'<tool_call>{{"name": "echo", "arguments": {TRICKY}}}</tool_call>'],
               "text": ["Sure, ", "done.", " 3 < 4 ", "<b>bold</b>", "\n\n", "<tool", "call>"],
               "broken": ["<tool_call>{name: 1}</tool_call>", "<tool_call>[]</tool_call>"]},
    "deepseek": {"call": [f"{DS_BEGIN}{ds_v3('a', '{}')}{DS_END}", f"{DS_BEGIN}{ds_v3('b', TRICKY)}\n{ds_v3('c', '[]')}{DS_END}",
                          f'{DS_BEGIN}{DS_CALL}d{DS_SEP}{{"k": 1}}{DS_CALL_END}{DS_END}'],
                 "text": ["I will look. ", "ok", " <｜tool", "\n", f"{DS_BEGIN}stray words{DS_END}",
                          f"{DS_BEGIN}a{ds_v3('e', '{}')}b{DS_END}"],
                 "broken": [f"{DS_BEGIN}{DS_CALL}function no separator{DS_CALL_END}{DS_END}"]},
}


@pytest.mark.parametrize("fmt", sorted(SNIPPETS))
def test_random_compositions_stream_like_they_parse(fmt):
    rng = random.Random(fmt)
    pool = SNIPPETS[fmt]
    for _ in range(150):
        kinds = [rng.choice(["call", "text", "broken"]) for _ in range(rng.randint(1, 5))]
        text = "".join(rng.choice(pool[kind]) for kind in kinds)
        parsed = parse(fmt, text)
        expected = (parsed.content, [(c.name, c.arguments) for c in parsed.tool_calls])
        for seed in range(3):
            assert replay(fmt, cuts(text, seed)) == expected, text
