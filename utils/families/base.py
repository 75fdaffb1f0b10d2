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
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Sequence

from jinja2.exceptions import TemplateError, TemplateSyntaxError

from utils.config.settings import ModelSpec
from utils.engine.rows import RowTracker, collate
from utils.engine.sampling import ForcedChoice, is_plain, prompt_logprobs
from utils.engine.types import GenerationParams, GenerationRequest, GenerationResult
from utils.errors import InvalidInput
from utils.families.loading import check_loaded_weights, import_bitsandbytes
from utils.families.moves import park_module, unpark_module
from utils.families.special_tokens import SpecialTokens, special_tokens
from utils.hub.model_folder import media_limits, narrowed_media
from utils.serving.memory import expect_freed, release_device_caches, tensor_placement

if TYPE_CHECKING:
    from utils.serving.quantized_cache import QuantizedCache

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
        import torch  # deferred: torch

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


# What a processor or chat template raises about the client's data (an image of 1x300 pixels, a
# conversation a template refuses). Caught only around those calls (Family.client_data).
CLIENT_DATA_ERRORS = (ValueError, TypeError, IndexError)


class Family:
    """Base adapter. Subclasses set `name`, `accepts` and implement load/prepare/generate."""

    name: ClassVar[str]
    accepts: ClassVar[frozenset[str]] = frozenset()   # media kinds: "image", "video", "audio"
    checkpoint_file: ClassVar[str] = "config.json"    # what a complete checkpoint folder holds at its top
    quant_skip_modules: ClassVar[list[str] | None] = None
    uses_chat_template: ClassVar[bool] = True  # prompts go through the checkpoint's chat template
    answers_prompts: ClassVar[bool] = True     # /generate, chat and jobs (speech_to_text: transcriptions only)
    draws: ClassVar[bool] = False              # makes images on request (generation_mode "image": Janus)
    # Media the family's processor or model cannot take, as class data: checked before any model is
    # leased (InferenceService.decode_media), from headers where they tell.
    max_aspect_ratio: ClassVar[float | None] = None   # images and video frames, longer side / shorter side
    min_audio_seconds: ClassVar[float] = 0.0          # of the 16 kHz waveform
    min_images: ClassVar[int] = 0                     # images a request must hold (BLIP VQA: its one image)
    # Per-item media options (utils/media/options.py) the family honours; others are refused (400).
    media_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, spec: ModelSpec, device: str, model: Any, processor: Any) -> None:
        self.spec, self.device, self.model, self.processor = spec, device, model, processor
        self._special_cache: SpecialTokens | None = None  # see check_text

    # transformers classes (by name, imported on load) and extra from_pretrained kwargs.
    model_class: ClassVar[str] = ""
    processor_class: ClassVar[str] = "AutoProcessor"
    model_kwargs: ClassVar[dict] = {}

    # -- lifecycle
    @classmethod
    def load(cls, spec: ModelSpec, device: str, cache: "QuantizedCache | None" = None) -> "Family":
        """The processor and the model; a quantized model through `cache` when one is given (read back
        already quantized when it holds a valid entry, else quantized here and written to it)."""
        import transformers  # deferred: transformers

        if spec.engine.compile and spec.engine.static_cache and not device.startswith("cuda"):
            raise ValueError(f"engine.compile with static_cache is set for '{spec.key}' but it loads on {device}: "
                             f"transformers compiles a static-cache generate on CUDA only; without static_cache "
                             f"the continuous engine compiles its decode step on any device")

        processor = getattr(transformers, cls.processor_class).from_pretrained(
            spec.path, **({"trust_remote_code": True} if spec.trust_remote_code else {}))
        check_processor(cls, spec, processor)
        model_class, kwargs = cls.weights(spec, device)
        if cache is not None and spec.quantization != "none":
            model = cache.load(spec, device, model_class, kwargs)
        else:
            model = model_class.from_pretrained(spec.path, **kwargs)
        model.eval()
        check_loaded_weights(model)
        return cls(spec, device, model, processor)

    @classmethod
    def weights(cls, spec: ModelSpec, device: str) -> tuple[Any, dict]:
        """The transformers class of this family's model and the kwargs of its from_pretrained."""
        import transformers  # deferred: transformers
        return (getattr(transformers, cls.model_class),
                {**cls.model_kwargs, **from_pretrained_kwargs(spec, device, cls.quant_skip_modules)})

    def release(self) -> None:
        expect_freed(self.model)
        self.model = None
        self.processor = None

    def park(self, *, pin_memory: bool) -> None:
        """Weights to CPU RAM, kept for a fast `unpark` (the RAM tier; only the manager calls this,
        on a model no request holds and whose engine is stopped)."""
        for module in self.weight_modules():
            park_module(module, pin_memory=pin_memory)
        release_device_caches()

    def unpark(self, device: str) -> None:
        """Weights back on `device` from RAM; requests then run there."""
        for module in self.weight_modules():
            unpark_module(module, device)
        self.device = device
        release_device_caches()

    def weight_modules(self) -> list[Any]:
        """The torch modules holding this model's weights (a diffusers pipeline has several)."""
        return [self.model] if self.model is not None else []

    def memory_bytes(self) -> int:
        return int(self.model.get_memory_footprint()) if self.model is not None else 0

    def memory_placement(self) -> dict[str, int]:
        """Bytes on each device (a model split by max_memory has parts on several)."""
        return tensor_placement(self.model) if self.model is not None else {}

    # -- serving
    # Which side prompts are padded on inside a batch: left for decoder-only generation, right for
    # encoders with absolute positions (BLIP), so a row's answer does not depend on its neighbours.
    padding_side: ClassVar[str] = "left"

    def prepare(self, request: GenerationRequest) -> Any:
        raise NotImplementedError

    def prepare_images(self, request: GenerationRequest) -> Any:
        """Inputs of an image request (utils/serving/image_requests.py); families that make no images refuse it."""
        raise InvalidInput(f"'{self.spec.key}' does not make images", field="model", error="unsupported model")

    def generate_batch(self, rows: Sequence[Any]) -> None:
        """One padded `generate` over rows that share their generation parameters (see
        engine.rows.batch_key); each row gets its tokens and result as soon as it finishes.
        Only the model's engine calls this, from its one worker thread."""
        import torch  # deferred: torch

        longest = max(row.params.max_new_tokens for row in rows)
        inputs = collate([row.prepared for row in rows], side=self.padding_side, pad_id=self._pad_id())
        tracker = RowTracker(rows, eos_ids=self._eos_ids(), tokenizer=self._tokenizer(),
                             build_result=self.result_from_tokens)
        # generate runs greedy; a row that samples, penalises or records logprobs chooses its own token
        # (its RowSampler) and ForcedChoice forces it, so rows of any parameters share this call.
        greedy = replace(rows[0].params, do_sample=False, repetition_penalty=None, max_new_tokens=longest)
        kwargs = dict(inputs, **self._generate_kwargs(greedy), streamer=tracker, stopping_criteria=[tracker])
        if not all(is_plain(row.params) for row in rows):
            from transformers import LogitsProcessorList  # deferred: transformers
            kwargs["logits_processor"] = LogitsProcessorList([ForcedChoice(tracker.states)])
        with torch.inference_mode():
            for state in tracker.states:
                if state.row.params.prompt_logprobs is not None:
                    state.prompt_logprobs = self.prompt_logprobs(state.row.prepared, state.row.params.prompt_logprobs)
            self._generator().generate(**kwargs)
        tracker.finish_all()

    def prompt_logprobs(self, prepared: dict, top: int) -> list:
        """Logprobs of a decoder-only prompt's tokens (a completion's echo): one forward over the prompt."""
        logits = self._generator()(input_ids=prepared["input_ids"], attention_mask=prepared.get("attention_mask"),
                                   use_cache=False).logits[0]
        return prompt_logprobs(logits, prepared["input_ids"][0].tolist(), top)

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
        """Refuses a prompt that tokenizes to nothing, or (plus the tokens to generate) one longer than
        the model's context window."""
        if prompt_tokens == 0:
            raise InvalidInput(f"the prompt holds no tokens for '{self.spec.key}' (only whitespace?)", field="prompt",
                               error="empty prompt")
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

    # -- checks of client data
    @classmethod
    def check_media_header(cls, probe: Any) -> None:
        """Refuses an image or video (a utils.media.decode.MediaProbe: its header) the processor cannot take."""
        width, height = probe.width, probe.height
        if not (cls.max_aspect_ratio and width and height):
            return
        ratio = max(width, height) / min(width, height)
        if ratio > cls.max_aspect_ratio:
            raise InvalidInput(f"the {probe.kind} is {width}x{height} pixels, an aspect ratio of {ratio:.0f}:1; "
                               f"this model takes at most {cls.max_aspect_ratio:g}:1", field=probe.field,
                               error="unsupported aspect ratio")

    @classmethod
    def check_audio_length(cls, samples: int, rate: int, field: str) -> None:
        if samples / rate < cls.min_audio_seconds:
            raise InvalidInput(f"the audio is {1000 * samples / rate:.1f} ms long; this model needs at least "
                               f"{1000 * cls.min_audio_seconds:.1f} ms", field=field, error="audio too short")

    def check_request(self, request: GenerationRequest) -> None:
        """What every prepare checks first: media kinds and counts, and the client's text."""
        self.check_media(request)
        self.check_text(request)

    def check_text(self, request: GenerationRequest) -> None:
        """No client text holds one of the model's special tokens (families/special_tokens.py; the
        routes ran the same check from the tokenizer files before the lease)."""
        if self._special_cache is None:
            self._special_cache = special_tokens(self._tokenizer(), self.processor)
        self._special_cache.check(self.spec.key, client_texts(request))

    @classmethod
    def text_tools(cls, spec: ModelSpec) -> tuple[Any, Any]:
        """(tokenizer, processor) from the checkpoint folder alone, no weights: what the routes read the
        model's special tokens from before any lease. The same classes `load` reads them with."""
        import transformers  # deferred: transformers
        processor = getattr(transformers, cls.processor_class).from_pretrained(spec.path, local_files_only=True)
        return getattr(processor, "tokenizer", processor), processor

    @contextmanager
    def client_data(self, request: GenerationRequest, what: str) -> Iterator[None]:
        """Around a chat template or processor call only: what they raise about the client's data
        becomes a 400 naming the field (media for the processor, the text for the template). Our own
        errors elsewhere stay 500s."""
        try:
            yield
        except TemplateSyntaxError:  # a broken template is the checkpoint's fault, not the client's
            raise
        except TemplateError as exc:
            where = text_field(request)
            log.info("%s: the chat template refused the request (%s): %s", self.spec.key, where, exc)
            raise InvalidInput(f"the chat template of '{self.spec.key}' refuses this conversation: {exc}",
                               field=where, error="unsupported conversation") from None
        except CLIENT_DATA_ERRORS as exc:
            where = media_field(request) if what == "processor" else text_field(request)
            log.info("%s: the %s refused the request's data (%s): %r", self.spec.key, what, where, exc)
            raise InvalidInput(f"'{self.spec.key}' cannot take this input: {str(exc)[:300]}", field=where) from None

    # -- shared helpers
    def check_media(self, request: GenerationRequest) -> None:
        given = {"image": len(request.images), "video": len(request.videos), "audio": len(request.audios)}
        accepts = narrowed_media(self.spec.path, self.accepts)
        limits = media_limits(self.spec, accepts)
        for kind, count in given.items():
            if not count:
                continue
            if kind not in accepts:
                raise InvalidInput(f"model '{self.spec.key}' does not take {kind} input "
                                   f"(it takes: {', '.join(sorted(accepts)) or 'text only'})",
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
        with self.client_data(request, "chat template"):
            text = self.processor.apply_chat_template(chat_messages(request, items), tokenize=False,
                                                      add_generation_prompt=True, **tools_kwargs(request))
        with self.client_data(request, "processor"):
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

    def progress(self, step: int, total: int) -> None:
        pass


def check_processor(family: type, spec: ModelSpec, processor: Any) -> None:
    """A checkpoint whose tokenizer files are missing still "loads" a tokenizer with no vocabulary or
    chat template; every request would then fail. That is a failed load, not the client's fault."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if len(tokenizer) < 2:
        raise ValueError(f"{spec.path.name}/ holds no usable tokenizer (tokenizer files missing)")
    if family.uses_chat_template and not (getattr(processor, "chat_template", None)
                                          or getattr(tokenizer, "chat_template", None)):
        raise ValueError(f"{spec.path.name}/ has no chat template (tokenizer_config.json or chat_template.jinja "
                         f"missing)")


def torch_dtype(name: str) -> Any:
    import torch  # deferred: torch
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, "auto")


def from_pretrained_kwargs(spec: ModelSpec, device: str, skip_modules: list[str] | None = None) -> dict:
    """dtype, device placement and bitsandbytes quantization for any family's from_pretrained."""
    kwargs: dict[str, Any] = {"dtype": torch_dtype(spec.dtype), "device_map": {"": device}}
    if spec.max_memory and device == next(iter(spec.max_memory)):  # split as seed 001 did (a CPU fallback
        # is handed "cpu" instead of the split's first device, and loads whole)
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = {(int(d.split(":")[1]) if d.startswith("cuda") else d): n
                                for d, n in spec.max_memory.items()}
    if spec.engine.attn_implementation != "auto":
        kwargs["attn_implementation"] = spec.engine.attn_implementation
    if spec.trust_remote_code:  # settings refused it unless pinned to a revision
        kwargs["trust_remote_code"] = True
    if spec.quantization != "none":
        import torch  # deferred: torch
        from transformers import BitsAndBytesConfig  # deferred: transformers

        try:
            import_bitsandbytes()  # without its eager compile wrappers, if warm_imports has not run
        except ImportError:
            pass  # from_pretrained says what is missing, with the model's name

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


def client_texts(request: GenerationRequest) -> list[tuple[str, str]]:
    """(field, text) of every text the client wrote."""
    if request.texts is not None:
        return list(request.texts)
    if request.messages is not None:
        return [(f"messages[{i}].content", part["text"]) for i, message in enumerate(request.messages)
                for part in message["content"] if part["type"] == "text"]
    return [(name, text) for name, text in (("system", request.system), ("prompt", request.prompt)) if text]


def text_field(request: GenerationRequest) -> str:
    """The field a refusal of the request's text names."""
    if request.messages is not None:
        return "messages"
    return "system" if request.system else "prompt"


def media_field(request: GenerationRequest) -> str:
    """The field a processor's refusal names: the one media item, or all of them; the text if none."""
    fields = [name for names in request.media_fields.values() for name in names]
    if not fields:
        return text_field(request)
    return fields[0] if len(fields) == 1 else ", ".join(fields)


def tools_kwargs(request: GenerationRequest) -> dict:
    """apply_chat_template's `tools` when the request has some (a template without tools never sees the key)."""
    return {"tools": request.tools} if request.tools else {}


def chat_messages(request: GenerationRequest, media_items: list[dict] | None = None) -> list[dict]:
    """Messages for a processor's chat template: media items first, then the prompt text; or the
    request's conversation, each media part replaced by the family's item for it, in order."""
    if request.messages is not None:
        items: dict[str, list[dict]] = {}
        for item in media_items or []:
            items.setdefault(item["type"], []).append(item)
        taken = {kind: iter(found) for kind, found in items.items()}
        return [{**message, "content": [part if part["type"] == "text" else next(taken[part["type"]])
                                        for part in message["content"]]}
                for message in request.messages]
    messages: list[dict] = []
    if request.system:
        messages.append({"role": "system", "content": [{"type": "text", "text": request.system}]})
    content = list(media_items or []) + [{"type": "text", "text": request.prompt}]
    messages.append({"role": "user", "content": content})
    return messages
