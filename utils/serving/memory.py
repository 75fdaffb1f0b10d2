"""Memory readings (psutil RAM, per-GPU torch.cuda) and estimates of what a model will take.

Readings are plain values; the model manager decides what to do with them.
"""
from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import os
import struct
import threading
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import psutil

from utils.config.settings import ModelSpec, ServerSettings
from utils.hub.model_folder import PIPELINE_INDEX, weight_files

log = logging.getLogger("model_server.memory")

# Bytes per element of the safetensors dtypes a checkpoint may hold.
_SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                            "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Loading needs a little more than the weights (buffers, allocator rounding, quantization state).
LOAD_OVERHEAD = 1.10
MIN_ESTIMATE = 1 << 16


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    total: int
    free: int          # from the driver (cudaMemGetInfo): what any process may still take
    allocated: int     # by this process's tensors
    reserved: int      # by this process's caching allocator


@dataclass(frozen=True)
class MemoryReading:
    ram_total: int
    ram_available: int
    ram_percent: float
    process_rss: int
    gpus: tuple[GpuReading, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict:
        return asdict(self)


def cuda_available() -> bool:
    try:
        import torch  # deferred: torch
        return bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA install must not take the server down
        return False


class MemoryProbe:
    """Reads RAM through psutil and each GPU through torch.cuda. gpus=False reads RAM only: for a
    process that holds no model (the Ray front), where torch.cuda would open a context on every GPU."""

    def __init__(self, gpus: bool = True) -> None:
        self._process = psutil.Process(os.getpid())
        self._read_gpus = gpus

    def read(self) -> MemoryReading:
        vm = psutil.virtual_memory()
        return MemoryReading(ram_total=vm.total, ram_available=vm.available, ram_percent=vm.percent,
                             process_rss=self._process.memory_info().rss,
                             gpus=tuple(self._gpus()) if self._read_gpus else ())

    @staticmethod
    def _gpus() -> list[GpuReading]:
        if not cuda_available():
            return []
        import torch  # deferred: torch
        out = []
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            out.append(GpuReading(index=index, name=torch.cuda.get_device_name(index), total=total, free=free,
                                  allocated=torch.cuda.memory_allocated(index),
                                  reserved=torch.cuda.memory_reserved(index)))
        return out


_freed_refs: list[weakref.ref] = []
_freed_lock = threading.Lock()


def expect_freed(obj: object) -> None:
    """Marks an object whose last reference is being dropped (a model at unload), so that the next
    release_cached_memory() can check it is gone instead of walking the whole heap to find out."""
    if obj is None:
        return
    try:
        ref = weakref.ref(obj)
    except TypeError:
        return
    with _freed_lock:
        _freed_refs.append(ref)


def release_cached_memory() -> None:
    """Frees what dropped models held: unreachable objects, the CUDA cache, free heap pages.

    A full gc.collect() walks every object in the process (~0.25 s with torch and transformers
    imported, on every unload, i.e. on the path of the load that evicted it). Models marked with
    expect_freed() are usually freed by reference counting the moment they are dropped; the
    collection runs only when one of them is still alive (held by a reference cycle) or when nothing
    was marked (a failed load, an out-of-memory: tracebacks hold tensors in cycles). A model still
    alive after it is logged: its memory is not coming back."""
    with _freed_lock:
        refs = list(_freed_refs)
        _freed_refs.clear()
    if not refs or any(ref() is not None for ref in refs):
        gc.collect()
        alive = [ref() for ref in refs if ref() is not None]
        if alive:
            log.warning("%d unloaded model(s) still referenced after gc (%s): their memory is not freed",
                        len(alive), ", ".join(type(obj).__name__ for obj in alive))
        del alive
    release_device_caches()
    _trim_malloc()


def release_device_caches() -> None:
    """torch's allocators keep freed blocks cached: the GPU's go back to the driver, the pinned host
    blocks to the OS (after an unload, or a move between GPU and RAM)."""
    try:
        import torch  # deferred: torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass
    release_host_cache()


M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own arena and keeps what they freed: with 32 request
    threads and the engines, RSS grew 128 MB over a 5-minute soak (0 with two arenas, the same figures).
    Called at start, before any thread; MALLOC_ARENA_MAX set by the operator wins."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, arenas)
    except Exception:  # not glibc: nothing to tune
        pass


def _trim_malloc() -> None:
    """Returns freed heap pages to the OS so RSS really drops after an unload (glibc only)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def is_out_of_memory(exc: BaseException) -> bool:
    """A device allocation failure (CUDA OOM), as opposed to a bug."""
    try:
        import torch  # deferred: torch
    except Exception:
        return False
    return isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


# ------------------------------------------------------------------ budgets

def ram_budget(settings: ServerSettings, reading: MemoryReading) -> int:
    """Bytes of models allowed in RAM."""
    if settings.ram_budget_bytes is not None:
        return settings.ram_budget_bytes
    return max(0, reading.ram_total - settings.ram_headroom_bytes)


def ram_tier_budget(settings: ServerSettings, reading: MemoryReading) -> int:
    """Bytes of GPU models that may be parked in RAM (the RAM tier); auto: half the machine's RAM,
    since page-locked memory the OS cannot swap out must leave room for everything else."""
    if not settings.ram_tier.enabled:
        return 0
    if settings.ram_tier.max_bytes is not None:
        return settings.ram_tier.max_bytes
    return reading.ram_total // 2


def release_host_cache() -> None:
    """torch keeps freed page-locked (pinned) host blocks cached for reuse; a parked model that left
    RAM would still hold them. Returns them to the OS (a no-op without CUDA)."""
    try:
        import torch  # deferred: torch
        if torch.cuda.is_available() and hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()
    except Exception:
        pass


def gpu_budget(settings: ServerSettings, gpu: GpuReading) -> int:
    if settings.gpu_budget_bytes is not None:
        return min(settings.gpu_budget_bytes, gpu.total)
    return max(0, gpu.total - settings.gpu_headroom_bytes)


def physical_room(settings: ServerSettings, reading: MemoryReading, device: str) -> int:
    """Bytes that can still be taken on `device` right now, headroom kept (Apple's mps shares RAM)."""
    if device in ("cpu", "mps"):
        return reading.ram_available - settings.ram_headroom_bytes
    gpu = gpu_for(reading, device)
    return (gpu.free - settings.gpu_headroom_bytes) if gpu else -1


def gpu_for(reading: MemoryReading, device: str) -> GpuReading | None:
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    return next((g for g in reading.gpus if g.index == index), None)


def device_budget(settings: ServerSettings, reading: MemoryReading, device: str) -> int:
    if device in ("cpu", "mps"):
        return ram_budget(settings, reading)
    gpu = gpu_for(reading, device)
    return gpu_budget(settings, gpu) if gpu else 0


def split_estimate(total: int, max_memory: dict[str, int]) -> dict[str, int]:
    """How accelerate's device_map="auto" will place `total` bytes under `max_memory`: each device
    in order (GPUs, then cpu) filled up to its limit. Raises ValueError when they do not add up."""
    placement: dict[str, int] = {}
    left = total
    for device, limit in max_memory.items():
        if left <= 0:
            break
        placement[device] = min(left, limit)
        left -= placement[device]
    if left > 0:
        raise ValueError(f"max_memory allows {sum(max_memory.values())} bytes but the model needs ~{total}")
    return placement


def tensor_placement(model) -> dict[str, int]:
    """Bytes of a loaded model's parameters and buffers on each device ("cpu", "cuda:0", ...)."""
    placement: dict[str, int] = {}
    seen: set[int] = set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        device = str(tensor.device)
        placement[device] = placement.get(device, 0) + tensor.numel() * tensor.element_size()
    return placement


# ------------------------------------------------------------------ estimates

def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100 * 2**20:
            raise ValueError(f"{path.name}: implausible safetensors header length {length}")
        return json.loads(handle.read(length))


def _is_quantizable(name: str, shape: list[int]) -> bool:
    # bitsandbytes replaces nn.Linear weights; embeddings, norms, biases and lm_head stay in dtype.
    return (len(shape) == 2 and name.endswith(".weight") and "embed" not in name and "lm_head" not in name
            and "norm" not in name)


def estimate_model_bytes(spec: ModelSpec) -> int:
    """Bytes the model will occupy once loaded, from the safetensors headers (no weights read).

    Elements x target dtype size; quantized linear weights count 0.5 (4-bit) or 1 (8-bit) byte per
    element plus their scales. Falls back to file sizes when headers cannot be read. A diffusers
    pipeline (model_index.json) counts every component's subfolder; offloaded (`offload`), only
    what sits on the GPU at a time: the largest component (model) or layer (sequential).
    """
    if spec.path.is_dir() and (spec.path / PIPELINE_INDEX).is_file():
        return _estimate_pipeline(spec)
    # the files a load reads, as utils/hub/model_folder.py names them (safetensors, else *.bin)
    weights = [p for p in weight_files(spec.path) if p.is_file()] if spec.path.is_dir() else []
    files = [p for p in weights if p.suffix == ".safetensors"]
    if not files:
        return max(MIN_ESTIMATE, int(sum(p.stat().st_size for p in weights) * LOAD_OVERHEAD))
    target = _DTYPE_BYTES.get(spec.dtype)
    quant_bytes = {"4bit": 0.5 + 4 / 64, "8bit": 1.0 + 4 / 4096}.get(spec.quantization)
    total = 0.0
    for path in files:
        try:
            header = _safetensors_header(path)
        except (OSError, ValueError, struct.error):
            total += path.stat().st_size
            continue
        total += sum(size for _, size in _tensor_bytes(header, target, quant_bytes))
    return max(MIN_ESTIMATE, int(total * LOAD_OVERHEAD))


def _tensor_bytes(header: dict, target: int | None, quant_bytes: float | None = None) -> Iterator[tuple[str, float]]:
    """(tensor name, bytes once loaded) for each tensor of a safetensors header: floating tensors in
    the target dtype, quantized linear weights at `quant_bytes` per element, the rest as stored."""
    for name, info in header.items():
        if name == "__metadata__":
            continue
        stored = _SAFETENSORS_DTYPE_BYTES.get(info.get("dtype"), 4)
        per_element = target if (target and stored >= 2 and info.get("dtype", "").startswith(("F", "BF"))) \
            else stored
        if quant_bytes and _is_quantizable(name, info.get("shape", [])):
            per_element = quant_bytes
        yield name, math.prod(info.get("shape", [])) * per_element


def _estimate_pipeline(spec: ModelSpec) -> int:
    """A diffusers pipeline: the safetensors of each component subfolder (transformer, vae, text
    encoders), in the target dtype (auto: bf16 on a GPU, as the checkpoints ship)."""
    target = _DTYPE_BYTES.get(spec.dtype, 2)
    components: dict[str, float] = {}
    layers: dict[str, float] = {}
    for path in [p for p in weight_files(spec.path) if p.is_file() and p.suffix == ".safetensors"]:
        try:
            header = _safetensors_header(path)
        except (OSError, ValueError, struct.error):
            components[path.parent.name] = components.get(path.parent.name, 0) + path.stat().st_size
            continue
        for name, size in _tensor_bytes(header, target):
            components[path.parent.name] = components.get(path.parent.name, 0) + size
            layer = f"{path.parent.name}/{name.rsplit('.', 1)[0]}"
            layers[layer] = layers.get(layer, 0) + size
    if spec.offload == "model":
        total = max(components.values(), default=0)
    elif spec.offload == "sequential":
        total = max(layers.values(), default=0)
    else:
        total = sum(components.values())
    return max(MIN_ESTIMATE, int(total * LOAD_OVERHEAD))
