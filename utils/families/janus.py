"""Janus-Pro (transformers' native `janus`): one model that understands images and draws them.

Understanding is a vision-language chat like the others: the chat template, the processor, the
base class's batched `generate`. Drawing (generation_mode "image", parsed in utils/serving/image_requests.py) runs
transformers' own image generation: the prompt through the chat template plus <begin_of_image>,
then one step of the generation head per image token, each with a conditional and an
unconditional row (classifier-free guidance), and the VQ-VAE decodes the codes into pixels.

Rows of several requests share one call when their CFG weight is equal. The codes are chosen in
a logits processor that runs last (`CodeSampler`): it applies the guidance, draws each image's
code from that image's own torch.Generator (seed + i), and leaves that code the only finite
logit, so the library's greedy pick takes it. An image depends on its prompt and seed only,
never on its neighbours, and torch's global RNG is never touched. The same processor reports
progress, ends rows whose client left or whose deadline passed, and stops the call once no row
is left: cancellation between steps, as for the diffusion families.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from utils.engine.rows import AllRowsEnded, OpenRows, batch_key, collate
from utils.errors import InvalidInput, ModelUnavailable
from utils.families.base import Family, GenerationRequest, GenerationResult
from utils.families.diffusion import SEED_SPACE, ImageParams, png_bytes

# The codes of an image are drawn at this temperature (Janus-Pro's own generation uses 1).
CODE_TEMPERATURE = 1.0
# Where config.json leaves them out, the values of transformers' Janus configs (Janus-Pro's own).
_DEFAULTS = {"image_size": 384, "patch_size": 16, "num_image_tokens": 576, "channel_multiplier": [1, 1, 2, 2, 4]}


@dataclass(frozen=True)
class Drawing:
    """What the checkpoint draws, read from its config.json before any load."""
    width: int
    height: int
    tokens: int   # image tokens, one generation step each


class JanusFamily(Family):
    name = "janus"
    accepts = frozenset({"image"})
    draws = True
    model_class = "JanusForConditionalGeneration"
    quant_skip_modules = ["model.vision_model", "model.aligner", "model.vqmodel", "model.generation_embeddings",
                          "model.generation_aligner", "model.generation_head", "lm_head"]

    @classmethod
    def drawing(cls, spec: Any) -> Drawing:
        """The output size and steps, from the checkpoint's config.json (no weights, no torch)."""
        path = Path(spec.path) / "config.json"
        try:
            return _drawing(str(path), path.stat().st_mtime_ns)
        except (OSError, ValueError, KeyError, TypeError):
            raise ModelUnavailable(f"'{spec.key}' has no readable checkpoint config in {Path(spec.path).name}/ "
                                   f"(download it: python main.py --download-only --model {spec.key})") from None

    @classmethod
    def resolve_size(cls, params: ImageParams, request: GenerationRequest, max_pixels: int) -> ImageParams:
        return params  # the checkpoint's own size, set when the request was parsed

    # -- understanding: images and text in, text out
    def prepare(self, request: GenerationRequest) -> dict:
        self.check_request(request)
        return self.chat_inputs(request, [{"type": "image"} for _ in request.images])

    # -- drawing
    def prepare_images(self, request: GenerationRequest) -> dict:
        self.check_request(request)
        messages = [{"role": "user", "content": [{"type": "text", "text": request.prompt}]}]
        with self.client_data(request, "chat template"):
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        with self.client_data(request, "processor"):
            inputs = self.processor(text=[text], generation_mode="image", return_tensors="pt")
        context = self.model.config.text_config.max_position_embeddings
        prompt, codes = int(inputs["input_ids"].shape[1]), self._image_tokens()
        if prompt + codes > context:
            raise InvalidInput(f"the prompt takes {prompt} tokens + {codes} image tokens; '{self.spec.key}' has a "
                               f"context of {context} tokens", field="prompt", error="prompt too long")
        return {k: inputs[k].to(self.model.device) for k in ("input_ids", "attention_mask")}

    def batch_key(self, row: Any) -> tuple:
        if isinstance(row.params, ImageParams):  # images of one CFG weight share a call; seeds are per image
            return ("draw", row.params.guidance_scale)
        return batch_key(row.params, row.id)

    def generate_batch(self, rows: Sequence[Any]) -> None:
        if isinstance(rows[0].params, ImageParams):
            self._draw(rows)
        else:
            super().generate_batch(rows)

    def _image_tokens(self) -> int:
        return int(self.model.config.vision_config.num_image_tokens)

    def _draw(self, rows: Sequence[Any]) -> None:
        import torch  # deferred: torch
        from transformers import GenerationConfig, LogitsProcessorList  # deferred: transformers

        owners = [row for row in rows for _ in range(row.params.num_images)]
        generators = [torch.Generator(device=self.model.device).manual_seed((row.params.seed + i) % SEED_SPACE)
                      for row in rows for i in range(row.params.num_images)]
        inputs = collate([row.prepared for row in owners], side="left", pad_id=self._pad_id())
        tokenizer = self._tokenizer()
        own = self.model.generation_config
        # guidance_scale 1: transformers adds no guidance processor of its own (CodeSampler guides, for any
        # weight); the <begin_of_image> id comes from the tokenizer (GenerationConfig drops generation_kwargs
        # when it reads generation_config.json).
        config = GenerationConfig(bos_token_id=own.bos_token_id, eos_token_id=own.eos_token_id,
                                  pad_token_id=self._pad_id(), do_sample=False, guidance_scale=1.0)
        config.generation_kwargs = {"boi_token_id": tokenizer.convert_tokens_to_ids(tokenizer.boi_token)}
        sampler = CodeSampler(rows, generators, rows[0].params.guidance_scale, self._image_tokens())
        try:
            with torch.inference_mode():
                codes = self.model.generate(**inputs, generation_config=config, generation_mode="image",
                                            logits_processor=LogitsProcessorList([sampler]))
                # One image at a time: batched convolutions differ in the last bits, which can move a pixel
                # across a rounding step; alone, an image is the same whoever shared its call.
                pixels = [self.model.decode_image_tokens(code.unsqueeze(0))[0] for code in codes]
        except AllRowsEnded:
            return
        images = self.processor.postprocess([image.float() for image in pixels], return_tensors="pt")["pixel_values"]
        pngs = [png_bytes(Image.fromarray(image.permute(1, 2, 0).cpu().numpy())) for image in images]
        for row in rows:
            if not sampler.ended(row):
                row.finish(GenerationResult(text="", prompt_tokens=int(row.prepared["input_ids"].shape[1]),
                                            completion_tokens=0,
                                            images=[png for png, owner in zip(pngs, owners) if owner is row]))


class CodeSampler(OpenRows):
    """The last logits processor of a drawing: guidance, each image's draw from its own generator,
    progress, and the rows that end between steps. Scores arrive as [conditional rows;
    unconditional rows], one of each per image."""

    def __init__(self, rows: Sequence[Any], generators: list[Any], weight: float, steps: int) -> None:
        super().__init__(rows, steps)
        self.generators, self.weight = generators, weight
        self.step = 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch  # deferred: torch

        self.step += 1
        self.check(self.step)
        count = len(self.generators)
        conditional, unconditional = scores[:count].float(), scores[count:].float()
        guided = unconditional + self.weight * (conditional - unconditional)
        probs = torch.softmax(guided / CODE_TEMPERATURE, dim=-1)
        codes = torch.cat([torch.multinomial(probs[i], 1, generator=generator)
                           for i, generator in enumerate(self.generators)])
        chosen = torch.full_like(scores[:count], float("-inf"))
        chosen.scatter_(1, codes.unsqueeze(1), 0.0)
        return chosen


@lru_cache(maxsize=64)
def _drawing(path: str, mtime_ns: int) -> Drawing:
    config = json.loads(Path(path).read_text())
    vision, vq = config.get("vision_config") or {}, config.get("vq_config") or {}
    grid = int(vision.get("image_size", _DEFAULTS["image_size"])) // int(vision.get("patch_size",
                                                                                   _DEFAULTS["patch_size"]))
    side = grid * 2 ** (len(vq.get("channel_multiplier", _DEFAULTS["channel_multiplier"])) - 1)
    return Drawing(width=side, height=side, tokens=int(vision.get("num_image_tokens", _DEFAULTS["num_image_tokens"])))
