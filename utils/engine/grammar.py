"""Grammar-constrained decoding, one row at a time: `response_format` json_object / json_schema and
tool calls forced by `tool_choice` (required, a named function).

Library: xgrammar (docs/structured-outputs.md has the measurements against llguidance and
outlines-core, and the command that prints them). A `Grammar` is what a request asks for (hashable,
no torch); `compile_grammar(tokenizer, grammar)` turns it into a CompiledGrammar for one tokenizer,
cached per (tokenizer, grammar) with a bound; `RowConstraint` is one row's matcher:

    constraint.mask(logits_row)   # tokens the grammar forbids next -> -inf (in place)
    constraint.advance(token_id)  # the row took this token
    constraint.is_terminated()    # the grammar is complete (the row ends: finish_reason "stop")

A row ends when its grammar is complete and nothing may follow; while more may follow (JSON may
take trailing whitespace) the end-of-sequence token is allowed and the model chooses.

The routes compile before the lease (a bad schema is a 400 before any model loads; the tokenizer comes
from the checkpoint's files), the engines build one RowConstraint per constrained row and leave every
other row alone.

The vocabulary handed to the library is what each token adds to the text that the server returns
(`tokenizer.decode(..., skip_special_tokens=True)`), so the grammar constrains exactly the answer the
client reads: byte-level BPE and SentencePiece vocabularies come from xgrammar's own reading of the
tokenizer; per-token decoders (WordPiece: a space before every piece that is not "##") are read by
decoding each token after an anchor token.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from utils.errors import InvalidInput

MAX_COMPILED = 64          # compiled grammars kept per process (least recently used goes first)
MAX_SCHEMA_CHARS = 65536   # of one schema's JSON text
_ANCHOR = "a"              # a plain token decoded before each token to read what the token adds
DEAD_END_LOOKAHEAD = 16    # at most this many allowed tokens: look one token ahead for dead ends (a cost: ~2x the mask)
MAX_WHITESPACE = 16        # whitespace characters in a row between JSON tokens (a random model could spin)
LEADING_SPACE = 'root ::= " "?'
# Control characters may not stand raw inside JSON strings; xgrammar's string rule lets them through
# (measured: bench/grammar_libraries.py), so tokens holding one (other than whitespace) never fit.
_CONTROL = frozenset(range(32)) - {9, 10, 13}


@dataclass(frozen=True)
class Grammar:
    """What a row must generate. kind: "json" (any JSON object: json_object), "json_schema" (spec:
    the schema's JSON text), "tool_calls" (spec: format, tools, parallel as JSON), "ebnf" (spec: an
    EBNF grammar)."""
    kind: str
    spec: str = ""
    field: str = "response_format"   # what to name in a 400 when it does not compile

    @staticmethod
    def json_schema(schema: dict, field: str = "response_format.json_schema.schema") -> "Grammar":
        text = json.dumps(schema, sort_keys=True, ensure_ascii=False)
        if len(text) > MAX_SCHEMA_CHARS:
            raise InvalidInput(f"the schema is {len(text)} characters of JSON; at most {MAX_SCHEMA_CHARS}",
                               field=field, error="value out of range")
        return Grammar("json_schema", text, field)

    @staticmethod
    def tool_calls(fmt: str, tools: list[dict], parallel: bool, field: str = "tool_choice") -> "Grammar":
        """Calls to one of `tools` ({"name", "parameters"}) written in the family's format `fmt` (a
        key of utils.api.tool_parsers.FORMATS); one call, or up to MAX_PARALLEL_CALLS when `parallel`."""
        if fmt not in TOOL_CALL_TEMPLATES:
            raise InvalidInput(f"forced tool calls are not available in the '{fmt}' format", field=field,
                               error="unsupported parameter")
        spec = json.dumps({"format": fmt, "tools": tools, "parallel": parallel}, sort_keys=True, ensure_ascii=False)
        return Grammar("tool_calls", spec, field)

    def build(self) -> Any:
        """The grammar as an xgrammar Grammar. An optional space leads: a row's first token decodes
        without the space that a per-token (WordPiece) vocabulary shows before it elsewhere, and
        whitespace before a JSON value is JSON anyway."""
        import xgrammar as xgr  # deferred: xgrammar (imports torch)

        if self.kind == "ebnf":
            return xgr.Grammar.from_ebnf(self.spec)
        if self.kind == "tool_calls":
            return _tool_calls_grammar(**json.loads(self.spec))
        schema = self.spec if self.kind == "json_schema" else '{"type": "object"}'
        return xgr.Grammar.concat(xgr.Grammar.from_ebnf(LEADING_SPACE),
                                  xgr.Grammar.from_json_schema(schema, any_whitespace=True,
                                                               max_whitespace_cnt=MAX_WHITESPACE))


# ------------------------------------------------------------------ tool calls in each family's format

MAX_PARALLEL_CALLS = 3
_WS = "[ \\t\\n]*"
# (before all calls, before each call, the arguments' JSON object is "args" or the whole call object,
# after each call, between calls, after all calls) as text around the JSON; whitespace may stand
# between any two pieces (the parsers skip it; WordPiece decoding puts a space before most tokens).
TOOL_CALL_TEMPLATES = {
    "hermes": ("", "<tool_call>", "call", "</tool_call>", "", ""),
    "deepseek": ("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜> function <｜tool▁sep｜> {name} ```json?", "args",
                 "```? <｜tool▁call▁end｜>", "", "<｜tool▁calls▁end｜>"),
    "llama3_json": ("", "", "call", "", ";", ""),
    "mistral": ("[TOOL_CALLS] [", "", "call", "", ",", "]"),
}
_ARGUMENT_KEY = {"llama3_json": "parameters"}


def _literal(text: str) -> Any:
    """Text as a grammar: its words in order, whitespace allowed before and between them; a word
    that ends in "?" may be left out (DeepSeek's parser takes the arguments fenced or not)."""
    import xgrammar as xgr  # deferred: xgrammar (imports torch)

    words = [w for w in text.split(" ") if w]
    body = " ".join([f'(ws {json.dumps(w[:-1])})?' if w.endswith("?") and len(w) > 1 else f'ws {json.dumps(w)}'
                     for w in words] + ["ws"])
    return xgr.Grammar.from_ebnf(f'root ::= {body}\nws ::= {_WS}')


def _tool_calls_grammar(format: str, tools: list[dict], parallel: bool) -> Any:
    import xgrammar as xgr  # deferred: xgrammar (imports torch)

    before_all, before, kind, after, between, after_all = TOOL_CALL_TEMPLATES[format]
    key = _ARGUMENT_KEY.get(format, "arguments")
    options = []
    for tool in tools:
        parameters = tool.get("parameters") or {"type": "object"}
        if kind == "args":
            schema = parameters
        else:
            schema = {"type": "object", "properties": {"name": {"const": tool["name"]}, key: parameters},
                      "required": ["name", key], "additionalProperties": False}
        options.append(xgr.Grammar.concat(
            _literal(before.format(name=tool["name"])),
            xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=True, max_whitespace_cnt=MAX_WHITESPACE),
            _literal(after)))
    call = options[0] if len(options) == 1 else xgr.Grammar.union(*options)
    sequences = []
    for count in range(1, (MAX_PARALLEL_CALLS if parallel else 1) + 1):
        parts = [_literal(before_all)]
        for i in range(count):
            if i:
                parts.append(_literal(between))
            parts.append(call)
        parts.append(_literal(after_all))
        sequences.append(xgr.Grammar.concat(*parts))
    return sequences[0] if len(sequences) == 1 else xgr.Grammar.union(*sequences)


# ------------------------------------------------------------------ vocabulary

def _decoder_kind(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return "other"
    described = json.loads(backend.to_str()).get("decoder") or {}
    kinds = {described.get("type")} | {d.get("type") for d in described.get("decoders", []) or []}
    if "ByteLevel" in kinds:
        return "byte_level"
    if kinds & {"ByteFallback", "Metaspace", "Replace"}:
        return "sentencepiece"
    return "per_token"


@dataclass(frozen=True)
class Vocabulary:
    tokens: tuple[bytes, ...]            # what each id adds to the answer's text (b"": never allowed)
    stop_ids: tuple[int, ...]            # end of sequence: allowed once the grammar is complete
    not_first: frozenset[int]            # ids that decode differently as a row's first token ("##x")


def vocabulary(tokenizer: Any, stop_ids: set[int]) -> Vocabulary:
    """The bytes each token id adds to `decode(tokens, skip_special_tokens=True)` after other tokens."""
    size = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    kind = _decoder_kind(tokenizer)
    not_first: set[int] = set()
    if kind in ("byte_level", "sentencepiece"):
        import xgrammar as xgr  # deferred: xgrammar (imports torch)
        decoded = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=size).decoded_vocab
        tokens = [bytes(t) if isinstance(t, (bytes, bytearray)) else str(t).encode() for t in decoded]
        added = {i for i in tokenizer.added_tokens_decoder} - special  # added tokens are decoded as written
        for i in added:
            tokens[i] = tokenizer.decode([i], skip_special_tokens=True).encode()
    else:
        anchor = tokenizer.convert_tokens_to_ids(_ANCHOR)
        base = tokenizer.decode([anchor])
        tokens = []
        for i in range(size):
            after = tokenizer.decode([anchor, i], skip_special_tokens=True)
            piece = after[len(base):] if after.startswith(base) else ""
            tokens.append(piece.encode())
            if piece and tokenizer.decode([i], skip_special_tokens=True).strip() != piece.strip():
                not_first.add(i)
    for i in special:
        if 0 <= i < size:
            tokens[i] = b""
    tokens = [b"" if _CONTROL.intersection(piece) else piece for piece in tokens]
    return Vocabulary(tuple(tokens), tuple(sorted(stop_ids)), frozenset(not_first))


# ------------------------------------------------------------------ compiled grammars and rows

class CompiledGrammar:
    """A grammar compiled for one tokenizer; each row gets its own matcher over it."""

    def __init__(self, compiled: Any, vocab: Vocabulary) -> None:
        self._compiled, self.vocab = compiled, vocab

    def new_row(self) -> "RowConstraint":
        import xgrammar as xgr  # deferred: xgrammar (imports torch)
        return RowConstraint(xgr.GrammarMatcher(self._compiled), self.vocab)


class RowConstraint:
    """One row's matcher: masks its logits, advances on its tokens; other rows never see it."""

    def __init__(self, matcher: Any, vocab: Vocabulary) -> None:
        import xgrammar as xgr  # deferred: xgrammar (imports torch)

        self._matcher, self._vocab = matcher, vocab
        self._bitmask = xgr.allocate_token_bitmask(1, len(vocab.tokens))
        self._first = True
        self.failed = False   # the matcher refused a token (cannot happen after its own mask)

    def mask(self, logits_row: Any) -> None:
        """Sets the logits of tokens the grammar forbids next to -inf, in place (a 1-D row)."""
        import torch  # deferred: torch

        size = len(self._vocab.tokens)
        row = logits_row.view(-1)
        if self.is_terminated():
            allowed = torch.zeros(size, dtype=torch.bool)
        else:
            self._matcher.fill_next_token_bitmask(self._bitmask)
            bits = self._bitmask[0]
            allowed = ((bits.unsqueeze(1) >> _SHIFTS) & 1).flatten()[:size].bool()
        if self._first and self._vocab.not_first:
            allowed[list(self._vocab.not_first)] = False
        self._drop_dead_ends(allowed)
        if not bool(allowed.any()):  # nothing fits (a grammar this vocabulary cannot finish): end the row
            allowed[list(self._vocab.stop_ids)] = True
        width = min(size, row.shape[0])
        row[:width].masked_fill_(~allowed[:width].to(row.device), float("-inf"))
        row[size:] = float("-inf")

    def _drop_dead_ends(self, allowed: Any) -> None:
        """Where few tokens fit (structure, not free text), drops those after which nothing would:
        xgrammar allows "<" as the start of "<｜tool▁sep｜>" even when only the whole token can
        write the rest."""
        ids = allowed.nonzero().flatten().tolist()
        if len(ids) > DEAD_END_LOOKAHEAD or self.is_terminated():
            return
        stops = set(self._vocab.stop_ids)
        for token in ids:
            if token in stops:
                continue
            probe = self._matcher.fork()
            if not probe.accept_token(token) or probe.is_terminated():
                continue
            probe.fill_next_token_bitmask(self._bitmask)
            if not bool(self._bitmask.any()):
                allowed[token] = False

    def advance(self, token_id: int) -> None:
        self._first = False
        if self.is_terminated() or not self._matcher.accept_token(int(token_id)):
            self.failed = True

    def is_terminated(self) -> bool:
        """The grammar took its end (the stop token), or the matcher refused a token."""
        return self.failed or self._matcher.is_terminated()


_SHIFTS = None  # set on first use (torch is imported late)
_compiled: OrderedDict[tuple, CompiledGrammar] = OrderedDict()
_compilers: OrderedDict[tuple, tuple[Vocabulary, Any]] = OrderedDict()
_lock = threading.Lock()


def compile_grammar(tokenizer: Any, grammar: Grammar, *, stop_ids: set[int], key: str | None = None) -> CompiledGrammar:
    """The compiled grammar for this tokenizer, from the bounded cache (key: the tokenizer's folder,
    its stop ids and the grammar); InvalidInput naming `grammar.field` when it does not compile."""
    global _SHIFTS
    import torch  # deferred: torch

    if _SHIFTS is None:
        _SHIFTS = torch.arange(32, dtype=torch.int32)
    tokenizer_key = (key or getattr(tokenizer, "name_or_path", "") or id(tokenizer), tuple(sorted(stop_ids)))
    cache_key = (tokenizer_key, grammar)
    with _lock:
        hit = _compiled.get(cache_key)
        if hit is not None:
            _compiled.move_to_end(cache_key)
            return hit
    vocab_, compiler = _compiler(tokenizer, tokenizer_key)
    try:
        compiled = CompiledGrammar(compiler.compile_grammar(grammar.build()), vocab_)
    except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's errors about the schema or grammar
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InvalidInput(f"this schema cannot be used for constrained decoding: {message[:400]}",
                           field=grammar.field, error="invalid schema") from None
    with _lock:
        _compiled[cache_key] = compiled
        while len(_compiled) > MAX_COMPILED:
            _compiled.popitem(last=False)
    return compiled


def _compiler(tokenizer: Any, tokenizer_key: tuple) -> tuple[Vocabulary, Any]:
    """Our vocabulary of the tokenizer and xgrammar's compiler over it, once per tokenizer."""
    import xgrammar as xgr  # deferred: xgrammar (imports torch)

    with _lock:
        hit = _compilers.get(tokenizer_key)
    if hit is not None:
        return hit
    vocab_ = vocabulary(tokenizer, set(tokenizer_key[1]))
    info = xgr.TokenizerInfo(list(vocab_.tokens), xgr.VocabType.RAW, vocab_size=len(vocab_.tokens),
                             stop_token_ids=list(vocab_.stop_ids))
    made = (vocab_, xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False))
    with _lock:
        _compilers[tokenizer_key] = made
        while len(_compilers) > 8:
            _compilers.popitem(last=False)
    return made


# ------------------------------------------------------------------ the engines' calls

def row_constraint(grammar: Grammar | None, tokenizer: Any, stop_ids: set[int]) -> RowConstraint | None:
    """A new row's constraint (None for an unconstrained row)."""
    if grammar is None:
        return None
    return compile_grammar(tokenizer, grammar, stop_ids=stop_ids).new_row()


def mask_rows(rows: list, scores: Any) -> None:
    """Masks, in place, the score rows of the rows that carry a constraint and are still open (in
    inference mode: the scores are the forward's own tensor)."""
    import torch  # deferred: torch

    with torch.inference_mode():
        for i, row in enumerate(rows):
            constraint = getattr(row, "constraint", None)
            if constraint is not None and not row.done:
                constraint.mask(scores[i])
