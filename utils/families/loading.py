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

import functools
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


_bitsandbytes_lock = threading.Lock()
_bitsandbytes_imported = False


def import_bitsandbytes() -> None:
    """Imports bitsandbytes and transformers' bitsandbytes quantizers, once per process: from
    warm_imports when the server starts, else (an app without background work) at the first
    quantized load.

    At import, bitsandbytes wraps four of its fallback ops in `torch.compile`, and merely building
    those wrappers imports torch._inductor's compiler: about 1 s of CPU on 2 cores (torch._dynamo
    itself comes with transformers' generation utilities anyway), for ops that compile only when
    first called (and a CPU or CUDA model calls its own backend's kernels instead). So while it
    imports, the `torch.compile` it sees builds that wrapper at the first call: the same wrapper,
    made when (if ever) it is used. Any other caller of torch.compile in those moments gets the real
    one. Raises ImportError when bitsandbytes is not installed."""
    global _bitsandbytes_imported
    with _bitsandbytes_lock:
        if _bitsandbytes_imported:
            return
        import torch  # deferred: torch

        real_compile = torch.compile

        def compile_when_called(fn=None, **options):
            if fn is None:
                return lambda inner: compile_when_called(inner, **options)
            if not getattr(fn, "__module__", "").startswith("bitsandbytes"):
                return real_compile(fn, **options)
            compiled = []

            @functools.wraps(fn)
            def call(*args, **kwargs):
                if not compiled:
                    compiled.append(real_compile(fn, **options))
                return compiled[0](*args, **kwargs)
            return call

        torch.compile = compile_when_called
        try:
            import bitsandbytes  # noqa: F401  # deferred: bitsandbytes
        finally:
            torch.compile = real_compile
        import transformers.integrations.bitsandbytes  # noqa: F401  # deferred: transformers
        import transformers.quantizers.quantizer_bnb_4bit  # noqa: F401  # deferred: transformers
        import transformers.quantizers.quantizer_bnb_8bit  # noqa: F401  # deferred: transformers
        _bitsandbytes_imported = True


def warm_imports(quantized: bool) -> float:
    """Imports what every load imports (torch; transformers' model loading, its generation utilities,
    which import torch._dynamo; the auto classes) and, when a configured model is quantized,
    bitsandbytes: the serving process runs it at start, before it serves anything. In a fresh process
    those imports took 3.5 s of the first load of a 0.1 s model on 2 cores (and the first 4-bit load
    4-6 s), so a request sent after a restart paid them. Returns the seconds it took; an import that
    fails is logged, and the load that needs it fails later with the model's name."""
    started = time.perf_counter()
    try:  # this module stays free of torch and transformers until asked
        import torch  # noqa: F401  # deferred: torch
        import transformers.core_model_loading  # noqa: F401  # deferred: transformers
        import transformers.generation.utils  # noqa: F401  # deferred: transformers
        import transformers.modeling_utils  # noqa: F401  # deferred: transformers
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401  # deferred: transformers
    except Exception:
        log.exception("importing torch and transformers ahead of the first load failed")
    what = "torch and transformers"
    if quantized:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # as a quantized load sets it (base.py)
        try:
            import_bitsandbytes()
            what = "torch, transformers and bitsandbytes"
        except ImportError as exc:
            log.warning("bitsandbytes could not be imported ahead of the first quantized load: %s", exc)
        except Exception:  # a broken install shows at the load itself, with the model's name
            log.exception("importing bitsandbytes ahead of the first quantized load failed")
    seconds = time.perf_counter() - started
    log.info("warmed %s in %.2fs, ahead of the first load", what, seconds)
    return seconds
