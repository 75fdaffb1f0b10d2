"""Image editing: Qwen-Image-Edit through diffusers' QwenImageEditPipeline (one input image, an
instruction, a new image)."""
from __future__ import annotations

from typing import Any, Sequence

from utils.families.base import GenerationRequest
from utils.families.diffusion import DiffusionFamily, ImageParams, check_one_image, fit_area

# The pipeline conditions on the input image resized to about this many pixels, whatever the output size.
CONDITION_AREA = 1024 * 1024


class ImageEditFamily(DiffusionFamily):
    name = "image_edit"
    accepts = frozenset({"image"})
    pipeline_class = "QwenImageEditPipeline"
    # The pipeline conditions on the input at ~1 MP whatever its shape; past 16:1 one side shrinks to a
    # few latent patches (and to 0 far beyond).
    max_aspect_ratio = 16

    @classmethod
    def default_output_size(cls, request: GenerationRequest, max_pixels: int) -> tuple[int, int]:
        """The input image's aspect ratio at ~1 MP (what the pipeline does unasked), within max_pixels."""
        width, height = request.images[0].size
        return fit_area(width / height, min(CONDITION_AREA, max_pixels), cls.size_multiple)

    def prepare(self, request: GenerationRequest) -> dict:
        check_one_image(self, request)
        prepared = super().prepare(request)
        image = request.images[0]
        # Resized here as the pipeline resizes a single image; it is then passed in a list (so rows
        # batch), which the pipeline takes as it is. The call conditions on `condition_size`.
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions  # deferred: diffusers
        width, height, _ = calculate_dimensions(CONDITION_AREA, image.size[0] / image.size[1])
        image = self.model.image_processor.resize(image, height, width)
        condition_width, condition_height, _ = calculate_dimensions(CONDITION_AREA, width / height)
        prepared.update(image=image, condition_size=(condition_width, condition_height))
        return prepared

    def batch_key(self, row: Any) -> tuple:
        return super().batch_key(row) + (row.prepared["condition_size"],)

    def call_kwargs(self, params: ImageParams, rows: Sequence[Any], owners: list[Any]) -> dict:
        # Qwen-Image-Edit is not guidance-distilled: guidance_scale stays None (true_cfg_scale guides).
        distilled = bool(self.model.transformer.config.guidance_embeds)
        return {"image": [row.prepared["image"] for row in owners],
                "guidance_scale": params.guidance_scale if distilled else None}
