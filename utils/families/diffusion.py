"""What the image families share: a diffusers pipeline behind the Family interface.

One loaded pipeline serves many requests through its model's engine like any other family: the
engine hands `generate_batch` the rows that may share one pipeline call (same size, steps and
guidance; see `batch_key`), their prompts go in as one list, and each image gets its own
torch.Generator, so a row's images depend on its seed only, never on its neighbours. Between
denoising steps the pipeline's `callback_on_step_end` reports progress to each row, ends rows whose
client left or whose deadline passed, and interrupts the call once no row is left.

Request parameters arrive as ImageParams (utils/serving/image_requests.py parses and bounds them before any load).
"""
from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Sequence

from utils.config.settings import IMAGE_SIZE_MULTIPLE, ModelSpec
from utils.errors import InvalidInput
from utils.engine.rows import AllRowsEnded, OpenRows
from utils.families.base import Family, GenerationRequest, GenerationResult, SoloRow
from utils.families.loading import check_loaded_weights
from utils.serving.memory import tensor_placement

log = logging.getLogger("model_server.families")

SEED_SPACE = 2**64  # torch.Generator.manual_seed takes any 64-bit value; image i of a request uses seed + i


@dataclass(frozen=True)
class ImageParams:
    """One request's generation parameters, bounded by the model's limits (utils/serving/image_requests.py)."""
    num_inference_steps: int
    guidance_scale: float
    true_cfg_scale: float
    width: int | None     # None until resolved: an edit's default follows its input image
    height: int | None
    num_images: int
    seed: int
    cfg: bool = False     # true classifier-free guidance runs (true_cfg_scale > 1 and a negative prompt)

    @property
    def work(self) -> int:
        """steps x pixels x images: what the synchronous limit (limits.max_sync_step_pixels) bounds."""
        return self.num_inference_steps * (self.width or 0) * (self.height or 0) * self.num_images


class DiffusionFamily(Family):
    """Base of the diffusers families; subclasses name their pipeline and what differs in the call."""

    checkpoint_file: ClassVar[str] = "model_index.json"
    pipeline_class: ClassVar[str] = ""
    size_multiple: ClassVar[int] = IMAGE_SIZE_MULTIPLE
    default_size: ClassVar[tuple[int, int]] = (1024, 1024)

    def __init__(self, spec: ModelSpec, device: str, pipe: Any) -> None:
        processor = getattr(pipe, "processor", None) or getattr(pipe, "tokenizer", None)
        super().__init__(spec, device, pipe, processor)

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def load(cls, spec: ModelSpec, device: str, cache: Any = None) -> "DiffusionFamily":
        """`cache` (the quantized cache) is never used: image models load in their dtype only."""
        import diffusers  # deferred: diffusers
        import torch  # deferred: torch
        from diffusers.utils import logging as diffusers_logging  # deferred: diffusers

        if spec.offload != "none" and not device.startswith("cuda"):
            raise ValueError(f"offload: {spec.offload} is set for '{spec.key}' but it loads on {device}: CPU offload "
                             f"moves the pipeline between the CPU and a CUDA GPU; set offload: none to run it on "
                             f"{device}")
        diffusers_logging.disable_progress_bar()
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(spec.dtype)
        if dtype is None:  # auto: what the checkpoints ship in on a GPU; CPUs run bf16 slowly
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        pipe = getattr(diffusers, cls.pipeline_class).from_pretrained(spec.path, dtype=dtype)
        for name, module in _modules(pipe):  # before offload: sequential offload parks weights on meta itself
            try:
                check_loaded_weights(module)
            except Exception as exc:
                raise type(exc)(f"{name}: {exc}") from None
        if spec.offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        elif spec.offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=device)
        else:
            pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return cls(spec, device, pipe)

    def release(self) -> None:
        if self.model is not None and self.spec.offload != "none":
            self.model.remove_all_hooks()  # accelerate's hooks hold the offloaded weights
        super().release()

    def weight_modules(self) -> list[Any]:
        return [module for _, module in _modules(self.model)] if self.model is not None else []

    def memory_bytes(self) -> int:
        return sum(_module_bytes(module) for _, module in _modules(self.model)) if self.model is not None else 0

    def memory_placement(self) -> dict[str, int]:
        """Bytes per device. Offloaded: at most the largest component (model) or layer (sequential) is
        on the GPU at a time, the rest in RAM; the manager counts both."""
        if self.model is None:
            return {}
        if self.spec.offload == "none":
            placement: dict[str, int] = {}
            for _, module in _modules(self.model):
                for device, size in tensor_placement(module).items():
                    placement[device] = placement.get(device, 0) + size
            return placement
        total = self.memory_bytes()
        sizes = [_module_bytes(m) for _, m in _modules(self.model)] if self.spec.offload == "model" else \
            [_module_bytes(leaf) for _, m in _modules(self.model) for leaf in m.modules() if not list(leaf.children())]
        on_gpu = min(total, max(sizes, default=0))
        return {self.device: on_gpu, "cpu": total - on_gpu}

    # ------------------------------------------------------------------ requests

    @classmethod
    def resolve_size(cls, params: ImageParams, request: GenerationRequest, max_pixels: int) -> ImageParams:
        """Width and height for the call; the family's default where the request named none."""
        if params.width is not None and params.height is not None:
            return params
        width, height = cls.default_output_size(request, max_pixels)
        return replace(params, width=params.width or width, height=params.height or height)

    @classmethod
    def default_output_size(cls, request: GenerationRequest, max_pixels: int) -> tuple[int, int]:
        width, height = cls.default_size
        if width * height > max_pixels:
            return fit_area(width / height, max_pixels, cls.size_multiple)
        return width, height

    def prepare(self, request: GenerationRequest) -> dict:
        self.check_request(request)
        return {"prompt": request.prompt, "negative_prompt": request.negative_prompt}

    def prepare_images(self, request: GenerationRequest) -> dict:
        return self.prepare(request)

    def check_context(self, prompt_tokens: int, params: Any, *, counts_new_tokens: bool = True) -> None:
        """Prompts longer than the text encoders take are cut by the pipeline (as diffusers does)."""

    def batch_key(self, row: Any) -> tuple:
        """Rows that can share one pipeline call: same size, steps and guidance (seeds and prompts
        are per image)."""
        p = row.params
        return (p.width, p.height, p.num_inference_steps, p.guidance_scale, p.true_cfg_scale if p.cfg else None,
                p.cfg)

    def generate_batch(self, rows: Sequence[Any]) -> None:
        """One pipeline call over the rows' images; each row gets its PNGs when the call returns."""
        import torch  # deferred: torch

        params = rows[0].params
        owners: list[Any] = []
        generators: list[Any] = []
        for row in rows:
            for i in range(row.params.num_images):
                owners.append(row)
                generators.append(torch.Generator(device="cpu").manual_seed((row.params.seed + i) % SEED_SPACE))
        tracker = StepTracker(rows, params.num_inference_steps)
        kwargs = dict(prompt=[row.prepared["prompt"] for row in owners], width=params.width, height=params.height,
                      num_inference_steps=params.num_inference_steps, generator=generators, output_type="pil",
                      callback_on_step_end=tracker, **self.call_kwargs(params, rows, owners))
        kwargs["true_cfg_scale"] = params.true_cfg_scale if params.cfg else 1.0  # 1: off, and no warning
        if params.cfg:
            kwargs["negative_prompt"] = [row.prepared["negative_prompt"] for row in owners]
        try:
            with torch.inference_mode():
                images = self.model(**kwargs).images
        except AllRowsEnded:  # no image to decode: the VAE would take as long as a few steps
            self.model.maybe_free_model_hooks()  # what the pipeline does at its end (offload)
            return
        for row in rows:
            if not tracker.ended(row):
                pngs = [png_bytes(image) for image, owner in zip(images, owners) if owner is row]
                row.finish(GenerationResult(text="", prompt_tokens=0, completion_tokens=0, images=pngs))

    def generate(self, prepared: Any, params: ImageParams) -> GenerationResult:
        row = SoloRow(prepared, params)
        self.generate_batch([row])
        return row.result

    def call_kwargs(self, params: ImageParams, rows: Sequence[Any], owners: list[Any]) -> dict:
        """What the family's pipeline takes beyond prompts, size, steps and generators."""
        return {}

    def _tokenizer(self) -> Any:
        return self.model.tokenizer

    @classmethod
    def text_tools(cls, spec: ModelSpec) -> tuple[Any, Any]:
        """The pipeline's `tokenizer` and `processor` (or the tokenizer again), as its model_index.json
        names their transformers classes: what `_tokenizer` and `processor` are once loaded."""
        import transformers  # deferred: transformers
        index = json.loads((spec.path / cls.checkpoint_file).read_text())

        def component(name: str) -> Any:
            library, class_name = (index.get(name) or [None, None])[:2]
            if library != "transformers":
                return None
            return getattr(transformers, class_name).from_pretrained(spec.path / name, local_files_only=True)
        tokenizer = component("tokenizer")
        return tokenizer, component("processor") or tokenizer


class StepTracker(OpenRows):
    """The pipeline's callback_on_step_end: progress per row, rows whose client left (or whose deadline
    passed) end at once (every image of the row with it), and the call stops when none is left,
    skipping the remaining steps and the VAE decode of latents nobody waits for (diffusers' own
    interrupt skips the steps but still decodes every image)."""

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        self.check(step + 1)
        return {}


def fit_area(ratio: float, area: int, multiple: int) -> tuple[int, int]:
    """The largest (width, height) with width / height ~ ratio, both multiples of `multiple`, within `area`."""
    width = max(multiple, int(math.sqrt(area * ratio)) // multiple * multiple)
    height = max(multiple, int(width / ratio) // multiple * multiple)
    while width * height > area and (width > multiple or height > multiple):
        if width >= height and width > multiple:
            width -= multiple
        else:
            height -= multiple
    return width, height


def png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def check_one_image(family: Family, request: GenerationRequest) -> None:
    if len(request.images) != 1:
        raise InvalidInput(f"'{family.spec.key}' edits exactly one image; got {len(request.images)}", field="image",
                           error="missing image" if not request.images else "too many media items")


def _modules(pipe: Any) -> list[tuple[str, Any]]:
    import torch  # deferred: torch
    return [(name, c) for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)]


def _module_bytes(module: Any) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total
