"""One row's processing of the logits: the one place that turns a request's GenerationParams into
the choice of its next token, for both engines (continuous.py calls `choose_tokens` on each step's
logits; the dynamic engine's `generate` runs `ForcedChoice`, a logits processor that makes each row's
own choice and forces it).

The pipeline of a row, on its float32 logits, in this order:
1. logprobs (when asked): log-softmax of the model's raw logits (vLLM's default, `raw_logprobs`):
   the chosen token's and the `logprobs` most likely ones.
2. repetition_penalty (transformers' RepetitionPenaltyLogitsProcessor, over prompt + generated ids).
3. frequency_penalty and presence_penalty, OpenAI's definition over the generated tokens only:
   logit[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0).
4. logit_bias: logit[j] += bias[j].
5. constraints (the hook below): each masks what it does not allow.
6. greedy: argmax. Sampling: temperature, top_k, top_p, min_p (transformers' warpers, in generate's
   order), then one draw from the row's own torch.Generator: seeded when the request gives a seed,
   so a seeded row draws the same whoever shares its batch.

Extra per-row constraints (grammar-constrained decoding, branch i27g): `RowSampler.constraints` is a
list of objects with
    mask(logits: Tensor[vocab]) -> Tensor | None   # disallowed ids to -inf: in place (return None) or
                                                  # returning the tensor to use
    advance(token_id: int) -> None                 # the token chosen for this row, after the choice
    is_terminated() -> bool                        # optional: True ends the row ("stop") after a token
A sampler gets its constraints when it is built, from `CONSTRAINT_BUILDERS`: functions
`builder(params, tokenizer, stop_ids)` of the row's GenerationParams, the tokenizer its answer is decoded
with and its eos ids, returning a constraint for the row or None (e.g. a grammar's matcher for a row whose
params carry one). Register one with `CONSTRAINT_BUILDERS.append(builder)`. The sampler advances its
constraints itself (RowSampler.accept); a row with one always goes through the full pipeline (never the
batch-wide argmax shortcut).

No Flask here; torch only inside the functions that build tensors.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Callable, Sequence

# What a logprob of -inf becomes in JSON (vLLM's value): JSON has no infinity.
LOGPROB_FLOOR = -9999.0
# params -> a constraint object (mask, advance) for that row, or None; see the module docstring.
CONSTRAINT_BUILDERS: list[Callable[[Any], Any]] = []


@dataclass(frozen=True)
class TokenLogprob:
    """One position's logprobs: the chosen token and the most likely ones (ids and log-probabilities)."""
    token_id: int
    logprob: float | None   # None: a prompt's first token (nothing before it to predict it)
    top: tuple[tuple[int, float], ...] = ()


class RowSampler:
    """Chooses one row's tokens from its logits (see the module docstring for the pipeline)."""

    def __init__(self, params: Any, prompt_ids: Any = None, device: Any = None, *, tokenizer: Any = None,
                 stop_ids: set[int] | frozenset = frozenset()) -> None:
        self.params = params
        self.constraints: list = [c for c in (build(params, tokenizer, stop_ids) for build in CONSTRAINT_BUILDERS)
                                  if c is not None]
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self._prompt_ids = prompt_ids    # a [1, n] tensor or a list; read only for repetition_penalty
        self._history: list[int] | None = None
        self._counts: Any = None         # [vocab] float tensor of generated-token counts (penalties)
        self._bias: tuple[Any, Any] | None = None
        self._device = device
        self._warpers: list | None = None
        self._generator: Any = None

    @property
    def plain(self) -> bool:
        """Greedy on the raw logits with nothing to record: the batch-wide argmax is this row's choice."""
        return not self.constraints and is_plain(self.params)

    def choose(self, logits: Any) -> int:
        """The next token for this row from its logits ([vocab]); records what it must and advances
        the row's penalties and constraints."""
        import torch  # deferred: torch

        scores = logits.float().reshape(1, -1)
        raw = torch.log_softmax(scores[0], dim=-1) if self.logprobs is not None else None
        scores = self._penalise(scores)
        for constraint in self.constraints:
            masked = constraint.mask(scores[0])  # scores[0] is a view: an in-place mask lands in scores
            if masked is not None:
                scores = masked.reshape(1, -1)
        if not self.params.do_sample:
            token = int(scores[0].argmax())
        else:
            for warper in self._sampling_warpers():
                scores = warper(None, scores)
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self._rng(scores.device)))
        if raw is not None:
            self.logprobs.append(_logprob_entry(raw, token, self.params.logprobs))
        self.accept(token)
        return token

    @property
    def terminated(self) -> bool:
        """A constraint says the row is complete (a grammar that has matched all it takes)."""
        return any(getattr(c, "is_terminated", lambda: False)() for c in self.constraints)

    def accept(self, token: int) -> None:
        """A token chosen for this row (by `choose`, or by the batch-wide argmax of a plain row)."""
        if self._counts is not None:
            if token < self._counts.shape[0]:
                self._counts[token] += 1
        if self._history is not None:
            self._history.append(token)
        for constraint in self.constraints:
            constraint.advance(token)

    # ------------------------------------------------------------------ the steps

    def _penalise(self, scores: Any) -> Any:
        import torch  # deferred: torch

        p = self.params
        if p.repetition_penalty not in (None, 1.0):
            from transformers import RepetitionPenaltyLogitsProcessor  # deferred: transformers
            if self._history is None:
                ids = self._prompt_ids
                self._history = list(ids.reshape(-1).tolist() if hasattr(ids, "reshape") else ids or [])
            if self._history:
                ids = torch.tensor([self._history], device=scores.device)
                scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, scores)
        if p.frequency_penalty or p.presence_penalty:
            if self._counts is None:  # first step: nothing generated yet, nothing to penalise
                self._counts = torch.zeros(scores.shape[-1], dtype=torch.float32, device=scores.device)
            else:
                scores = scores - (p.frequency_penalty * self._counts
                                   + p.presence_penalty * (self._counts > 0).float())
        if p.logit_bias:
            if self._bias is None:
                width = scores.shape[-1]
                kept = [(token, bias) for token, bias in p.logit_bias if 0 <= token < width]
                self._bias = (torch.tensor([t for t, _ in kept], dtype=torch.long, device=scores.device),
                              torch.tensor([b for _, b in kept], dtype=scores.dtype, device=scores.device))
            ids, values = self._bias
            scores = scores.clone()
            scores[0, ids] += values
        return scores

    def _sampling_warpers(self) -> list:
        if self._warpers is None:
            from transformers import (MinPLogitsWarper, TemperatureLogitsWarper,  # deferred: transformers
                                      TopKLogitsWarper, TopPLogitsWarper)
            p, warpers = self.params, []
            if p.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(p.temperature))
            if p.top_k:
                warpers.append(TopKLogitsWarper(p.top_k))
            if p.top_p < 1.0:
                warpers.append(TopPLogitsWarper(p.top_p))
            if p.min_p:
                warpers.append(MinPLogitsWarper(p.min_p))
            self._warpers = warpers
        return self._warpers

    def _rng(self, device: Any) -> Any:
        if self._generator is None:
            import torch  # deferred: torch
            self._generator = torch.Generator(device=self._device if self._device is not None else device)
            seed = self.params.seed
            self._generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        return self._generator


def choose_tokens(samplers: Sequence[RowSampler], logits: Any, open_rows: Sequence[bool] | None = None) -> list[int]:
    """Each row's next token from the batch's logits ([rows, vocab]): one argmax for the whole batch
    when every row is plain, else each row through its own pipeline (closed rows get any token).
    Runs in inference mode (the logits are inference tensors; constraints may mask them in place)."""
    import torch  # deferred: torch

    with torch.inference_mode():
        scores = logits.float()
        greedy = scores.argmax(-1).tolist()
        if all(sampler.plain for sampler in samplers):
            return greedy
        chosen = []
        for i, sampler in enumerate(samplers):
            if open_rows is not None and not open_rows[i]:
                chosen.append(greedy[i])
            elif sampler.plain:
                sampler.accept(greedy[i])
                chosen.append(greedy[i])
            else:
                chosen.append(sampler.choose(scores[i]))
        return chosen


class ForcedChoice:
    """A logits processor for one batched `generate` (the dynamic engine): each open row's token is
    chosen by its own RowSampler and forced (every other id at -inf), so `generate` runs greedy and
    rows with different sampling, penalties, seeds and constraints share one call.

    `states` are the rows' RowStates: their `sampler`, and `done` (a finished row gets padding)."""

    def __init__(self, states: Sequence[Any]) -> None:
        self.states = states

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch  # deferred: torch

        tokens = choose_tokens([s.sampler for s in self.states], scores, [not s.done for s in self.states])
        forced = torch.full_like(scores, float("-inf"))
        forced[torch.arange(len(tokens), device=scores.device), torch.tensor(tokens, device=scores.device)] = 0.0
        return forced


def is_plain(params: Any) -> bool:
    """Greedy decoding with no penalty, bias or logprobs: generate's own argmax gives the same tokens."""
    return (not params.do_sample and params.logprobs is None and params.repetition_penalty in (None, 1.0)
            and not params.frequency_penalty and not params.presence_penalty and not params.logit_bias)


def prompt_logprobs(logits: Any, ids: Sequence[int], top: int) -> list[TokenLogprob]:
    """Logprobs of each prompt token under the model's logits at the position before it ([len, vocab],
    position t predicts token t+1); the first token has none (logprob None), as OpenAI's echo shows it."""
    import torch  # deferred: torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out: list[TokenLogprob] = [TokenLogprob(int(ids[0]), None)]
    for position in range(1, len(ids)):
        out.append(_logprob_entry(logprobs[position - 1], int(ids[position]), top))
    return out


def _logprob_entry(logprobs: Any, token: int, top: int) -> TokenLogprob:
    """One position's entry from its log-probabilities ([vocab]): the chosen token and the `top` most likely."""
    import torch  # deferred: torch

    top_ids: tuple[tuple[int, float], ...] = ()
    if top:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
        top_ids = tuple((int(i), _finite(float(v))) for i, v in zip(ids.tolist(), values.tolist()))
    return TokenLogprob(int(token), _finite(float(logprobs[token])), top_ids)


def _finite(value: float) -> float:
    return value if value > LOGPROB_FLOOR else LOGPROB_FLOOR


def decoded(entries: Sequence[TokenLogprob | None], tokenizer: Any) -> list[dict | None]:
    """Entries with token texts: {"token", "token_id", "logprob", "top": [{"token", "token_id",
    "logprob"}]} (each token decoded alone, as vLLM shows it)."""
    ids = sorted({i for e in entries if e is not None for i in (e.token_id, *(t for t, _ in e.top))})
    texts = dict(zip(ids, tokenizer.batch_decode([[i] for i in ids]))) if ids else {}
    return [None if e is None else
            {"token": texts[e.token_id], "token_id": e.token_id, "logprob": e.logprob,
             "top": [{"token": texts[t], "token_id": t, "logprob": v} for t, v in e.top]}
            for e in entries]
