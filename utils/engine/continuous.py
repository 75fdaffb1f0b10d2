"""Continuous batching for text LLMs: requests join the running batch between decode steps and
leave it the step they finish, each with its own max_new_tokens, sampling parameters and seed.

Why our own step loop rather than transformers' ContinuousBatchingManager: see bench/README.md
("Which engine runs what"). In short: on CPU it needs its paged-attention path, it samples from one
generator for all requests (no per-request seed), and a plain padded batch measured faster here.

How: one DynamicCache for the running rows, left-padded to a common length. A request that joins
is prefilled on its own (with any others that joined at the same step), its cache is padded to the
batch's length on the left (masked), and stacked under the running rows. Positions are per row
(count of its real tokens), so padding changes neither RoPE nor attention: under greedy decoding a
row's answer equals the same request alone (tested token by token).
"""
from __future__ import annotations

import inspect
import logging
import time
from typing import Any

from utils.engine.engine import Engine, Job
from utils.engine.phases import phase
from utils.engine.prefix_cache import PrefixCache
from utils.engine.rows import RowState, collate
from utils.engine.sampling import choose_tokens, prompt_logprobs
from utils.errors import OutOfMemory
from utils.serving.memory import is_out_of_memory, release_cached_memory

log = logging.getLogger("model_server.engine")
GROW_BACK_STEPS = 64  # clean decode steps before a row limit lowered by an out-of-memory grows by one
# A join is one prefill forward (plus a cache merge) whatever its row count, and on a small model that
# forward costs about what a decode step does: newcomers to a running batch wait until they are half as
# many as the running rows, or at most this many decode steps, and then join together (issue 29).
JOIN_HOLD_STEPS = 4
# engine.compile: torch.compile of the decode step. dynamo specializes sizes 0 and 1, so one batch row
# and several rows are two graphs per architecture; the warm-up (at load) compiles both.
WARM_UP_ROWS = (1, 2)
# The warm-up's prompt length: a size no other dimension of the model is likely to share (dynamo's
# "duck sizing" ties dimensions that are equal when it traces, and would recompile when they part).
WARM_UP_PROMPT = 13
RECOMPILE_LIMIT = 64  # dynamo's graphs per code object (default 8): several compiled models of one class


class ContinuousEngine(Engine):
    kind = "continuous"

    def __init__(self, adapter: Any, *, prefix_cache_bytes: int = 0, compile_decode: bool = False,
                 **settings: Any) -> None:
        super().__init__(adapter, **settings)
        self._prefix = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        self._decode = adapter.model  # what runs a decode step: the model, or its compiled form
        self._compile: dict = {"decode": "eager"}
        if compile_decode:
            self._compile_decode()

    def _compile_decode(self) -> None:
        """engine.compile: the decode step through torch.compile (inductor), dynamic shapes (the batch
        and the cache grow without a recompile). The prefill stays eager: one forward per request
        against one per token, and its shapes (prompt lengths, reused prefixes) vary far more. The
        warm-up compiles before the engine serves (the model shows as loading meanwhile); inductor
        keeps what it built on disk (TORCHINDUCTOR_CACHE_DIR), so a reload compiles faster. A compile
        that fails leaves the step eager: the model serves, its status says why."""
        import torch  # deferred: torch
        import torch._dynamo  # deferred: torch

        started = time.monotonic()
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        compiled = torch.compile(self.adapter.model, dynamic=True)
        try:
            for rows in WARM_UP_ROWS:
                _warm_up(self.adapter, compiled, rows)
        except Exception as exc:  # contained: eager decoding still serves this model
            log.warning("compiling the decode step of %s failed; it runs eager: %s", self.key, exc, exc_info=True)
            self._compile = {"decode": "eager", "compile_error": f"{type(exc).__name__}: {exc}"[:300]}
            return
        self._decode = compiled
        self._compile = {"decode": "compiled", "compile_seconds": round(time.monotonic() - started, 1)}
        log.info("compiled the decode step of %s in %.1f s", self.key, time.monotonic() - started)

    def reserved_bytes(self) -> int:
        return self._prefix.max_bytes if self._prefix is not None else 0

    def stats(self) -> dict:
        out = super().stats()
        out.update(self._compile)
        if self._prefix is not None:  # read off the worker thread: plain integers, a torn read is harmless
            out["prefix_cache"] = self._prefix.stats()
        return out

    @staticmethod
    def supports(adapter: Any) -> bool:
        """Decoder-only text models whose cache is a plain, full-attention DynamicCache."""
        if not getattr(adapter, "continuous_batching", False) or adapter.spec.engine.static_cache:
            return False
        if adapter.spec.trust_remote_code:  # the checkpoint's own modeling code may not page its attention
            return False
        config = adapter.model.config
        layer_types = getattr(config, "layer_types", None) or ["full_attention"]
        return all(kind == "full_attention" for kind in layer_types)

    def _run(self) -> None:
        import torch  # deferred: torch

        try:
            # Every tensor the loop makes is an inference tensor, the caches of prefills and merges alike:
            # a compiled decode step guards on that, and would recompile for a mix (it costs nothing eager).
            with torch.inference_mode():
                self._loop()
        finally:
            if self._prefix is not None:  # a stopped engine's KV goes with it (a park moves the weights away)
                self._prefix.clear()

    def _loop(self) -> None:
        batch = DecodeBatch(self.adapter, self._prefix, self._decode)
        limit, clean_steps = self.max_batch_size, 0  # the limit halves on out-of-memory, then grows back
        held = 0  # decode steps the queued newcomers have waited for others to join with them
        while True:
            with self._cond:
                while not self._queue and not batch.rows and not self._stopping:
                    self._cond.wait()
                if not self._queue and not batch.rows:
                    return
                room = limit - len(batch.rows)
                if self._queue and batch.rows and room > 0 and held < JOIN_HOLD_STEPS and not self._stopping \
                        and len(self._queue) < max(1, len(batch.rows) // 2):
                    joining, held = [], held + 1
                else:
                    joining, held = self._take_joining(room), 0
                self._running = [row.job for row in batch.rows] + joining
            self._observe("on_batch", self.key, len(batch.rows) + len(joining))
            self._peak = max(self._peak, len(batch.rows) + len(joining))
            try:
                if joining:
                    with phase("engine.join"):
                        batch.join(joining)
                with phase("engine.step"):
                    batch.step()
                clean_steps += 1
                if limit < self.max_batch_size and clean_steps >= GROW_BACK_STEPS:
                    limit, clean_steps = limit + 1, 0
            except Exception as exc:
                limit, clean_steps = self._recover(batch, joining, exc, limit), 0
                batch = DecodeBatch(self.adapter, self._prefix, self._decode) if not batch.intact else batch
            with phase("engine.collect"):
                finished = batch.collect_finished()
            with self._cond:
                self._running = [row.job for row in batch.rows]
            self._count(len(joining), finished)

    def _recover(self, batch: "DecodeBatch", joining: list[Job], exc: Exception, limit: int) -> int:
        """Out of memory while prefilling newcomers: they go back to the front of the queue and the
        running rows go on. Any failure inside a step leaves the shared cache half-written: every
        running row fails (out of memory: a 503, the model stays loaded). Returns the new row limit."""
        oom = is_out_of_memory(exc)
        if oom:
            release_cached_memory()
            self._observe("on_oom", self.key)
            limit = max(1, limit // 2)
        if oom and batch.intact and joining and not any(job in batch.jobs for job in joining):
            log.warning("prefill of %d joining rows on %s ran out of memory; %d rows at most now", len(joining),
                        self.key, limit)
            with self._cond:
                self._queue.extendleft(reversed(joining))
            return limit
        log.error("decode step of %s failed (%s); failing its %d rows", self.key, type(exc).__name__,
                  len(batch.rows) + len(joining), exc_info=not oom)
        error = OutOfMemory(f"'{self.key}' ran out of device memory with {len(batch.rows)} rows running; retry "
                            f"later", retry_after=5) if oom else exc
        for job in batch.jobs + joining:
            job.fail(error)
        batch.intact = False
        return limit


class DecodeRow(RowState):
    """A running row: its state, with its own RowSampler (utils/engine/sampling.py) choosing its tokens."""

    def __init__(self, job: Job, adapter: Any) -> None:
        super().__init__(job, eos_ids=adapter._eos_ids(), tokenizer=adapter._tokenizer(),
                         build_result=adapter.result_from_tokens)
        self.job = job
        self.prompt_ids = job.prepared["input_ids"][0].tolist()

    def add(self, token: int) -> bool:
        with phase("engine.emit"):  # stop strings, detokenizing, streaming, the result
            return super().add(token)


class DecodeBatch:
    """The running rows, their shared KV cache and attention mask; every forward pass of a
    continuous engine happens here, on the engine's thread."""

    def __init__(self, adapter: Any, prefix: PrefixCache | None = None, decode: Any = None) -> None:
        self.adapter, self.model = adapter, adapter.model
        self.decode = decode if decode is not None else adapter.model  # the decode step's forward
        self.prefix = prefix
        self._cache_arg = cache_argument(self.model)
        self.rows: list[DecodeRow] = []
        self.cache: Any = None
        self.mask: Any = None            # [rows, cache length]: 1 for real tokens, 0 for padding
        self.intact = True               # False once a failed forward may have half-written the cache

    @property
    def jobs(self) -> list[Job]:
        return [row.job for row in self.rows]

    def join(self, jobs: list[Job]) -> None:
        """Prefills the joining requests together and stacks their cache under the running rows.
        A row whose prompt starts like a cached one prefills only the rest: its cached prefix goes
        into the joining cache, left-padded to the longest reused prefix, and its new tokens after it."""
        import torch  # deferred: torch
        from transformers import DynamicCache  # deferred: transformers

        rows = [DecodeRow(job, self.adapter) for job in jobs]
        # Joining rows with the same prompt (a request's n choices, or equal prompts) share one prefill:
        # its cache row is repeated for each of them.
        unique: dict[tuple, int] = {}
        owner = [unique.setdefault(tuple(row.prompt_ids), len(unique)) for row in rows]
        firsts = [rows[owner.index(i)] for i in range(len(unique))]
        wants_prompt = any(row.job.params.prompt_logprobs is not None for row in rows)  # echo: every position
        reuse = [self.prefix.lookup(row.prompt_ids) if self._reusable(row) and not wants_prompt else (0, None)
                 for row in firsts]
        width = max(reused for reused, _ in reuse)  # columns of cached prefixes, before the new tokens
        cache = DynamicCache(config=self.model.config)
        if width:
            _fill_prefixes(cache, reuse, width)
        prompts = [row.job.prepared if not reused else
                   {name: value[:, reused:] for name, value in row.job.prepared.items()}
                   for row, (reused, _) in zip(firsts, reuse)]
        inputs = collate(prompts, side="left", pad_id=self.adapter._pad_id())
        new_mask = inputs.pop("attention_mask")
        mask = new_mask if not width else torch.cat(
            [torch.stack([_pad_left(new_mask.new_ones(reused), width, dim=0) for reused, _ in reuse]), new_mask],
            dim=1)
        length = new_mask.shape[1]
        with phase("engine.prefill"), torch.inference_mode():
            logits = self.model(input_ids=inputs["input_ids"], attention_mask=mask,
                                position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, width:],
                                cache_position=torch.arange(width, width + length, device=mask.device),
                                use_cache=True, logits_to_keep=0 if wants_prompt else 1,
                                **{self._cache_arg: cache}).logits
        for row, i in zip(rows, owner):  # no prefix is reused when a row asks for its prompt's logprobs
            if row.job.params.prompt_logprobs is not None:
                logits_rows = logits[i, logits.shape[1] - len(row.prompt_ids):]
                row.prompt_logprobs = prompt_logprobs(logits_rows, row.prompt_ids, row.job.params.prompt_logprobs)
        logits = logits[:, -1, :]
        if self.prefix is not None:
            self._keep_prompts(firsts, reuse, cache, mask, width)
        if len(unique) < len(rows):
            index = torch.tensor(owner, device=mask.device)
            cache.batch_select_indices(index)
            mask, logits = mask[index], logits[index]
        self.intact = False  # until the new cache is stacked under the running one
        with phase("engine.merge"):
            self._merge(cache, mask)
        self.rows += rows
        self.intact = True
        with phase("engine.sample"):
            self._advance(rows, logits)

    def _keep_prompts(self, rows: list[DecodeRow], reuse: list, cache: Any, mask: Any, width: int) -> None:
        """Each plain prompt's KV into the prefix cache: its own columns, copied (so the joining
        batch's tensors are not pinned by an entry), unless the row is the batch and has no padding."""
        alone = len(rows) == 1 and bool(mask.all())
        for i, (row, (reused, _)) in enumerate(zip(rows, reuse)):
            if not self._reusable(row):
                continue
            if alone:
                self.prefix.add(row.prompt_ids, [(layer.keys, layer.values) for layer in cache.layers])
                continue
            columns = mask[i].nonzero().squeeze(-1)  # the prompt's tokens; padding left and between
            self.prefix.add(row.prompt_ids, [(layer.keys[i:i + 1].index_select(2, columns),
                                              layer.values[i:i + 1].index_select(2, columns))
                                             for layer in cache.layers])

    def _reusable(self, row: DecodeRow) -> bool:
        """Plain text prompts only: their KV depends on their tokens alone (media inputs would not)."""
        prepared = row.job.prepared
        if self.prefix is None or not set(prepared) <= {"input_ids", "attention_mask"}:
            return False
        mask = prepared.get("attention_mask")
        return mask is None or bool(mask.all())

    def step(self) -> None:
        """One decode step for every running row that is still open."""
        import torch  # deferred: torch

        if all(row.done for row in self.rows):  # e.g. every joining row finished at its prefill (1 token,
            return                               # or eos first): a forward now would only be thrown away
        last = torch.tensor([[row.tokens[-1]] for row in self.rows], device=self.mask.device)
        self.intact = False  # a forward that fails half-way leaves some layers one token longer
        with phase("engine.forward"):
            logits, self.mask = decode_step(self.decode, self._cache_arg, last, self.mask, self.cache)
        self.intact = True
        with phase("engine.sample"):
            self._advance(self.rows, logits)

    def collect_finished(self) -> list[int]:
        """Drops finished rows from the batch (cache and mask too); returns their token counts."""
        import torch  # deferred: torch

        for row in self.rows:
            row.close_if_cancelled()
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        finished = [len(row.tokens) for row in self.rows if row.done]
        if len(keep) < len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            if not keep:
                self.cache, self.mask = None, None
            else:
                index = torch.tensor(keep, device=self.mask.device)
                self.cache.batch_select_indices(index)
                self.mask = self.mask[index]
                self._trim_padding()
        return finished

    # ------------------------------------------------------------------ helpers

    def _advance(self, rows: list[DecodeRow], logits: Any) -> None:
        """Chooses each open row's next token (its RowSampler; one argmax when all are plain greedy)."""
        chosen = choose_tokens([row.sampler for row in rows], logits, [not row.done for row in rows])
        for row, token in zip(rows, chosen):
            if not row.done:
                row.add(int(token))

    def _merge(self, cache: Any, mask: Any) -> None:
        """Stacks a new cache (and mask) under the running one, left-padding the shorter."""
        import torch  # deferred: torch

        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, width, dim=2), _pad_left(new.keys, width, dim=2)], dim=0)
            old.values = torch.cat([_pad_left(old.values, width, dim=2), _pad_left(new.values, width, dim=2)],
                                   dim=0)
        self.mask = torch.cat([_pad_left(self.mask, width, dim=1), _pad_left(mask, width, dim=1)], dim=0)

    def _trim_padding(self) -> None:
        """Drops leading columns that are padding in every row (left by rows that finished)."""
        real = self.mask.any(dim=0).nonzero()
        start = int(real[0]) if len(real) else 0
        if start:
            for layer in self.cache.layers:  # contiguous: the shape of cache a compiled decode step expects
                layer.keys = layer.keys[:, :, start:].contiguous()
                layer.values = layer.values[:, :, start:].contiguous()
            self.mask = self.mask[:, start:]


def cache_argument(model: Any) -> str:
    """transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name warns)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decode_step(forward: Any, cache_arg: str, last: Any, mask: Any, cache: Any) -> tuple[Any, Any]:
    """One decode forward of every row (`last`: [rows, 1], each row's newest token; `mask`: [rows, cache
    length]); the next-token logits and the mask one column longer. The one call a compiled decode step
    is traced from: the warm-up goes through here too, so it compiles the graphs the engine will run."""
    import torch  # deferred: torch

    length = mask.shape[1]
    positions = mask.sum(-1, keepdim=True)  # each row's count of real tokens so far
    mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
    with torch.inference_mode():
        logits = forward(input_ids=last, attention_mask=mask, position_ids=positions, use_cache=True,
                         cache_position=torch.arange(length, length + 1, device=mask.device),
                         **{cache_arg: cache}).logits[:, -1, :]
    return logits, mask


def _warm_up(adapter: Any, compiled: Any, rows: int) -> None:
    """Compiles the decode step for `rows` rows: an eager prefill of a few tokens, then decode steps
    through `compiled` on inputs of the kinds and dtypes a served batch has (a tokenizer's int64 ids
    and mask, left padding in one row when there are several)."""
    import torch  # deferred: torch
    from transformers import DynamicCache  # deferred: transformers

    model = adapter.model
    device = next(model.parameters()).device
    length = WARM_UP_PROMPT
    with torch.inference_mode():  # as the engine's loop runs
        ids = torch.full((rows, length), adapter._pad_id(), dtype=torch.long, device=device)
        mask = torch.ones((rows, length), dtype=torch.long, device=device)
        if rows > 1:
            mask[-1, :2] = 0
        cache, cache_arg = DynamicCache(config=model.config), cache_argument(model)
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
              cache_position=torch.arange(length, device=device), logits_to_keep=1, **{cache_arg: cache})
        last = torch.full((rows, 1), adapter._pad_id(), dtype=torch.long, device=device)  # as step makes it
        for _ in range(3):  # the first call compiles; the next ones check that the graph is reused
            _, mask = decode_step(compiled, cache_arg, last, mask, cache)


def _fill_prefixes(cache: Any, reuse: list, width: int) -> None:
    """The joining rows' cached prefixes as the first `width` columns of their cache, each
    left-padded (zeros, masked); rows without one get padding only."""
    import torch  # deferred: torch

    some = next(entry for _, entry in reuse if entry is not None)
    for index, (keys, values) in enumerate(some.layers):
        pad_k = keys.new_zeros((1, keys.shape[1], width, keys.shape[3]))
        pad_v = values.new_zeros((1, values.shape[1], width, values.shape[3]))
        rows_k = [pad_k if entry is None else _pad_left(entry.layers[index][0][:, :, :reused], width, dim=2)
                  for reused, entry in reuse]
        rows_v = [pad_v if entry is None else _pad_left(entry.layers[index][1][:, :, :reused], width, dim=2)
                  for reused, entry in reuse]
        cache.update(torch.cat(rows_k, dim=0), torch.cat(rows_v, dim=0), index)


def _pad_left(tensor: Any, width: int, dim: int) -> Any:
    import torch  # deferred: torch

    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
