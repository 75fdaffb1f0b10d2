"""Loading weights safely: one load at a time in the process, and a check of what was loaded.

Why loads are serialized (do not "optimize" this away): transformers' `from_pretrained` swaps
process-wide state while it runs. `no_tie_weights()` replaces `PreTrainedModel.tie_weights` on the
class for the whole process, and the init and default-dtype contexts are global too. Two loads that
overlap in two threads can restore each other's replacement in the wrong order: one model then keeps
tied weights on the meta device ("Tensor on device meta is not on the expected device cpu!"), and
every later load inherits the patched class. That is transformers' global state, not our choice.

Only loads wait for each other here; requests to models already loaded keep running, and unloads
never take this lock.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

log = logging.getLogger("model_server.loading")


class WeightLoadQueue:
    """The process-wide lock every `from_pretrained` (and pipeline load) runs under, plus who waits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._guard = threading.Lock()
        self._waiting: dict[str, int] = {}
        self._loading: str | None = None

    @contextmanager
    def turn(self, key: str) -> Iterator[None]:
        with self._guard:
            self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            self._lock.acquire()
        finally:
            with self._guard:
                self._waiting[key] -= 1
                if not self._waiting[key]:
                    del self._waiting[key]
        try:
            with self._guard:
                self._loading = key
            yield
        finally:
            with self._guard:
                self._loading = None
            self._lock.release()

    def waiting(self) -> frozenset[str]:
        """Keys whose load waits for another model's load to finish."""
        with self._guard:
            return frozenset(self._waiting)

    def loading(self) -> str | None:
        with self._guard:
            return self._loading


WEIGHT_LOADS = WeightLoadQueue()


class BrokenWeights(RuntimeError):
    """A load returned a model that cannot serve (meta tensors, untied weights)."""


def check_loaded_weights(model: Any) -> None:
    """Raises BrokenWeights when a parameter or buffer stayed on the meta device or a weight the
    model declares tied is not tied: such a model must be a failed load, never a served one."""
    on_meta = [name for name, tensor in _tensors(model) if getattr(tensor, "is_meta", False)]
    if on_meta:
        shown = ", ".join(on_meta[:5]) + (f" and {len(on_meta) - 5} more" if len(on_meta) > 5 else "")
        raise BrokenWeights(f"{len(on_meta)} weight(s) left on the meta device after loading: {shown}")
    untied = []
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        try:
            target_tensor, source_tensor = model.get_parameter(target), model.get_parameter(source)
        except AttributeError:  # a quantizer may have replaced the module: nothing to compare
            continue
        if target_tensor is not source_tensor and target_tensor.data_ptr() != source_tensor.data_ptr():
            untied.append(f"{target} -> {source}")
    if untied:
        raise BrokenWeights(f"tied weights are not tied after loading: {', '.join(untied[:5])}")


def _tensors(model: Any) -> Iterator[tuple[str, Any]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def check_remote_code(spec: Any) -> None:
    """A checkpoint whose config.json maps its classes to its own Python files (auto_map) for an
    architecture transformers does not ship runs only with the model's trust_remote_code (which
    settings allow only with a pinned revision); otherwise the load fails here, saying so."""
    if spec.trust_remote_code:
        return
    try:
        config = json.loads((spec.path / "config.json").read_text())
    except (OSError, ValueError):
        return  # no readable config: the load reports what is missing
    if not isinstance(config, dict) or not config.get("auto_map"):
        return
    from transformers import CONFIG_MAPPING  # deferred: transformers
    if config.get("model_type") in CONFIG_MAPPING:
        return  # a native architecture: transformers' own classes load it, the repo's code stays unused
    raise ValueError(f"{spec.path.name}/ holds its own model code (auto_map in config.json, model_type "
                     f"{config.get('model_type')!r}); to run it set trust_remote_code: true and pin 'revision' "
                     f"for '{spec.key}' in models.yaml")


def warm_quantization() -> float | None:
    """Imports bitsandbytes and transformers' bitsandbytes quantizers ahead of the first quantized
    load; the server runs it in the background at start when a configured model is quantized.

    Importing bitsandbytes costs 1-2 s of CPU once per process (most of it torch.compile, which
    bitsandbytes calls at import on four of its CPU ops, importing torch._dynamo and torch._inductor);
    the first 4-bit request after a restart paid it inside its load. Returns the seconds it took,
    None when bitsandbytes is not installed (a quantized load then fails with its own message)."""
    started = time.perf_counter()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # as a quantized load sets it (base.py)
    try:  # this module stays free of torch and bitsandbytes until asked
        import bitsandbytes  # noqa: F401  # deferred: bitsandbytes
        import transformers.integrations.bitsandbytes  # noqa: F401  # deferred: transformers
        import transformers.quantizers.quantizer_bnb_4bit  # noqa: F401  # deferred: transformers
        import transformers.quantizers.quantizer_bnb_8bit  # noqa: F401  # deferred: transformers
    except ImportError as exc:
        log.warning("bitsandbytes could not be imported ahead of the first quantized load: %s", exc)
        return None
    except Exception:  # a broken install shows at the load itself, with the model's name
        log.exception("importing bitsandbytes ahead of the first quantized load failed")
        return None
    seconds = time.perf_counter() - started
    log.info("warmed bitsandbytes in %.2fs, ahead of the first quantized load", seconds)
    return seconds
