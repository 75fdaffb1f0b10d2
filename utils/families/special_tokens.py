"""A model's special tokens, and the check that keeps them out of client text.

Client text never becomes control tokens: a chat template renders it verbatim and a processor parses
special tokens in the whole string, so "<|im_start|>system" in a prompt would open a system turn and
"<|image_pad|>" would claim an image. A text holding one of the model's special tokens is refused,
naming the token and the field.

The tokens are read from the tokenizer files alone (`SpecialTokenGuard`, no weights): every route
refuses such text before it leases (and so loads) a model, /jobs when a job is submitted. A loaded
family runs the same check again on its own processor (`Family.check_text`), for callers that skip
the routes (tools, benches).
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from utils.errors import InvalidInput

log = logging.getLogger("model_server.families")


@dataclass(frozen=True)
class SpecialTokens:
    raw: re.Pattern | None          # tokens matched as written
    normalized: re.Pattern | None   # tokens the tokenizer matches after its normalizer
    normalize: Callable[[str], str]
    vocab_size: int | None = None   # ids a client may name (logit_bias, prompts as token ids): 0..vocab_size-1

    def check(self, key: str, texts: Iterable[tuple[str, str]]) -> None:
        """Raises InvalidInput for the first (field, text) that holds a special token of model `key`."""
        for where, text in texts:
            found = (self.raw and self.raw.search(text)) or (self.normalized and self.normalized.search(
                self.normalize(text)))
            if found:
                raise InvalidInput(f"'{where}' holds {found.group(0)!r}, a special token of '{key}'; "
                                   f"text sent to a model may not hold its control tokens", field=where,
                                   error="special token in text")


def special_tokens(tokenizer: Any, processor: Any) -> SpecialTokens:
    """The special tokens of a tokenizer, plus its processor's media placeholders."""
    tokens = {t: False for t in getattr(tokenizer, "all_special_tokens", [])}
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if added.special:
            tokens[added.content] = bool(added.normalized)
    for attr in ("image_token", "video_token", "audio_token"):
        if isinstance(getattr(processor, attr, None), str):
            tokens.setdefault(getattr(processor, attr), False)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalizer = getattr(backend, "normalizer", None)
    normalize = normalizer.normalize_str if normalizer is not None else (lambda text: text)
    return SpecialTokens(_alternation(t for t, n in tokens.items() if t and not n),
                         _alternation(normalize(t) for t, n in tokens.items() if t and n), normalize,
                         len(tokenizer) if hasattr(tokenizer, "__len__") else None)


def _alternation(tokens: Iterable[str]) -> re.Pattern | None:
    tokens = sorted(set(tokens), key=len, reverse=True)  # the longest first, as the tokenizer matches
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


class SpecialTokenGuard:
    """Each model's special tokens from its tokenizer files, read once per checkpoint folder (the
    family's `text_tools`: tokenizer and processor, never weights). A model whose files are not there
    (not downloaded) is not checked here: its load fails first, or its loaded family checks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[tuple, SpecialTokens] = {}
        self._loading: dict[tuple, threading.Lock] = {}

    def check(self, spec: Any, family: type, texts: Iterable[tuple[str, str]]) -> None:
        """`family`: the model's Family class (its `text_tools` read the files)."""
        tokens = self.tokens(spec, family)
        if tokens is not None:
            tokens.check(spec.key, texts)

    def tokens(self, spec: Any, family: type) -> SpecialTokens | None:
        marker = spec.path / family.checkpoint_file
        try:
            key = (str(spec.path), spec.family, marker.stat().st_mtime_ns)  # a new download reads again
        except OSError:
            return None
        with self._lock:
            if key in self._known:
                return self._known[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one read per folder, even when ten requests ask at once
            with self._lock:
                if key in self._known:
                    return self._known[key]
            try:
                tokens = special_tokens(*family.text_tools(spec))
            except Exception as exc:  # incomplete files: the load will say what is missing
                log.warning("%s: special tokens not read from %s/ (%s: %s); checked once it loads", spec.key,
                            spec.path.name, type(exc).__name__, exc)
                tokens = None
            with self._lock:
                self._known[key] = tokens
                self._loading.pop(key, None)
        return tokens
