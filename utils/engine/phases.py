"""Named ranges of the engine's own step phases (join/prefill, forward, sample, emit) for the
operator profiler (utils/ops/profiler.py): each is a torch.profiler `record_function` while a profile
records, and nothing otherwise (a record_function costs a dispatcher call per use; a phase that is
off costs one flag read)."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

_OFF = nullcontext()


def phase(name: str) -> Any:
    """`with phase("engine.step.forward"):` marks a range in a running profile."""
    import torch  # deferred: torch (the engine modules import without it until a model loads)
    if not torch.autograd.profiler._is_profiler_enabled:
        return _OFF
    return torch.profiler.record_function(name)
