"""What the engine hands a family for one batch: rows, their padded inputs, and a tracker that
hands each row its tokens as they come and its result the step it finishes.

No Flask, no queue here; torch only where tensors are built.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Protocol, Sequence

from utils.engine.phases import phase
from utils.engine.sampling import RowSampler, decoded
from utils.engine.types import GenerationParams, GenerationResult

# Per-token keys padded to the batch's width; every other processor output is stacked row after row.
SEQUENCE_PAD_VALUES = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0, "token_type_ids": 0}
# Media tensors shaped (rows, images, ...) whose rows may hold different numbers of images (Idefics3 /
# SmolVLM: (1, n, 3, H, W) and its pixel mask): zero-filled up to the batch's most. The models skip
# all-zero images (Idefics3 counts only "real" images), LLaVA-OneVision slices patches by image_sizes.
IMAGE_SLOT_KEYS = ("pixel_values", "pixel_attention_mask")


class BatchRow(Protocol):
    """One request inside a batch, as a family sees it."""
    prepared: dict
    params: GenerationParams

    @property
    def cancelled(self) -> bool: ...
    @property
    def streaming(self) -> bool: ...
    @property
    def expired(self) -> bool: ...
    def emit(self, piece: str) -> None: ...
    def finish(self, result: GenerationResult) -> None: ...


def batch_key(params: GenerationParams, job_id: int) -> tuple:
    """Rows with equal keys can share one generate call: every row of a family that generates
    through Family.generate_batch, whatever its sampling, penalties or seed: each row chooses its own
    tokens (utils/engine/sampling.py, ForcedChoice) from its own generator."""
    return ("generate",)


class LoggedPiece(str):
    """A streamed text piece that also carries the logprobs of the tokens it completes (decoded
    entries, utils/engine/sampling.decoded); an ordinary str to every other reader."""
    logprobs: list = []


def collate(prepared: Sequence[dict], *, side: str, pad_id: int) -> dict:
    """Pads per-token tensors to one width on `side` and stacks the rest (pixel patches, audio
    features, grids) in row order, which is the order the models match them to their tokens."""
    import torch  # deferred: torch

    if len(prepared) == 1:
        return dict(prepared[0])
    width = max(int(p["input_ids"].shape[1]) for p in prepared)
    out: dict[str, Any] = {}
    for key in prepared[0].keys() | {k for p in prepared for k in p}:
        values = [p[key] for p in prepared if key in p]
        if key in SEQUENCE_PAD_VALUES:
            fill = pad_id if SEQUENCE_PAD_VALUES[key] is None else SEQUENCE_PAD_VALUES[key]
            padded = []
            for value in values:
                pad = value.new_full((value.shape[0], width - value.shape[1]), fill)
                padded.append(torch.cat([pad, value] if side == "left" else [value, pad], dim=1))
            out[key] = torch.cat(padded, dim=0)
        elif hasattr(values[0], "shape"):
            out[key] = torch.cat(_same_slots(values) if key in IMAGE_SLOT_KEYS else values, dim=0)
        elif isinstance(values[0], list):
            out[key] = [item for value in values for item in value]
        else:
            out[key] = values[0]
    return out


def _same_slots(values: list) -> list:
    """Tensors of rank >= 3 that differ only in dim 1 (images per row) zero-padded to the largest."""
    import torch  # deferred: torch

    if len({tuple(v.shape[1:]) for v in values}) == 1 or len({v.dim() for v in values}) != 1 or values[0].dim() < 3 \
            or len({tuple(v.shape[2:]) for v in values}) != 1:
        return values
    most = max(int(v.shape[1]) for v in values)
    return [torch.cat([v, v.new_zeros((v.shape[0], most - v.shape[1], *v.shape[2:]))], dim=1)
            if v.shape[1] < most else v for v in values]


class RowState:
    """One row's generated tokens: finishes it at its eos, a stop string, its max_new_tokens or its
    cancellation, streams its new text, and hands it its result the step it finishes."""

    def __init__(self, row: BatchRow, *, eos_ids: set[int], tokenizer: Any,
                 build_result: Callable[[list[int], int, str], GenerationResult]) -> None:
        self.row = row
        self.prompt_tokens = int(row.prepared["input_ids"].shape[1])
        self.tokens: list[int] = []
        self.done = False
        self._eos, self._tokenizer, self._build_result = eos_ids, tokenizer, build_result
        self._stops = tuple(s for s in row.params.stop if s)
        self._stop_at: int | None = None   # where the first stop string starts in the decoded text
        self._emitted = ""
        self._progress = getattr(row, "progress", None)  # readers (a job's status) poll tokens so far
        ids = row.prepared.get("input_ids") if isinstance(row.prepared, dict) else None
        self.sampler = RowSampler(row.params, prompt_ids=ids, device=getattr(ids, "device", None),
                                  tokenizer=tokenizer, stop_ids=eos_ids)
        self.prompt_logprobs: list | None = None  # set by the engine when params.prompt_logprobs asks
        self._logprobs_sent = 0                   # entries streamed with pieces so far

    def add(self, token: int) -> bool:
        """Appends one generated token; True when the row is finished."""
        self.tokens.append(token)
        if self._progress is not None:
            self._progress(len(self.tokens), self.row.params.max_new_tokens)
        if token in self._eos:
            self.close("stop")
        elif self._stops and self._find_stop():
            self.close("stop")
        elif len(self.tokens) >= self.row.params.max_new_tokens:
            self.close("length")
        elif self.sampler.constraints and self.sampler.terminated:  # e.g. a grammar fully matched
            self.close("stop")
        elif self.row.streaming:
            self._emit_new_text(final=False)
        return self.done

    def close_if_cancelled(self) -> bool:
        """Between steps: a row whose client left, or whose own deadline passed, ends here."""
        if not self.done and self.row.cancelled:
            self.close("cancelled")
        elif not self.done and getattr(self.row, "expired", False):
            self.close("timeout")
        return self.done

    def close(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        if self.row.streaming:
            self._emit_new_text(final=True)
        result = self._build_result(list(self.tokens), self.prompt_tokens, reason)
        if self.sampler.logprobs is not None:
            result.logprobs = decoded(self.sampler.logprobs, self._tokenizer)
        if self.prompt_logprobs is not None:
            result.prompt_logprobs = decoded(self.prompt_logprobs, self._tokenizer)
        self.row.finish(cut_at_stop(result, self._stops) if self._stop_at is not None else result)

    def _text(self) -> str:
        return self._tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _find_stop(self) -> bool:
        text = self._text()
        found = [i for i in (text.find(stop) for stop in self._stops) if i >= 0]
        if found:
            self._stop_at = min(found)
        return bool(found)

    def _emit_new_text(self, *, final: bool) -> None:
        text = self._text()
        if self._stop_at is not None:
            text = text[:self._stop_at]
        elif self._stops and not final:  # hold back what may still become a stop string
            text = text[:max(len(self._emitted), len(text) - max(map(len, self._stops)) + 1)]
        if text.endswith("\ufffd") and not final:  # a multi-byte character is not complete yet
            return
        if text.startswith(self._emitted) and len(text) > len(self._emitted):
            piece = text[len(self._emitted):]
            entries = self.sampler.logprobs
            if entries is not None:  # the tokens since the last piece (a reader gets any rest from the result)
                piece = LoggedPiece(piece)
                piece.logprobs = decoded(entries[self._logprobs_sent:], self._tokenizer)
                if self.prompt_logprobs is not None and not self._emitted:  # an echo's, with its first piece
                    piece.prompt_logprobs = decoded(self.prompt_logprobs, self._tokenizer)
                self._logprobs_sent = len(entries)
            self.row.emit(piece)
            self._emitted = text


def cut_at_stop(result: GenerationResult, stops: tuple[str, ...]) -> GenerationResult:
    """The result up to the first stop string (in the reasoning, or else in the answer), excluded."""
    for name in ("reasoning", "text"):
        value = getattr(result, name) or ""
        hits = [i for i in (value.find(stop) for stop in stops) if i >= 0]
        if hits:
            cut = value[:min(hits)]
            return replace(result, reasoning=cut, text="") if name == "reasoning" else replace(result, text=cut)
    return result


class RowTracker:
    """Streamer and stopping criterion of one batched `generate` call.

    transformers calls `put` with the prompt first and then with each step's new token of every row;
    a row's result is delivered the step it finishes, so a short answer does not wait for the
    batch's longest. Rows it reports finished get padding from then on.
    """

    def __init__(self, rows: Sequence[BatchRow], **row_args: Any) -> None:
        self.states = [RowState(row, **row_args) for row in rows]
        self._seen_prompt = False

    # -- streamer interface (transformers' BaseStreamer)
    def put(self, value: Any) -> None:
        if not self._seen_prompt:  # the first call carries the prompt (or the decoder's start token)
            self._seen_prompt = True
            return
        with phase("engine.emit"):
            for state, token in zip(self.states, value.reshape(-1).tolist()):
                if not state.done:
                    state.add(int(token))

    def end(self) -> None:
        pass

    # -- stopping criterion (transformers' StoppingCriteria protocol)
    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch  # deferred: torch
        return torch.tensor([state.close_if_cancelled() for state in self.states], dtype=torch.bool,
                            device=input_ids.device)

    def finish_all(self, reason: str = "length") -> None:
        """After generate returns: any row still open ends with what it has."""
        for state in self.states:
            state.close(reason)


class AllRowsEnded(Exception):
    """Raised from inside a family's model call once every row of it has ended: the call stops there."""


class OpenRows:
    """The rows of one call that runs a fixed number of steps with no token stream (a drawing, a
    transcription, a diffusion): between steps a row whose client left or whose deadline passed ends
    at once with what it is (cancelled / timeout), the others hear their progress, and once none is
    left the call stops (AllRowsEnded) rather than spend steps nobody waits for."""

    def __init__(self, rows: Sequence[BatchRow], total_steps: int | None = None) -> None:
        self.rows, self.total_steps = list(rows), total_steps
        self._ended: set[int] = set()

    def ended(self, row: BatchRow) -> bool:
        return id(row) in self._ended

    def check(self, step: int | None = None) -> None:
        """End the rows nobody waits for; report `step` of total_steps to the others (when given)."""
        for row in self.rows:
            if self.ended(row):
                continue
            reason = "cancelled" if row.cancelled else ("timeout" if getattr(row, "expired", False) else None)
            if reason:
                self._ended.add(id(row))
                row.finish(GenerationResult(text="", prompt_tokens=0, completion_tokens=0, finish_reason=reason))
            elif step is not None and getattr(row, "progress", None) is not None:
                row.progress(step, self.total_steps)
        if len(self._ended) == len(self.rows):
            raise AllRowsEnded
