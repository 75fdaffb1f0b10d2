"""Engines: one per loaded model, the only place its forward passes run.

The model manager loads through `make_loader`: what it holds for a loaded model is a ServedModel,
the family adapter plus its started engine. Unloading stops the engine (it drains first) before the
weights are dropped, and the manager only unloads a model no request holds, so no job is lost.
"""
from __future__ import annotations

from typing import Any, Callable

from utils.engine.engine import Engine, Job, QueueFull, QueueTimeout
from utils.settings import ModelSpec


class ServedModel:
    """A loaded model as the manager holds it: the family adapter and its engine."""

    def __init__(self, adapter: Any, engine: Engine) -> None:
        self.adapter, self.engine = adapter, engine

    def memory_bytes(self) -> int:
        return self.adapter.memory_bytes()

    def memory_placement(self) -> dict[str, int]:
        return self.adapter.memory_placement()

    def release(self) -> None:
        self.engine.stop()
        self.adapter.release()

    def status(self) -> dict:
        return self.engine.stats()


def engine_class(spec: ModelSpec, adapter: Any) -> type[Engine]:
    """Which engine serves this model; see bench/README.md for why each family runs what it runs."""
    from utils.engine.continuous import ContinuousEngine
    if spec.engine.batching != "dynamic" and ContinuousEngine.supports(adapter):
        return ContinuousEngine
    return Engine


def make_loader(load_adapter: Callable[[ModelSpec, str], Any], observer: Any = None
                ) -> Callable[[ModelSpec, str], ServedModel]:
    """The manager's loader: weights first, then the engine that will run them."""
    def load(spec: ModelSpec, device: str) -> ServedModel:
        adapter = load_adapter(spec, device)
        settings = spec.engine
        engine = engine_class(spec, adapter)(
            adapter, key=spec.key, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
            queue_timeout=settings.queue_timeout, observer=observer)
        return ServedModel(adapter, engine.start())
    return load


__all__ = ["Engine", "Job", "QueueFull", "QueueTimeout", "ServedModel", "make_loader"]
