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
import threading
from contextlib import contextmanager
from typing import Any, Iterator


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
