"""Family registry: settings' `family` -> adapter class. No if/elif chain of model names."""
from __future__ import annotations

import importlib

from utils.families.base import Family, GenerationParams, GenerationRequest, GenerationResult
from utils.families.loading import WEIGHT_LOADS, check_remote_code
from utils.hub.model_folder import media_limits as capability_limits, narrowed_media, read_capabilities

# family name -> "module:Class"; imported on first use so a missing optional library only
# affects the family that needs it.
_REGISTRY = {
    "text": "utils.families.text:TextFamily",
    "vision_language": "utils.families.vision_language:VisionLanguageFamily",
    "vqa": "utils.families.vqa:VqaFamily",
    "audio": "utils.families.audio:AudioFamily",
    "omni": "utils.families.omni:OmniFamily",
    "text_to_image": "utils.families.text_to_image:TextToImageFamily",
    "image_edit": "utils.families.image_edit:ImageEditFamily",
    "janus": "utils.families.janus:JanusFamily",
    "speech_to_text": "utils.families.speech_to_text:SpeechToTextFamily",
}


def family_class(name: str) -> type[Family]:
    module_name, class_name = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def load_family(spec, device: str, *, cache=None) -> Family:
    """The model manager's loader. Weights load one model at a time (see families/loading.py).
    `cache`: a utils.serving.quantized_cache.QuantizedCache for 4-bit / 8-bit models (None: quantize every load)."""
    if not (spec.path / family_class(spec.family).checkpoint_file).is_file():
        how = (f"download it: python main.py --download-only --model {spec.key}" if spec.repo_id
               else "a local folder with no repo_id: put the checkpoint there")
        raise FileNotFoundError(f"no checkpoint in {spec.path.name}/ ({how})")
    check_remote_code(spec)
    from transformers.utils import logging as hf_logging  # deferred: transformers
    hf_logging.disable_progress_bar()  # a per-load progress bar is noise in a server log
    with WEIGHT_LOADS.turn(spec.key):
        family = family_class(spec.family)
        if cache is not None and spec.quantization != "none":
            return family.load(spec, device, cache)
        return family.load(spec, device)


def accepted_media(model) -> frozenset[str]:
    """Media a model takes (`model`: a ModelSpec): what its family runs, narrowed to what its checkpoint
    takes (utils/hub/model_folder.py: a LLaVA folder has no video processor). A family name alone:
    the family's."""
    if isinstance(model, str):
        return family_class(model).accepts
    return narrowed_media(model.path, family_class(model.family).accepts)


def media_limits(spec) -> dict[str, int]:
    """Items of each kind one request to `spec` may hold (0: a kind it does not take)."""
    return capability_limits(spec, accepted_media(spec))


def capability_fields(spec) -> dict:
    """`architecture` and `capabilities` of a model as /v1/models and /admin/model_status show them: read
    from its checkpoint folder, media narrowed to what its family runs; nulls while the folder is not there."""
    found = read_capabilities(spec.path)
    if found is None:
        return {"architecture": None, "capabilities": None}
    accepted, limits = accepted_media(spec), media_limits(spec)
    shown = found.public()
    shown.update(images="image" in accepted, video="video" in accepted, audio="audio" in accepted,
                 max_images=limits["image"] or None, max_videos=limits["video"] or None,
                 max_audios=limits["audio"] or None)
    return {"architecture": found.architecture, "capabilities": shown}


__all__ = ["WEIGHT_LOADS", "Family", "GenerationParams", "GenerationRequest", "GenerationResult", "family_class", "load_family",
           "accepted_media", "capability_fields", "media_limits"]
