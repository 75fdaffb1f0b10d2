"""Engines: one per loaded model, the only place its forward passes run.

The model manager loads through `make_loader`: what it holds for a loaded model is a ServedModel,
the family adapter plus its started engine. Unloading stops the engine (it drains first) before the
weights are dropped, and the manager only unloads a model no request holds, so no job is lost.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from utils.config.settings import ModelSpec
from utils.engine.continuous import ContinuousEngine
from utils.engine.engine import Engine, Job, QueueFull, QueueTimeout
from utils.engine.prefix_cache import prefix_cache_cap

log = logging.getLogger("model_server.engine")


class ServedModel:
    """A loaded model as the manager holds it: the family adapter and its engine.

    The RAM tier moves it without a reload: `park` drains and stops the engine, then moves the weights
    to CPU RAM; `unpark` moves them back and starts a new engine (a stopped engine's worker thread has
    ended and cannot start again). The manager decides when; only it calls these, and only on a model
    no request holds.
    """

    def __init__(self, adapter: Any, engine: Engine,
                 new_engine: Callable[[Any], Engine] | None = None) -> None:
        self.adapter, self.engine = adapter, engine
        self._new_engine = new_engine

    def park(self, *, pin_memory: bool = True) -> None:
        if self._new_engine is None:
            raise RuntimeError("this model cannot start its engine again; it can only be unloaded")
        self.engine.stop()  # drains: nothing runs on the weights while they move
        self.adapter.park(pin_memory=pin_memory)

    def unpark(self, device: str) -> None:
        self.adapter.unpark(device)
        self.engine = self._new_engine(self.adapter).start()

    def memory_bytes(self) -> int:
        """The weights and what the engine reserves (the prefix cache's cap): the manager's budgets count both."""
        return self.adapter.memory_bytes() + self.engine.reserved_bytes()

    def memory_placement(self) -> dict[str, int]:
        return self.adapter.memory_placement()

    def release(self) -> None:
        self.engine.stop()
        self.adapter.release()

    def status(self) -> dict:
        return self.engine.stats()


def engine_class(spec: ModelSpec, adapter: Any) -> type[Engine]:
    """Which engine serves this model; see bench/README.md for why each family runs what it runs."""
    own = getattr(adapter, "engine_class", None)  # a runtime with its own scheduler (utils/runtimes/openvino.py)
    if own is not None:
        return own
    if spec.engine.batching != "dynamic" and ContinuousEngine.supports(adapter):
        return ContinuousEngine
    return Engine


def make_loader(load_adapter: Callable[[ModelSpec, str], Any], observer: Any = None
                ) -> Callable[[ModelSpec, str], ServedModel]:
    """The manager's loader: weights first, then the engine that will run them."""
    def load(spec: ModelSpec, device: str) -> ServedModel:
        adapter = load_adapter(spec, device)

        def new_engine(adapter: Any) -> Engine:
            settings = spec.engine
            chosen = engine_class(spec, adapter)
            cap = prefix_cache_cap(spec, adapter.memory_bytes()) if chosen.kind == "continuous" else 0
            extra: dict = {"prefix_cache_bytes": cap} if cap else {}
            if settings.compile and not settings.static_cache:  # static_cache: generate compiles (CUDA)
                if chosen.kind == "continuous":
                    extra["compile_decode"] = True
                else:
                    log.warning("engine.compile is set for '%s' but it runs the %s engine; only the continuous "
                                "engine compiles its decode step, so it runs eager", spec.key, chosen.kind)
            return chosen(adapter, key=spec.key, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                          queue_timeout=settings.queue_timeout, observer=observer, **extra)
        return ServedModel(adapter, new_engine(adapter).start(), new_engine)
    return load


__all__ = ["Engine", "Job", "QueueFull", "QueueTimeout", "ServedModel", "make_loader"]
