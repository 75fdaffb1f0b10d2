"""Generated text -> OpenAI `tool_calls`, whole or streamed. No Flask, no torch.

Formats (the families we ship and the ones the model matrix adds; vLLM's parsers of the same names
were the reference for formats and edge cases):

    hermes       Qwen2.5 / Qwen3 / Hermes:  <tool_call>{"name": "f", "arguments": {...}}</tool_call>  (repeated)
    deepseek     DeepSeek V3 / R1-0528:      <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f
                                              ```json {...} ```<｜tool▁call▁end｜> ... <｜tool▁calls▁end｜>
                 and V3.1's                   <｜tool▁call▁begin｜>f<｜tool▁sep｜>{...}<｜tool▁call▁end｜>
    llama3_json  Llama 3.1+:                 [<|python_tag|>]{"name": "f", "parameters": {...}} [; {...}]
                 (without the tag only when the answer starts with the object)
    mistral      Mistral:                    [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]
                 and v11+ tokenizers'         [TOOL_CALLS]f[ARGS]{...}  (optionally f[CALL_ID]id[ARGS]{...})

`parse(fmt, text)` gives the content and the calls; a call whose JSON is malformed (or is not a call:
no string name, arguments not an object) stays in the content as written. A call's `arguments` is the
JSON text of its arguments exactly as the model wrote it (validated), or "{}" when it gave none.

`ToolCallStream` turns text pieces into OpenAI's deltas: content as it comes (a partial tag at the end
of a piece is held back until the next piece tells), each call's id, type and name once, then its
arguments in pieces as they arrive. Concatenated, the deltas equal `parse` of the whole text, for any
way of cutting it into pieces. The one exception: a call is committed once its name is known and its
arguments have begun; if its JSON breaks after that, the stream keeps the call with the arguments as
far as they were valid (what was sent cannot be taken back) where `parse` would leave it in the content.

`detect_format(chat_template, tokens)` picks the format from the checkpoint's chat template and its
tokenizer's tokens (not from the model key); `checkpoint_tool_support(folder)` reads them from the
files of a model folder (tokenizer_config.json, chat_template.jinja / .json, tokenizer.json).
"""
from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Iterator

from utils.hub.model_folder import ToolSupport, checkpoint_tool_support, detect_format  # what a folder holds

__all__ = ["FORMATS", "ParsedOutput", "ToolCall", "ToolCallStream", "ToolSupport", "checkpoint_tool_support",
           "detect_format", "parse"]

_WS = " \t\r\n"
_HEX = set("0123456789abcdefABCDEF")
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_NUMBER_CHARS = set("+-.eE0123456789")
_LITERALS = {"t": "true", "f": "false", "n": "null"}
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # OpenAI's function names (dots: some templates' namespaces)
ARGUMENT_KEYS = ("arguments", "parameters")   # Llama 3 writes "parameters"


# ------------------------------------------------------------------ JSON scanning with positions

class _Bad(Exception):
    """The text cannot continue as JSON at `pos`."""

    def __init__(self, pos: int) -> None:
        super().__init__(pos)
        self.pos = pos


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _string_end(text: str, i: int) -> int | None:
    """text[i] is '"': the index after the closing quote, or None when the text ends first."""
    j, n = i + 1, len(text)
    while j < n:
        c = text[j]
        if c == '"':
            return j + 1
        if c == "\\":
            if j + 1 >= n:
                return None
            escape = text[j + 1]
            if escape == "u":
                digits = text[j + 2:j + 6]
                if not all(d in _HEX for d in digits):
                    raise _Bad(j)
                if len(digits) < 4:
                    return None
                j += 6
                continue
            if escape not in '"\\/bfnrt':
                raise _Bad(j + 1)
            j += 2
            continue
        if c < " ":
            raise _Bad(j)
        j += 1
    return None


def _scalar_end(text: str, i: int, final: bool) -> int | None:
    """A number or literal at text[i]: the index after it, or None when the text may still extend it."""
    n = len(text)
    c = text[i]
    if c in _LITERALS:
        word = _LITERALS[c]
        got = text[i:i + len(word)]
        if got == word:
            return i + len(word)
        if len(got) < len(word) and word.startswith(got) and not final:
            return None
        raise _Bad(i)
    j = i
    while j < n and text[j] in _NUMBER_CHARS:
        j += 1
    run = text[i:j]
    if j == n and not final:  # the number may go on
        if _NUMBER.fullmatch(run) or _NUMBER.fullmatch(run + "0"):
            return None
        raise _Bad(i)
    if not _NUMBER.fullmatch(run):
        raise _Bad(i)
    return j


def scan_value(text: str, i: int, final: bool) -> int | None:
    """One JSON value from text[i] (whitespace before it skipped): the index after it, or None when the
    text ends inside a valid beginning of one. Raises _Bad at the first character that cannot continue."""
    stack: list[str] = []
    expect = "value"  # value | value_or_close | key | key_or_close | colon | comma_or_close
    n = len(text)
    while True:
        i = _skip_ws(text, i)
        if i >= n:
            return None
        c = text[i]
        end: int | None
        if expect in ("value", "value_or_close"):
            if c == "]" and expect == "value_or_close":
                stack.pop()
                end = i + 1
            elif c in "{[":
                stack.append(c)
                expect = "key_or_close" if c == "{" else "value_or_close"
                i += 1
                continue
            elif c == '"':
                end = _string_end(text, i)
            elif c in _LITERALS or c == "-" or c.isdigit():
                end = _scalar_end(text, i, final)
            else:
                raise _Bad(i)
            if end is None:
                return None
            i = end
            if not stack:
                return i
            expect = "comma_or_close"
        elif expect in ("key", "key_or_close"):
            if c == "}" and expect == "key_or_close":
                stack.pop()
                i += 1
                if not stack:
                    return i
                expect = "comma_or_close"
            elif c == '"':
                end = _string_end(text, i)
                if end is None:
                    return None
                i, expect = end, "colon"
            else:
                raise _Bad(i)
        elif expect == "colon":
            if c != ":":
                raise _Bad(i)
            i, expect = i + 1, "value"
        else:  # comma_or_close
            top = stack[-1]
            if c == ",":
                i, expect = i + 1, ("key" if top == "{" else "value")
            elif c == ("}" if top == "{" else "]"):
                stack.pop()
                i += 1
                if not stack:
                    return i
            else:
                raise _Bad(i)


@dataclass
class CallScan:
    """What is known of one call so far: its name, where its arguments' JSON lies, whether it is done."""
    start: int                      # where its raw text begins (its tag, or its object)
    name: str | None = None
    args_start: int | None = None   # the first character of the arguments value
    args_end: int | None = None     # just after it, once complete
    end: int | None = None          # just after the whole call (its closing tag where it has one)
    bad: int | None = None          # where it stopped being valid (a syntax error or not a call)
    call_id: str | None = None      # an id the model wrote (Mistral)

    def args_kind(self, text: str) -> str | None:
        return text[self.args_start] if self.args_start is not None and self.args_start < len(text) else None

    def committable(self, text: str) -> bool:
        """Enough is known to stream it: a name, and arguments begun (or the call over without them)."""
        return (self.bad is None and bool(self.name) and bool(FUNCTION_NAME.fullmatch(self.name))
                and (self.args_kind(text) in ("{", '"') or self.end is not None))

    def args_text(self, text: str, final: bool) -> str:
        """The arguments as known: the JSON text as written (a prefix while open); a string value is
        given once complete, decoded (some models write the arguments as a JSON string)."""
        kind = self.args_kind(text)
        if kind is None:
            return "{}" if final or self.end is not None else ""
        if kind == '"':
            if self.args_end is None:
                return ""
            return json.loads(text[self.args_start:self.args_end])
        stop = self.args_end if self.args_end is not None else (self.bad if self.bad is not None else len(text))
        return text[self.args_start:stop]

    def valid(self, text: str) -> bool:
        """A whole, well-formed call (what `parse` keeps as a call)."""
        if self.bad is not None or self.end is None or not self.name or not FUNCTION_NAME.fullmatch(self.name):
            return False
        kind = self.args_kind(text)
        if kind is None:
            return True
        if self.args_end is None:
            return False
        if kind == "n" and text[self.args_start:self.args_end] == "null":
            return True
        if kind != "{" and kind != '"':
            return False
        if kind == '"':  # arguments written as a JSON string: it must hold a JSON object
            try:
                return isinstance(json.loads(json.loads(text[self.args_start:self.args_end])), dict)
            except ValueError:
                return False
        return True

    def final_args(self, text: str) -> str:
        kind = self.args_kind(text)
        if kind is None or kind == "n":
            return "{}"
        return self.args_text(text, True)


def scan_call_object(text: str, i: int, final: bool) -> CallScan:
    """A JSON object at text[i] read as a call: "name" (a string) and "arguments" / "parameters";
    other keys are skipped ("id" is kept: Mistral writes its own)."""
    scan = CallScan(start=i)
    n = len(text)
    try:
        if i >= n:
            return scan
        if text[i] != "{":
            raise _Bad(i)
        i = _skip_ws(text, i + 1)
        if i < n and text[i] == "}":
            scan.end = i + 1
            return scan
        while i < n:
            if text[i] != '"':
                raise _Bad(i)
            key_end = _string_end(text, i)
            if key_end is None:
                return scan
            key = json.loads(text[i:key_end])
            i = _skip_ws(text, key_end)
            if i >= n:
                return scan
            if text[i] != ":":
                raise _Bad(i)
            value_start = _skip_ws(text, i + 1)
            if key in ARGUMENT_KEYS and scan.args_start is None:
                scan.args_start = value_start
            value_end = scan_value(text, value_start, final)
            if value_end is None:
                return scan
            if key in ARGUMENT_KEYS and scan.args_start == value_start:
                scan.args_end = value_end
            elif key == "name" or key == "id":
                value = json.loads(text[value_start:value_end])
                if not isinstance(value, str):
                    raise _Bad(value_start)
                if key == "name":
                    scan.name = value
                else:
                    scan.call_id = value
            i = _skip_ws(text, value_end)
            if i >= n:
                return scan
            if text[i] == "}":
                scan.end = i + 1
                return scan
            if text[i] != ",":
                raise _Bad(i)
            i = _skip_ws(text, i + 1)
    except _Bad as exc:
        scan.bad = exc.pos
    return scan


# ------------------------------------------------------------------ segments of a text

@dataclass
class Segment:
    """A stretch of the text: plain text (call is None) or one call's raw text."""
    start: int
    end: int                     # as far as it is resolved (a call still open: the text seen so far)
    call: CallScan | None = None


def _marker(text: str, marker: str, start: int, final: bool) -> tuple[int | None, int]:
    """(where `marker` begins at or after `start`, or None; where plain text must stop: at the marker,
    or, not final, where a beginning of the marker ends the text)."""
    found = text.find(marker, start)
    if found >= 0:
        return found, found
    if not final:
        for size in range(min(len(marker) - 1, len(text) - start), 0, -1):
            if marker.startswith(text[len(text) - size:]):
                return None, len(text) - size
    return None, len(text)


def _expect(text: str, i: int, literal: str, final: bool) -> int | None | bool:
    """literal at text[i]: the index after it; None: the text ends inside it (not final); False: something else."""
    got = text[i:i + len(literal)]
    if got == literal:
        return i + len(literal)
    if not final and len(got) < len(literal) and literal.startswith(got):
        return None
    return False


class ToolFormat:
    name = ""
    id_style = "openai"

    def segments(self, text: str, final: bool) -> list[Segment]:
        raise NotImplementedError

    def new_id(self) -> str:
        if self.id_style == "mistral":  # Mistral's templates take 9 letters and digits, nothing else
            return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
        return f"call_{secrets.token_hex(12)}"


def _text(segments: list[Segment], start: int, end: int) -> None:
    if end > start:
        segments.append(Segment(start, end))


class HermesFormat(ToolFormat):
    """<tool_call>{json}</tool_call>, any number, text around them. The call's object is read as JSON
    first, so a closing tag inside one of its strings does not cut it."""
    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def segments(self, text: str, final: bool) -> list[Segment]:
        out: list[Segment] = []
        i = 0
        while i < len(text):
            found, stop = _marker(text, self.OPEN, i, final)
            _text(out, i, stop)
            if found is None:
                break
            body = _skip_ws(text, found + len(self.OPEN))
            scan = scan_call_object(text, body, final)
            scan.start = found
            if scan.bad is None and scan.end is not None:
                after = _skip_ws(text, scan.end)
                closed = _expect(text, after, self.CLOSE, final)
                if closed is None:                      # the tag is arriving
                    out.append(Segment(found, len(text), scan))
                    break
                if closed is False and after < len(text):
                    scan.bad = after                     # something else between the object and its tag
                else:
                    scan.end = closed if closed else after
                    out.append(Segment(found, scan.end, scan))
                    i = scan.end
                    continue
            if scan.bad is None:                         # still open (final: cut short, so content)
                out.append(Segment(found, len(text), scan))
                break
            close, stop = _marker(text, self.CLOSE, scan.bad, final)  # broken: it lasts to its closing tag
            end = close + len(self.CLOSE) if close is not None else stop
            scan.end = end if close is not None or final else None
            out.append(Segment(found, end, scan))
            if close is None:
                break
            i = end
        return out


class DeepSeekFormat(ToolFormat):
    """DeepSeek V3 / R1 (type, name, fenced JSON) and V3.1 (name, JSON) between the call tokens; the
    outer calls_begin / calls_end tokens are structure and never content."""
    name = "deepseek"
    BEGIN, END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
    CALL, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"

    def segments(self, text: str, final: bool) -> list[Segment]:
        out: list[Segment] = []
        i = 0
        while i < len(text):
            found, stop = _marker(text, self.BEGIN, i, final)
            _text(out, i, stop)
            if found is None:
                return out
            i = found + len(self.BEGIN)
            while True:  # inside the calls block
                j = _skip_ws(text, i)
                if j >= len(text):
                    return out
                ended = _expect(text, j, self.END, final)
                if ended is None:
                    return out
                if ended:
                    i = ended
                    break
                began = _expect(text, j, self.CALL, final)
                if began is None:
                    return out
                if began is False:  # text inside the block that is no call: content, up to the next token
                    nxt = min(_marker(text, self.CALL, j, final)[1], _marker(text, self.END, j, final)[1])
                    _text(out, j, nxt)
                    if nxt >= len(text):
                        return out
                    i = nxt
                    continue
                scan = self._call(text, j, began, final)
                out.append(Segment(j, scan.end if scan.end is not None else len(text), scan))
                if scan.end is None:
                    return out
                i = scan.end
        return out

    def _call(self, text: str, start: int, i: int, final: bool) -> CallScan:
        scan = CallScan(start=start)
        sep = text.find(self.SEP, i)
        close = text.find(self.CALL_END, i)
        if sep < 0 or (0 <= close < sep):
            if close < 0 and not final:  # the separator may still come
                return scan
            return self._broken(scan, text, close if close >= 0 else i, final)
        head = text[i:sep].strip()
        j = _skip_ws(text, sep + len(self.SEP))
        if head == "function":  # V3: the name, then the arguments fenced as ```json
            name_end = j
            while name_end < len(text) and text[name_end] not in _WS and text[name_end] not in "`{":
                name_end += 1
            if name_end >= len(text) and not final:
                return scan
            scan.name = text[j:name_end]
            j = _skip_ws(text, name_end)
            for fence in ("```json", "```"):
                got = _expect(text, j, fence, final)
                if got is None:
                    return scan
                if got:
                    j = _skip_ws(text, got)
                    break
        else:  # V3.1: the name before the separator
            scan.name = head
        if not scan.name or not FUNCTION_NAME.fullmatch(scan.name):
            return self._broken(scan, text, j, final)
        scan.args_start = j if j < len(text) else None
        try:
            if text[j:j + 1] not in ("{", ""):
                raise _Bad(j)
            value_end = scan_value(text, j, final)
        except _Bad as exc:
            return self._broken(scan, text, exc.pos, final)
        if value_end is None:
            return scan
        scan.args_end = value_end
        k = _skip_ws(text, value_end)
        got = _expect(text, k, "```", final)
        if got is None:
            return scan
        k = _skip_ws(text, got) if got else k
        got = _expect(text, k, self.CALL_END, final)
        if got is None or (got is False and k >= len(text)):
            if final:
                scan.end = len(text)
            return scan
        if got is False:
            return self._broken(scan, text, k, final)
        scan.end = got
        return scan

    def _broken(self, scan: CallScan, text: str, at: int, final: bool) -> CallScan:
        scan.bad = at
        close, stop = _marker(text, self.CALL_END, at, final)
        scan.end = close + len(self.CALL_END) if close is not None else (len(text) if final else None)
        return scan


class _RegionFormat(ToolFormat):
    """Formats whose calls run from a start token to the end of the text (Llama, Mistral)."""
    START = ""

    def segments(self, text: str, final: bool) -> list[Segment]:
        out: list[Segment] = []
        body, stop = self._region_start(text, final)
        _text(out, 0, stop)
        if body is not None:  # the first call's raw text starts at the token (it is content if it breaks)
            self._calls(text, stop, body, final, out)
        return out

    def _region_start(self, text: str, final: bool) -> tuple[int | None, int]:
        """(where the calls begin, where the plain text before them ends)."""
        found, stop = _marker(text, self.START, 0, final)
        return (found + len(self.START), found) if found is not None else (None, stop)

    def _calls(self, text: str, start: int, i: int, final: bool, out: list[Segment]) -> None:
        raise NotImplementedError

    @staticmethod
    def _rest_is_content(text: str, start: int, out: list[Segment], scan: CallScan) -> None:
        """A call that broke: it and everything after it is content (no end token to resume at)."""
        scan.start, scan.end = start, len(text)
        out.append(Segment(start, len(text), scan))


class Llama3JsonFormat(_RegionFormat):
    name = "llama3_json"
    START = "<|python_tag|>"

    def _region_start(self, text: str, final: bool) -> tuple[int | None, int]:
        first = _skip_ws(text, 0)
        if first < len(text) and text[first] == "{":  # a call without the tag: only as the whole answer
            return first, first
        return super()._region_start(text, final)

    def _calls(self, text: str, start: int, i: int, final: bool, out: list[Segment]) -> None:
        while True:
            i = _skip_ws(text, i)
            if i >= len(text):
                return
            scan = scan_call_object(text, i, final)
            scan.start = start = min(start, i)
            if scan.bad is not None:
                return self._rest_is_content(text, start, out, scan)
            if scan.end is None:
                out.append(Segment(start, len(text), scan))
                return
            out.append(Segment(start, scan.end, scan))
            j = _skip_ws(text, scan.end)
            if j < len(text) and text[j] == ";":
                j += 1
            elif j < len(text):  # something after the call that is not the next one
                _text(out, j, len(text))
                return
            i = start = j


class MistralFormat(_RegionFormat):
    name = "mistral"
    id_style = "mistral"
    START = "[TOOL_CALLS]"
    ARGS, CALL_ID = "[ARGS]", "[CALL_ID]"

    def _calls(self, text: str, start: int, i: int, final: bool, out: list[Segment]) -> None:
        j = _skip_ws(text, i)
        if j >= len(text):
            return
        if text[j] == "[" and not text.startswith(self.ARGS, j) and not text.startswith(self.CALL_ID, j):
            return self._array(text, start, j, final, out)
        while True:  # name[ARGS]{...}, each further call after its own [TOOL_CALLS]
            scan = self._named(text, i, final)
            scan.start = start
            out.append(Segment(start, scan.end if scan.end is not None else len(text), scan))
            if scan.end is None or scan.end >= len(text):  # open, or broken (then all the rest is content)
                return
            k = _skip_ws(text, scan.end)
            nxt = _expect(text, k, self.START, final)
            if nxt is None or k >= len(text):
                return
            if nxt is False:
                _text(out, k, len(text))
                return
            start, i = k, nxt

    def _named(self, text: str, i: int, final: bool) -> CallScan:
        scan = CallScan(start=i)
        j = _skip_ws(text, i)
        name_end = j
        while name_end < len(text) and (text[name_end].isalnum() or text[name_end] in "_.-"):
            name_end += 1
        if name_end >= len(text) and not final:
            return scan
        name = text[j:name_end]
        k = name_end
        got = _expect(text, k, self.CALL_ID, final)
        if got is None:
            return scan
        if got:
            id_end = text.find(self.ARGS, got)
            if id_end < 0:
                if final:
                    scan.bad, scan.end = got, len(text)
                return scan
            scan.call_id, k = text[got:id_end].strip(), id_end
        got = _expect(text, k, self.ARGS, final)
        if got is None:
            return scan
        if got is False or not FUNCTION_NAME.fullmatch(name):
            scan.bad, scan.end = k, len(text)
            return scan
        scan.name = name
        scan.args_start = _skip_ws(text, got)
        try:
            if text[scan.args_start:scan.args_start + 1] not in ("{", ""):
                raise _Bad(scan.args_start)
            scan.args_end = scan_value(text, scan.args_start, final)
        except _Bad as exc:
            scan.bad, scan.end = exc.pos, len(text)
            return scan
        if scan.args_start >= len(text):
            scan.args_start = None
        scan.end = scan.args_end
        return scan

    def _array(self, text: str, start: int, i: int, final: bool, out: list[Segment]) -> None:
        i += 1  # past "["
        first = True
        while True:
            i = _skip_ws(text, i)
            if i >= len(text):
                return
            if text[i] == "]":
                rest = _skip_ws(text, i + 1)
                _text(out, rest, len(text))
                return
            if not first:
                if text[i] != ",":
                    return self._rest_is_content(text, i, out, CallScan(start=i, bad=i))
                i = _skip_ws(text, i + 1)
                if i >= len(text):
                    return
            scan = scan_call_object(text, i, final)
            begin = start if first else i  # the first call's raw text includes "[TOOL_CALLS]["
            if scan.bad is not None:
                return self._rest_is_content(text, begin, out, scan)
            scan.start = begin
            out.append(Segment(begin, scan.end if scan.end is not None else len(text), scan))
            if scan.end is None:
                return
            i, first = scan.end, False


FORMATS: dict[str, ToolFormat] = {f.name: f for f in (HermesFormat(), DeepSeekFormat(), Llama3JsonFormat(),
                                                       MistralFormat())}


# ------------------------------------------------------------------ results

@dataclass
class ToolCall:
    name: str
    arguments: str   # JSON text
    id: str

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedOutput:
    content: str | None             # None when only calls were written
    tool_calls: list[ToolCall] = field(default_factory=list)


def _format(fmt: str | ToolFormat) -> ToolFormat:
    if isinstance(fmt, ToolFormat):
        return fmt
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown tool-call format {fmt!r}; known: {', '.join(FORMATS)}") from None


def _resolve(fmt: ToolFormat, text: str, final: bool, committed: dict | None = None
             ) -> Iterator[tuple[str, Segment]]:
    """("text", segment) and ("call", segment) in order. A call segment is a call when the stream has
    committed it, when it is whole and valid, or (streaming) when it can be committed now; broken or
    invalid ones are text; one still undecided ends the walk (what follows is held back)."""
    committed = committed or {}
    for segment in fmt.segments(text, final):
        scan = segment.call
        if scan is None:
            yield "text", segment
        elif scan.start in committed:
            yield "call", segment
        elif final or scan.bad is not None or scan.end is not None:
            yield ("call" if scan.valid(text) else "text"), segment
        elif scan.committable(text):
            yield "call", segment
        else:
            return


def parse(fmt: str | ToolFormat, text: str) -> ParsedOutput:
    """The whole generated text -> content and tool calls."""
    fmt = _format(fmt)
    content: list[str] = []
    calls: list[ToolCall] = []
    for kind, segment in _resolve(fmt, text, True):
        if kind == "text":
            content.append(text[segment.start:segment.end])
        else:
            scan = segment.call
            calls.append(ToolCall(scan.name, scan.final_args(text), fmt.new_id()))
    joined = "".join(content).strip()
    return ParsedOutput(joined or None, calls)


class ToolCallStream:
    """Text pieces in, OpenAI delta dicts out ({"content": ...} or {"tool_calls": [...]})."""

    def __init__(self, fmt: str | ToolFormat) -> None:
        self.fmt = _format(fmt)
        self.text = ""
        self._content_sent = 0                   # characters of the (stripped) content sent
        self._calls: dict[int, _SentCall] = {}   # a committed call's start in the text -> what was sent

    @property
    def called(self) -> bool:
        return bool(self._calls)

    def feed(self, piece: str) -> list[dict]:
        self.text += piece
        return self._deltas(final=False)

    def finish(self) -> list[dict]:
        return self._deltas(final=True)

    def _deltas(self, final: bool) -> list[dict]:
        text = self.text
        content: list[str] = []
        call_deltas: list[dict] = []
        for kind, segment in _resolve(self.fmt, text, final, self._calls):
            if kind == "text":
                content.append(text[segment.start:segment.end])
                continue
            scan = segment.call
            sent = self._calls.get(scan.start)
            if sent is None:
                sent = self._calls[scan.start] = _SentCall(len(self._calls), self.fmt.new_id())
                call_deltas.append({"index": sent.index, "id": sent.id, "type": "function",
                                    "function": {"name": scan.name, "arguments": ""}})
            done = final or (scan.end is not None and scan.bad is None)
            arguments = scan.final_args(text) if done else scan.args_text(text, False)
            if len(arguments) > len(sent.arguments) and arguments.startswith(sent.arguments):
                call_deltas.append({"index": sent.index, "function": {"arguments": arguments[len(sent.arguments):]}})
                sent.arguments = arguments
        ready = "".join(content).strip()  # as parse() strips it: whitespace at the end waits for what follows
        deltas = []
        if len(ready) > self._content_sent:
            deltas.append({"content": ready[self._content_sent:]})
            self._content_sent = len(ready)
        if call_deltas:
            deltas.append({"tool_calls": call_deltas})
        return deltas



@dataclass
class _SentCall:
    index: int
    id: str
    arguments: str = ""
