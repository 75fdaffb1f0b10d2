"""Moving a loaded model's weights between its GPU and CPU RAM: the RAM tier's mechanics.

The model manager decides which model is parked and when (utils/serving/ram_tier.py); this module only
moves tensors. Parking copies every parameter and buffer into page-locked (pinned) host memory when
CUDA is there to pin it: the copy back is then one DMA transfer per tensor, which is what makes a
promotion much faster than a cold load (no file read, no safetensors parse, no dtype conversion, no
module construction). Parameters keep their identity (tied weights stay tied), since `_apply` only
swaps each parameter's data.

Not for bitsandbytes or accelerate-dispatched models: the manager never parks those (see
ModelManager._parkable for why).
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("model_server.families")


# torch's pinned-memory allocator rounds every allocation up to a power of two (an embedding of
# 1.2 GB would take 2 GB), which the RAM tier's accounting, counted in tensor bytes, would not see.
# Above this size it allocates exactly; below it the rounding costs little in total.
PINNED_ROUND_THRESHOLD_MB = 16
_exact_pinned = False


def _allocate_pinned_exactly() -> None:
    """Once per process: turns the rounding off above PINNED_ROUND_THRESHOLD_MB (a process-wide torch
    allocator setting; only pinned host memory is affected, and only this module pins)."""
    global _exact_pinned
    if _exact_pinned:
        return
    _exact_pinned = True
    try:
        import torch  # deferred: torch
        torch._C._accelerator_setAllocatorSettings(f"pinned_max_round_threshold_mb:{PINNED_ROUND_THRESHOLD_MB}")
    except Exception:  # an older torch: parked models may take more RAM than counted
        log.warning("could not turn off the power-of-two rounding of pinned memory; parked models may hold up "
                    "to twice their size in RAM")


def park_module(module: Any, *, pin_memory: bool) -> None:
    """Every parameter and buffer of `module` to CPU RAM (page-locked when asked and CUDA is present)."""
    import torch  # deferred: torch

    pin = pin_memory and torch.cuda.is_available()
    if pin:
        _allocate_pinned_exactly()

    def to_host(tensor: Any) -> Any:
        if tensor.device.type == "cpu" and (not pin or tensor.is_pinned()):
            return tensor  # already there (a tied weight met twice, or a CPU model)
        if not pin:
            return tensor.to("cpu")
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
        host.copy_(tensor, non_blocking=True)  # GPU -> pinned: asynchronous; synchronized below
        return host

    module._apply(to_host)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the copies are done before the GPU memory they read is freed


def unpark_module(module: Any, device: str) -> None:
    """Every parameter and buffer of `module` back on `device` (from pinned memory: asynchronous
    copies, waited for before the model serves)."""
    import torch  # deferred: torch

    on_cuda = device.startswith("cuda")
    module.to(device, non_blocking=on_cuda)
    if on_cuda:
        torch.cuda.synchronize(device)
