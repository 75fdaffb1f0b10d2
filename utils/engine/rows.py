"""What the engine hands a family for one batch: rows, their padded inputs, and a tracker that
hands each row its tokens as they come and its result the step it finishes.

No Flask, no queue here; torch only where tensors are built.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Protocol, Sequence

from utils.engine.types import GenerationParams, GenerationResult

# Per-token keys padded to the batch's width; every other processor output is stacked row after row.
SEQUENCE_PAD_VALUES = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0}


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
    """Rows with equal keys can share one generate call: greedy rows always (their max_new_tokens
    may differ), sampling rows when every sampling parameter is equal. A seeded row runs alone, so
    its draws are the same whoever else is queued."""
    if not params.do_sample:
        return ("greedy", params.repetition_penalty)
    if params.seed is not None:
        return ("seeded", job_id)
    return ("sample", params.temperature, params.top_p, params.top_k, params.repetition_penalty)


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
            out[key] = torch.cat(values, dim=0)
        elif isinstance(values[0], list):
            out[key] = [item for value in values for item in value]
        else:
            out[key] = values[0]
    return out


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
            self.row.emit(text[len(self._emitted):])
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
