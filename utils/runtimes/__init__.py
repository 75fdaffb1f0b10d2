"""Runtimes: how a model's weights are loaded and stepped. pytorch (transformers, the families in
utils/families/) or openvino (an exported IR run by openvino-genai, utils/runtimes/openvino.py); the
model's `runtime` setting chooses. The manager, engines' queues and the APIs are the same for both.
"""
from __future__ import annotations

from typing import Any

from utils.config.settings import ModelSpec
from utils.engine.prefix_cache import prefix_cache_cap
from utils.families import load_family
from utils.serving.memory import estimate_model_bytes


def load_adapter(spec: ModelSpec, device: str, *, quant_cache: Any = None, openvino_cache: Any = None) -> Any:
    """The manager's loader: a family adapter holding the loaded model, whichever runtime runs it."""
    if spec.runtime == "openvino":
        if not (spec.path / "config.json").is_file():
            raise FileNotFoundError(f"no checkpoint in {spec.path.name}/ (download it: python main.py "
                                    f"--download-only --model {spec.key})")
        from utils.runtimes.openvino import OpenVINOTextAdapter  # deferred: openvino
        return OpenVINOTextAdapter.load_openvino(spec, openvino_cache)
    return load_family(spec, device, cache=quant_cache)


def estimate_bytes(spec: ModelSpec, *, openvino_cache: Any = None) -> int:
    """Bytes the model will take once loaded (the manager makes room for them first)."""
    if spec.runtime == "openvino":
        from utils.runtimes.openvino import estimate_openvino_bytes  # deferred: openvino
        return estimate_openvino_bytes(spec, openvino_cache)
    weights = estimate_model_bytes(spec)
    return weights + prefix_cache_cap(spec, weights)  # a continuous engine's reserve for reused prefixes
