"""Prefix reuse for the continuous engine (vLLM's automatic prefix caching, in the small): the KV of
recent prompts, so a request whose prompt starts like one of them (the system prompt; a chat's
earlier turns, which every client sends again each turn) prefills only what follows.

Entries are whole prompts' KV (one [1, heads, tokens, head_dim] pair per layer), found by their
prefixes at BLOCK-token boundaries (a dict from the hash of each block-aligned prefix to the entries
that start so), least recently used out past `max_bytes`. A prompt that extends a cached one (a chat's
next turn) replaces it: whatever the shorter one matched, the longer one matches as far, so the cache
holds one entry per chat in flight, not one per turn (8 chats of 8 turns: ~4.5x fewer bytes). Reuse is
exact: a position's KV depends only on the tokens before it, so the cached part is what a fresh prefill computes (up to float
rounding of different shapes, as batching already has; tests compare tokens under greedy decoding).

One owner: the engine's worker thread alone reads and writes it (no lock)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

from utils.config.schema import MIB

BLOCK = 16  # tokens: reuse is a multiple of it (as vLLM's blocks), so lookups hash few prefixes


def prefix_cache_cap(spec: Any, weight_bytes: int) -> int:
    """Bytes a continuous engine may keep for reused prefixes: the `prefix_cache_mb` setting, but never
    more than a quarter of the model's own weights (a tiny model needs no 256 MiB of cached prompts). The
    manager's estimate before a load and the engine's reserve after it both use this one rule."""
    if spec.family != "text" or spec.engine.batching == "dynamic" or spec.engine.static_cache \
            or spec.trust_remote_code:
        return 0  # what ContinuousEngine.supports refuses anyway; the loaded engine has the final word
    return min(spec.engine.prefix_cache_mb * MIB, int(weight_bytes) // 4)


class PrefixEntry:
    __slots__ = ("tokens", "layers", "bytes")

    def __init__(self, tokens: tuple[int, ...], layers: list[tuple[Any, Any]]) -> None:
        self.tokens, self.layers = tokens, layers
        self.bytes = sum(t.numel() * t.element_size() for pair in layers for t in pair)


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], PrefixEntry] = OrderedDict()  # LRU first
        self._by_prefix: dict[int, set[tuple[int, ...]]] = {}  # hash of a block-aligned prefix -> entries
        self.bytes = 0
        self.hits = self.misses = self.tokens_reused = self.evictions = self.superseded = 0

    def lookup(self, prompt: list[int]) -> tuple[int, PrefixEntry | None]:
        """The longest block-aligned prefix of `prompt` held here, leaving at least one token to
        prefill (its logits choose the first new token): (tokens reused, entry) or (0, None)."""
        longest = (len(prompt) - 1) // BLOCK * BLOCK
        for length in range(longest, 0, -BLOCK):
            prefix = tuple(prompt[:length])
            for key in self._by_prefix.get(hash(prefix), ()):
                if key[:length] == prefix:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    self.tokens_reused += length
                    return length, self._entries[key]
        self.misses += 1
        return 0, None

    def add(self, prompt: list[int], layers: list[tuple[Any, Any]]) -> None:
        """Keeps a prompt's KV (tensors nobody writes to later: the caller passes its own slices)."""
        if len(prompt) < BLOCK or not self.max_bytes:
            return
        key = tuple(prompt)
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        entry = PrefixEntry(key, layers)
        if entry.bytes > self.max_bytes:
            return
        for shorter in self._prefixes_of(key):  # not evicted: replaced by what extends it
            self._drop(shorter)
            self.superseded += 1
        self._entries[key] = entry
        self.bytes += entry.bytes
        for length in range(BLOCK, len(key) + 1, BLOCK):
            self._by_prefix.setdefault(hash(key[:length]), set()).add(key)
        while self.bytes > self.max_bytes:
            self._evict(next(iter(self._entries)))

    def _prefixes_of(self, key: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Cached prompts that `key` starts with (every one shares its first block)."""
        return [held for held in self._by_prefix.get(hash(key[:BLOCK]), ())
                if len(held) < len(key) and key[:len(held)] == held]

    def clear(self) -> None:
        for key in list(self._entries):
            self._evict(key)

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                "misses": self.misses, "tokens_reused": self.tokens_reused, "evictions": self.evictions,
                "superseded": self.superseded}

    def _evict(self, key: tuple[int, ...]) -> None:
        self._drop(key)
        self.evictions += 1

    def _drop(self, key: tuple[int, ...]) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.bytes
        for length in range(BLOCK, len(key) + 1, BLOCK):
            holders = self._by_prefix.get(hash(key[:length]))
            if holders is not None:
                holders.discard(key)
                if not holders:
                    del self._by_prefix[hash(key[:length])]
