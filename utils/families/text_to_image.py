"""Text to image: FLUX.1 (schnell and dev) through diffusers' FluxPipeline."""
from __future__ import annotations

from typing import Any, Sequence

from utils.families.diffusion import DiffusionFamily, ImageParams


class TextToImageFamily(DiffusionFamily):
    name = "text_to_image"
    accepts = frozenset()
    pipeline_class = "FluxPipeline"

    def call_kwargs(self, params: ImageParams, rows: Sequence[Any], owners: list[Any]) -> dict:
        # FLUX.1-dev embeds the guidance scale (guidance-distilled); schnell has no guidance input and
        # was trained with T5 prompts of at most 256 tokens (dev: 512).
        distilled = bool(self.model.transformer.config.guidance_embeds)
        return {"guidance_scale": params.guidance_scale, "max_sequence_length": 512 if distilled else 256}
