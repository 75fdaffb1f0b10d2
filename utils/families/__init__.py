"""Family registry: settings' `family` -> adapter class. No if/elif chain of model names."""
from __future__ import annotations

import importlib

from utils.families.base import Family, GenerationParams, GenerationRequest, GenerationResult
from utils.families.loading import WEIGHT_LOADS

# family name -> "module:Class"; imported on first use so a missing optional library only
# affects the family that needs it.
_REGISTRY = {
    "text": "utils.families.text:TextFamily",
    "vision_language": "utils.families.vision_language:VisionLanguageFamily",
    "vqa": "utils.families.vqa:VqaFamily",
    "audio": "utils.families.audio:AudioFamily",
    "omni": "utils.families.omni:OmniFamily",
}


def family_class(name: str) -> type[Family]:
    module_name, class_name = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def load_family(spec, device: str) -> Family:
    """The model manager's loader. Weights load one model at a time (see families/loading.py)."""
    if not (spec.path / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint in {spec.path.name}/ (download it: python main.py --download-only "
                                f"--model {spec.key})")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # a per-load progress bar is noise in a server log
    with WEIGHT_LOADS.turn(spec.key):
        return family_class(spec.family).load(spec, device)


def accepted_media(name: str) -> frozenset[str]:
    return family_class(name).accepts


__all__ = ["WEIGHT_LOADS", "Family", "GenerationParams", "GenerationRequest", "GenerationResult", "family_class", "load_family",
           "accepted_media"]
