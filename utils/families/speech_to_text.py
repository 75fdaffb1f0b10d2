"""Speech to text: Whisper (WhisperForConditionalGeneration + WhisperProcessor), served at
/v1/audio/transcriptions (utils/api/transcription.py parses the form and writes every response format).

`prepare` turns a request's audio into log-mel features: up to 30 s padded to one window, as
Whisper was trained; longer audio whole, with its frame mask, for transformers' sequential
long-form algorithm (the Whisper paper's: 30 s windows, each starting where the previous one's
last timestamp ended). Rows that decode alike (timestamps or not, words, long-form, temperature,
prompt) share one `generate`; languages may differ per row (Whisper takes one per row), and rows
with none get theirs detected first, in one batched pass. Word timestamps come from Whisper's
cross-attention alignment heads (dynamic time warping in transformers), grouped into words here.
Between decoding steps a stopping criterion ends rows whose client left and stops the call once
no row is left.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

from utils.engine.rows import AllRowsEnded, OpenRows
from utils.errors import InvalidInput
from utils.families.base import Family, GenerationRequest, GenerationResult


@dataclass(frozen=True)
class TranscriptionParams:
    """One transcription's decoding (utils/api/transcription.py validates it before any load)."""
    max_new_tokens: int            # per 30 s window
    temperature: float = 0.0       # 0: greedy
    language: str | None = None    # an ISO code of the checkpoint's languages; None: detected
    timestamps: bool = False       # segments with start and end (verbose_json, srt, vtt)
    words: bool = False            # word timestamps too
    seed: int | None = None
    top_p: float = 1.0
    grammar: None = None           # never constrained; read off every row like GenerationParams.grammar

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


class SpeechToTextFamily(Family):
    name = "speech_to_text"
    accepts = frozenset({"audio"})
    answers_prompts = False  # it transcribes; /generate, chat and jobs refuse it before any load
    uses_chat_template = False
    model_class = "WhisperForConditionalGeneration"
    processor_class = "WhisperProcessor"
    quant_skip_modules = ["model.encoder", "proj_out"]

    @classmethod
    def load(cls, spec: Any, device: str, cache: Any = None) -> "SpeechToTextFamily":
        # Whisper's generate hands the inner generate a config with max_length set, so every call that
        # passes max_new_tokens (ours: per window, always) logs "Both max_new_tokens and max_length seem to
        # have been set": noise on every request. Only that message is dropped.
        generation_log = logging.getLogger("transformers.generation.utils")
        if not any(isinstance(f, _BothLengthsNotice) for f in generation_log.filters):
            generation_log.addFilter(_BothLengthsNotice())
        return super().load(spec, device, cache)

    def prepare(self, request: GenerationRequest) -> dict:
        self.check_request(request)
        if len(request.audios) != 1:
            raise InvalidInput(f"'{self.spec.key}' transcribes one audio file per request", field="file",
                               error="missing field" if not request.audios else "too many media items")
        audio = request.audios[0]
        extractor = self.processor.feature_extractor
        long = len(audio) > extractor.n_samples
        with self.client_data(request, "processor"):
            if long:  # whole, unpadded, with its frame mask: generate cuts it into windows
                features = extractor(audio, sampling_rate=extractor.sampling_rate, return_tensors="pt",
                                     truncation=False, padding="longest", return_attention_mask=True)
            else:  # padded to 30 s; the mask tells generate where the audio ends (segment and word times)
                features = extractor(audio, sampling_rate=extractor.sampling_rate, return_tensors="pt",
                                     return_attention_mask=True)
        prepared: dict[str, Any] = {"input_features": features["input_features"].to(self.model.device,
                                                                                    self.model.dtype),
                                    "attention_mask": features["attention_mask"].to(self.model.device),
                                    "long": long, "seconds": len(audio) / extractor.sampling_rate,
                                    "prompt_ids": None}
        if request.prompt and request.prompt.strip():
            with self.client_data(request, "prompt"):
                prompt_ids = self.processor.get_prompt_ids(request.prompt, return_tensors="pt")
            limit = self.model.config.max_target_positions // 2 - 1  # what Whisper was trained with
            if prompt_ids.shape[-1] - 1 > limit:
                raise InvalidInput(f"the prompt takes {prompt_ids.shape[-1] - 1} tokens; '{self.spec.key}' takes "
                                   f"at most {limit}", field="prompt", error="prompt too long")
            prepared["prompt_ids"] = prompt_ids.to(self.model.device)
        return prepared

    def check_context(self, prompt_tokens: int, params: Any, *, counts_new_tokens: bool = True) -> None:
        """The prompt was checked in prepare; the audio is windowed, never too long for the model."""

    def batch_key(self, row: Any) -> tuple:
        p, prepared = row.params, row.prepared
        prompt = tuple(prepared["prompt_ids"].tolist()) if prepared["prompt_ids"] is not None else None
        sampling = (("seeded", row.id) if p.seed is not None else ("sample", p.temperature, p.top_p)) \
            if p.do_sample else ("greedy",)
        # Long audio runs the long-form path, which needs timestamps; short audio with timestamps runs
        # the same path on one window (padded as Whisper was trained), so the two never share a call.
        return ("asr", prepared["long"], p.timestamps or prepared["long"], p.words, p.max_new_tokens, prompt,
                sampling)

    def generate_batch(self, rows: Sequence[Any]) -> None:
        import torch  # deferred: torch

        p, first = rows[0].params, rows[0].prepared
        stopper = RowStopper(rows)
        timestamps = p.timestamps or first["long"]
        # A window's decoder holds the prompt, <|startoftranscript|>, language, task and (maybe)
        # <|notimestamps|> before what it writes, all within max_target_positions.
        prompt = int(first["prompt_ids"].shape[-1]) if first["prompt_ids"] is not None else 0
        budget = max(1, min(p.max_new_tokens, self.model.config.max_target_positions - prompt - 4))
        kwargs: dict[str, Any] = {"input_features": _stack([row.prepared["input_features"] for row in rows], 0.0),
                                  "attention_mask": _stack([row.prepared["attention_mask"] for row in rows], 0),
                                  "max_new_tokens": budget, "return_timestamps": timestamps,
                                  "stopping_criteria": [stopper]}
        if first["prompt_ids"] is not None:
            kwargs["prompt_ids"] = first["prompt_ids"]
        if timestamps:
            kwargs["return_segments"] = True
        if p.words:
            kwargs["return_token_timestamps"] = True
        if p.do_sample:
            kwargs.update(temperature=p.temperature, top_p=p.top_p)
        else:
            kwargs["temperature"] = 0.0
        config = self.model.generation_config
        languages: list[str | None] = [row.params.language for row in rows]
        attention = self.model.config._attn_implementation
        try:
            with torch.inference_mode(), self._rng(p):
                if getattr(config, "is_multilingual", False):
                    languages = self._languages(kwargs["input_features"], languages)
                    kwargs.update(language=list(languages), task="transcribe")
                output = self.model.generate(**kwargs)
        except AllRowsEnded:
            return
        finally:  # word timestamps switch the model to eager attention (cross-attention weights): undo it
            self.model.config._attn_implementation = attention
        for i, row in enumerate(rows):
            if not stopper.ended(row):
                row.finish(self._result(output, i, row, timestamps, languages[i]))

    def _languages(self, features: Any, given: list[str | None]) -> list[str]:
        """Each row's language: the client's, or the one Whisper detects in its first window."""
        missing = [i for i, code in enumerate(given) if code is None]
        if not missing:
            return list(given)
        codes = {token_id: token[2:-2] for token, token_id in self.model.generation_config.lang_to_id.items()}
        detected = self.model.detect_language(input_features=features[missing][..., :3000])
        out = list(given)
        for i, token_id in zip(missing, detected.reshape(-1).tolist()):
            out[i] = codes.get(int(token_id), "en")
        return out

    def _result(self, output: Any, i: int, row: Any, timestamps: bool, language: str | None) -> GenerationResult:
        prompt = row.prepared["prompt_ids"]
        prompt_tokens = int(prompt.shape[-1]) if prompt is not None else 0
        if not timestamps:
            tokens = self._text_tokens(output[i].tolist())
            return GenerationResult(text=self._decode(tokens).strip(), prompt_tokens=prompt_tokens,
                                    completion_tokens=len(tokens), language=language,
                                    duration=row.prepared["seconds"])
        segments = []
        for segment in output["segments"][i]:
            tokens = segment["tokens"].tolist()
            text_tokens = self._text_tokens(tokens)
            # A window the model did not close with a timestamp ends where the window ends (transformers
            # counts a padded window as 30 s): never after the audio itself.
            seconds = row.prepared["seconds"]
            start, end = min(float(segment["start"]), seconds), min(float(segment["end"]), seconds)
            entry = {"start": round(start, 3), "end": round(end, 3), "text": self._decode(text_tokens),
                     "tokens": tokens}
            if row.params.words:
                entry["words"] = self._words(tokens, segment.get("token_timestamps"), start, end)
            segments.append(entry)
        text = "".join(segment["text"] for segment in segments).strip()
        completion = sum(len(segment["tokens"]) for segment in segments)
        return GenerationResult(text=text, prompt_tokens=prompt_tokens, completion_tokens=completion,
                                segments=segments, language=language, duration=row.prepared["seconds"])

    def _first_special(self) -> int:
        """<|endoftext|>: in Whisper's vocabulary every special and timestamp token comes after it."""
        eot = self.model.generation_config.eos_token_id
        return min(eot) if isinstance(eot, (list, tuple)) else int(eot)

    def _text_tokens(self, tokens: list[int]) -> list[int]:
        limit = self._first_special()
        return [t for t in tokens if t < limit]

    def _decode(self, tokens: list[int]) -> str:
        return self._tokenizer().decode(tokens, skip_special_tokens=True)

    def _words(self, tokens: list[int], times: Any, start: float, end: float) -> list[dict]:
        """Tokens grouped into words (a word starts at a token that starts with a space), each from its
        first token's time to the next word's first token's time (the last one to the segment's end)."""
        tokenizer = self._tokenizer()
        stamps = [float(t) for t in times.tolist()] if times is not None else [start] * len(tokens)
        words: list[list[Any]] = []  # [text, first time, token ids]
        limit = self._first_special()
        for token, stamp in zip(tokens, stamps):
            if token >= limit:
                continue
            piece = tokenizer.decode([token])
            if not words or piece.startswith(" "):
                words.append([piece, stamp, [token]])
            else:
                words[-1][2].append(token)
        out = []
        for index, (_, first, ids) in enumerate(words):
            following = words[index + 1][1] if index + 1 < len(words) else end
            begin = min(max(first, start), end)
            out.append({"word": tokenizer.decode(ids).strip(), "start": round(begin, 3),
                        "end": round(min(max(following, begin), end), 3)})
        return [w for w in out if w["word"]]


class _BothLengthsNotice:
    def filter(self, record: Any) -> bool:
        return "will take precedence" not in record.getMessage()


def compression_ratio(text: str) -> float:
    """Whisper's repetition signal: bytes of the text over bytes of its zlib compression."""
    data = text.encode("utf-8")
    return round(len(data) / len(zlib.compress(data)), 3) if data else 0.0


class RowStopper(OpenRows):
    """A stopping criterion of every inner generate call: rows whose client left or whose deadline
    passed end here with what they are (cancelled / timeout); once no row is left the call stops."""

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch  # deferred: torch

        self.check()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _stack(tensors: list[Any], fill: float) -> Any:
    """Rows along the batch, padded at the end of the last (time) axis to the longest."""
    import torch  # deferred: torch

    if len(tensors) == 1:
        return tensors[0]
    width = max(int(t.shape[-1]) for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - int(t.shape[-1])), value=fill) for t in tensors])
