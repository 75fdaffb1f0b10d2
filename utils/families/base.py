"""The one interface every model family implements, and what they share.

A family adapter holds one loaded model and its processor. The model manager creates it through
`load(spec, device)` and drops it through `release()`; request handling calls `prepare` then
`generate`. Adapters take plain Python values (PIL images, numpy waveforms, VideoClips) and return
plain results, so they run the same under Flask, gunicorn or a Ray Serve replica.
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Iterator, Sequence

from utils.errors import InvalidInput
from utils.families.loading import check_loaded_weights
from utils.settings import ModelSpec

log = logging.getLogger("model_server.families")

class _SamplingRng:
    """Sampling draws from torch's global RNG. A seeded request must have it alone (exclusive);
    unseeded samplers may share it with each other (shared); greedy decoding never touches it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._sharers = 0
        self._exclusive = False

    @contextmanager
    def hold(self, seed: int | None) -> Iterator[None]:
        import torch

        with self._cond:
            if seed is None:
                self._cond.wait_for(lambda: not self._exclusive)
                self._sharers += 1
            else:
                self._cond.wait_for(lambda: not self._exclusive and self._sharers == 0)
                self._exclusive = True
                torch.manual_seed(seed)
        try:
            yield
        finally:
            with self._cond:
                if seed is None:
                    self._sharers -= 1
                else:
                    self._exclusive = False
                self._cond.notify_all()


SAMPLING_RNG = _SamplingRng()


@dataclass
class GenerationRequest:
    prompt: str
    system: str | None = None
    images: list[Any] = field(default_factory=list)   # PIL.Image.Image, RGB
    videos: list[Any] = field(default_factory=list)   # utils.media.VideoClip
    audios: list[Any] = field(default_factory=list)   # float32 mono numpy arrays at the model's rate
    # A whole conversation instead of system + prompt: [{"role": system|user|assistant, "content":
    # [{"type": "text", "text": ...} | {"type": "image"|"video"|"audio"}]}]; media parts stand, in
    # order, for the items of `images`, `videos` and `audios`.
    messages: list[dict] | None = None
    raw: bool = False  # the prompt is plain text to continue, without the chat template (text models)


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float
    top_p: float
    do_sample: bool
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()   # generation ends where one of these appears; it is not returned


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    reasoning: str | None = None
    finish_reason: str = "stop"   # "stop" | "length" | "cancelled" | "timeout"


class Family:
    """Base adapter. Subclasses set `name`, `accepts` and implement load/prepare/generate."""

    name: ClassVar[str]
    accepts: ClassVar[frozenset[str]] = frozenset()   # media kinds: "image", "video", "audio"
    quant_skip_modules: ClassVar[list[str] | None] = None

    def __init__(self, spec: ModelSpec, device: str, model: Any, processor: Any) -> None:
        self.spec, self.device, self.model, self.processor = spec, device, model, processor

    # transformers classes (by name, imported on load) and extra from_pretrained kwargs.
    model_class: ClassVar[str] = ""
    processor_class: ClassVar[str] = "AutoProcessor"
    model_kwargs: ClassVar[dict] = {}

    # -- lifecycle
    @classmethod
    def load(cls, spec: ModelSpec, device: str) -> "Family":
        import transformers

        if spec.engine.compile and not device.startswith("cuda"):
            raise ValueError(f"engine.compile is set for '{spec.key}' but it loads on {device}: transformers "
                             f"compiles generation on CUDA only; turn compile off for this model")

        processor = getattr(transformers, cls.processor_class).from_pretrained(spec.path)
        model = getattr(transformers, cls.model_class).from_pretrained(
            spec.path, **cls.model_kwargs, **from_pretrained_kwargs(spec, device, cls.quant_skip_modules))
        model.eval()
        check_loaded_weights(model)
        return cls(spec, device, model, processor)

    def release(self) -> None:
        self.model = None
        self.processor = None

    def memory_bytes(self) -> int:
        return int(self.model.get_memory_footprint()) if self.model is not None else 0

    # -- serving
    # Which side prompts are padded on inside a batch: left for decoder-only generation, right for
    # encoders with absolute positions (BLIP), so a row's answer does not depend on its neighbours.
    padding_side: ClassVar[str] = "left"

    def prepare(self, request: GenerationRequest) -> Any:
        raise NotImplementedError

    def generate_batch(self, rows: Sequence[Any]) -> None:
        """One padded `generate` over rows that share their generation parameters (see
        engine.rows.batch_key); each row gets its tokens and result as soon as it finishes.
        Only the model's engine calls this, from its one worker thread."""
        import torch
        from utils.engine.rows import RowTracker, collate

        params = rows[0].params
        longest = max(row.params.max_new_tokens for row in rows)
        inputs = collate([row.prepared for row in rows], side=self.padding_side, pad_id=self._pad_id())
        tracker = RowTracker(rows, eos_ids=self._eos_ids(), tokenizer=self._tokenizer(),
                             build_result=self.result_from_tokens)
        kwargs = dict(inputs, **self._generate_kwargs(replace(params, max_new_tokens=longest)),
                      streamer=tracker, stopping_criteria=[tracker])
        with torch.inference_mode(), self._rng(params):
            self._generator().generate(**kwargs)
        tracker.finish_all()

    def generate(self, prepared: Any, params: GenerationParams) -> GenerationResult:
        """One request alone, on the calling thread (tools and benches; the server uses the engine)."""
        row = SoloRow(prepared, params)
        self.generate_batch([row])
        return row.result

    def result_from_tokens(self, tokens: list[int], prompt_tokens: int, finish_reason: str) -> GenerationResult:
        """The generated tokens (eos included) -> the answer; the prompt is never echoed."""
        text = self._tokenizer().decode(tokens, skip_special_tokens=True).strip()
        return GenerationResult(text=text, prompt_tokens=prompt_tokens, completion_tokens=len(tokens),
                                finish_reason=finish_reason)

    def check_context(self, prompt_tokens: int, params: GenerationParams, *, counts_new_tokens: bool = True) -> None:
        """Refuses a prompt (plus the tokens to generate) longer than the model's context window."""
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        context = getattr(text_config, "max_position_embeddings", None)
        if not context:
            return
        total = prompt_tokens + (params.max_new_tokens if counts_new_tokens else 0)
        if total > context:
            raise InvalidInput(f"the prompt takes {prompt_tokens} tokens"
                               + (f" + max_new_tokens {params.max_new_tokens}" if counts_new_tokens else "")
                               + f"; '{self.spec.key}' has a context of {context} tokens", field="prompt",
                               error="prompt too long")

    # -- shared helpers
    def check_media(self, request: GenerationRequest) -> None:
        given = {"image": len(request.images), "video": len(request.videos), "audio": len(request.audios)}
        limits = {"image": self.spec.limits.max_images, "video": self.spec.limits.max_videos,
                  "audio": self.spec.limits.max_audios}
        for kind, count in given.items():
            if not count:
                continue
            if kind not in self.accepts:
                raise InvalidInput(f"model '{self.spec.key}' does not take {kind} input "
                                   f"(it takes: {', '.join(sorted(self.accepts)) or 'text only'})",
                                   field=kind, error="unsupported input")
            if count > limits[kind]:
                raise InvalidInput(f"model '{self.spec.key}' takes at most {limits[kind]} {kind}(s) per request; "
                                   f"got {count}", field=kind, error="too many media items")

    def media_kwargs(self, request: GenerationRequest) -> dict:
        """Processor keyword arguments for the request's images, videos and audio clips."""
        kwargs: dict[str, Any] = {}
        if request.images:
            kwargs["images"] = list(request.images)
        if request.videos:
            kwargs["videos"] = [clip.frames for clip in request.videos]
            kwargs["video_metadata"] = [clip.metadata() for clip in request.videos]
            kwargs["do_sample_frames"] = False  # media.py already sampled them evenly
        if request.audios:
            kwargs["audio"] = list(request.audios)
            kwargs["sampling_rate"] = int(self.processor.feature_extractor.sampling_rate)
        return kwargs

    def chat_inputs(self, request: GenerationRequest, items: list[dict]) -> dict:
        """Chat template over media items + prompt, then the processor: tensors on the model's device."""
        text = self.processor.apply_chat_template(chat_messages(request, items), tokenize=False,
                                                  add_generation_prompt=True)
        inputs = self.processor(text=[text], return_tensors="pt", padding=True, **self.media_kwargs(request))
        return {k: (v.to(self.model.device) if hasattr(v, "to") else v) for k, v in inputs.items()}

    def _tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def _generator(self) -> Any:
        """The module whose .generate produces text (Omni overrides: its thinker)."""
        return self.model

    def _generate_kwargs(self, params: GenerationParams) -> dict:
        tokenizer = self._tokenizer()
        kwargs: dict[str, Any] = {"max_new_tokens": params.max_new_tokens, "do_sample": params.do_sample}
        if params.do_sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p)
            if params.top_k is not None:
                kwargs["top_k"] = params.top_k
        else:  # greedy: make sure checkpoint sampling defaults do not leak in with warnings
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if params.repetition_penalty is not None:
            kwargs["repetition_penalty"] = params.repetition_penalty
        if self.spec.engine.static_cache:  # transformers compiles the forward itself with a static cache
            kwargs.update(cache_implementation="static", disable_compile=not self.spec.engine.compile)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        if pad is not None:
            kwargs["pad_token_id"] = pad
        return kwargs

    @staticmethod
    def _rng(params: GenerationParams):
        return SAMPLING_RNG.hold(params.seed) if params.do_sample else nullcontext()

    def _eos_ids(self) -> set[int]:
        eos = self._generator().generation_config.eos_token_id
        if eos is None:
            eos = getattr(self._tokenizer(), "eos_token_id", None)
        return set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())

    def _pad_id(self) -> int:
        tokenizer = self._tokenizer()
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        return int(pad or 0)


class SoloRow:
    """A batch row for a caller that runs one request itself and reads `result` afterwards."""

    cancelled = False
    streaming = False

    def __init__(self, prepared: Any, params: GenerationParams) -> None:
        self.prepared, self.params, self.result = prepared, params, None

    def emit(self, piece: str) -> None:
        pass

    def finish(self, result: GenerationResult) -> None:
        self.result = result


def torch_dtype(name: str) -> Any:
    import torch
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, "auto")


def from_pretrained_kwargs(spec: ModelSpec, device: str, skip_modules: list[str] | None = None) -> dict:
    """dtype, device placement and bitsandbytes quantization for any family's from_pretrained."""
    kwargs: dict[str, Any] = {"dtype": torch_dtype(spec.dtype), "device_map": {"": device}}
    if spec.engine.attn_implementation != "auto":
        kwargs["attn_implementation"] = spec.engine.attn_implementation
    if spec.quantization != "none":
        import torch
        from transformers import BitsAndBytesConfig

        compute = kwargs["dtype"] if kwargs["dtype"] != "auto" else torch.bfloat16
        if spec.quantization == "4bit":
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_compute_dtype=compute, bnb_4bit_use_double_quant=True,
                                        llm_int8_skip_modules=skip_modules)
        else:
            config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
        kwargs["quantization_config"] = config
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # one notice per matmul otherwise
    return kwargs


def chat_messages(request: GenerationRequest, media_items: list[dict] | None = None) -> list[dict]:
    """Messages for a processor's chat template: media items first, then the prompt text; or the
    request's conversation, each media part replaced by the family's item for it, in order."""
    if request.messages is not None:
        items: dict[str, list[dict]] = {}
        for item in media_items or []:
            items.setdefault(item["type"], []).append(item)
        taken = {kind: iter(found) for kind, found in items.items()}
        return [{"role": message["role"],
                 "content": [part if part["type"] == "text" else next(taken[part["type"]])
                             for part in message["content"]]}
                for message in request.messages]
    messages: list[dict] = []
    if request.system:
        messages.append({"role": "system", "content": [{"type": "text", "text": request.system}]})
    content = list(media_items or []) + [{"type": "text", "text": request.prompt}]
    messages.append({"role": "user", "content": content})
    return messages
