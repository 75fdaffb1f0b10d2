"""The manager's records and the small helpers around them: ModelEntry (one model's state, owned by
ModelManager and guarded by its `_lock`), the loader's types, and measuring / describing a loaded model.
Split out of utils/serving/manager.py so that it and utils/serving/ram_tier.py share them without importing
each other.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from utils.config.settings import ModelSpec
from utils.serving.grouping import Arrivals

log = logging.getLogger("model_server.manager")


class LoadedModel(Protocol):
    def memory_bytes(self) -> int: ...
    def release(self) -> None: ...


Loader = Callable[[ModelSpec, str], LoadedModel]


@dataclass
class ModelEntry:
    spec: ModelSpec
    state: str = "unloaded"          # unloaded | loading | loaded | unloading | error | parking | parked
    handle: Any = None
    device: str | None = None
    bytes_measured: int = 0
    bytes_reserved: int = 0          # estimate held while loading, so concurrent loads see it
    # Bytes per device: reserved while loading, measured once loaded (one device, or a split model's
    # parts on each of its devices). Budgets, eviction and pressure all count from this.
    placement: dict = field(default_factory=dict)
    fallback: str | None = None      # why the model is on the CPU instead of a GPU, when it is
    removed: bool = False            # gone from the config: no new requests; unloads once idle, then forgotten
    stale: bool = False              # its load-time settings changed: reloads once idle
    requested_device: str | None = None  # an operator's device for the next load
    leases: int = 0
    last_used: float | None = None
    keep_alive: float | None = None  # last request's override; None = spec / server default
    load_count: int = 0
    unload_count: int = 0
    load_seconds_total: float = 0.0
    last_load_seconds: float | None = None
    error: str | None = None
    failures: int = 0
    retry_at: float | None = None
    last_unload_reason: str | None = None
    # Grouping (utils/serving/grouping.py): when this model's requests arrive, and how often its loads waited
    # for another model spared by grouping.
    arrivals: Arrivals = field(default_factory=Arrivals)
    grouping_waits: int = 0
    grouping_wait_seconds_total: float = 0.0
    last_grouping_wait: dict | None = None  # seconds, the model spared, why
    # RAM tier: bytes parked in RAM (while parking, parked and promoting; 0 otherwise). `device` stays
    # the GPU it left, where a promotion takes it back; `placement` is empty while parked.
    parked_bytes: int = 0
    parked_at: float | None = None
    demote_count: int = 0
    promote_count: int = 0
    last_demote_reason: str | None = None
    last_promote_seconds: float | None = None
    load_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def _measure(handle: Any, device: str, need: dict[str, int]) -> tuple[int, dict[str, int]]:
    """A model now on `device`: its bytes (the estimate `need` when it cannot tell) and their placement."""
    try:
        measured = int(handle.memory_bytes())
    except Exception:
        measured = sum(need.values())
    return measured, _measured_placement(handle, device, measured)


def _measured_placement(handle: Any, device: str, measured: int) -> dict[str, int]:
    """Bytes per device of a loaded model: its own report (a split model), else all on `device`."""
    placement = getattr(handle, "memory_placement", None)
    try:
        found = placement() if placement else None
    except Exception:
        log.exception("reading a model's placement failed")
        found = None
    if not found or len(found) == 1:
        return {device: measured}
    return found


def _handle_status(handle: Any) -> dict | None:
    """What a loaded model reports about itself (its engine: kind, queue depth, running batch)."""
    status = getattr(handle, "status", None)
    try:
        return status() if status else None
    except Exception:
        log.exception("reading a model's status failed")
        return None


def _describe_exception(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 500 else text[:497] + "..."


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
