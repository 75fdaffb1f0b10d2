"""ModelReplica: one Ray Serve replica. It builds the same services as the local server (model
manager, engines, inference service; no Flask, no temp files) and runs the part of each request
that needs the model. The front decoded the media already and sends the decoded request.

Multiplexing: `serve.multiplexed` (cap: the group's max_models_per_replica) tells Serve's router
which replica holds which model key. Its loader asks our manager to load the model; when Serve's LRU
drops a key it calls the returned object's `__del__`, which unloads the model from our manager
unless a request still holds it (then the manager, whose max_loaded_models is the same cap, evicts
it when the next load needs the room and the lease has ended). The manager stays the one owner.

Every answer is an envelope: ("ok", value) or ("error", ServerError): domain errors cross as
values, with their status and body, instead of as Ray task failures. A call carrying another
replica's `replica_id` (router.py: that replica went away) answers ("elsewhere", None).
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from utils.errors import ModelBusy, ServerError
from utils.hub.demo_models import build_demo_models
from utils.local_services import Sweeper, build_local_services
from utils.serving import status
from utils.serving.manager import release_cached_memory

log = logging.getLogger("model_server.replica")
_END = object()


def replica_settings(settings, group):
    """A replica's own settings: the group's per-replica model cap; one torch thread per CPU it
    was given (replicas share a box: never every core each)."""
    threads = settings.torch_threads or max(1, int(group.num_cpus))
    return settings.replace(backend="local", max_loaded_models=group.max_models_per_replica, torch_threads=threads)


class Resident:
    """What serve.multiplexed caches for a key; Serve calls `__del__` when its LRU drops the key."""

    def __init__(self, manager: Any, key: str) -> None:
        self.manager, self.key, self._dropped = manager, key, False

    def __del__(self) -> None:
        if self._dropped:
            return
        self._dropped = True
        try:
            self.manager.unload(self.key, wait=0, reason="multiplex_lru")
        except ModelBusy:
            pass  # a request holds it; the manager's cap evicts it once that lease ends
        except Exception:
            log.exception("unloading %s for serve.multiplexed failed", self.key)


class ModelReplica:
    def __init__(self, settings, group_name: str) -> None:
        from ray import serve  # deferred: ray

        group = next(g for g in settings.ray.groups if g.name == group_name)
        settings = replica_settings(settings, group)
        if settings.demo:
            build_demo_models(settings.models_dir / "demo")  # cached; a node of a cluster may lack them
        self.services = build_local_services(settings)
        self.manager = self.services.manager
        self.inference = self.services.inference
        self.sweeper = Sweeper(settings.sweep_interval, [self.manager.expire_idle,
                                                         self.manager.relieve_pressure]).start()
        self.id = serve.get_replica_context().replica_id.unique_id
        self.group = group_name
        self._pool = ThreadPoolExecutor(max_workers=settings.ray.max_ongoing_requests + 4,
                                        thread_name_prefix="replica")

        async def load_model(key: str) -> Resident:
            await self._call(self.manager.load, key)
            return Resident(self.manager, key)
        self._resident = serve.multiplexed(max_num_models_per_replica=group.max_models_per_replica)(load_model)

    # ------------------------------------------------------------------ requests

    async def generate(self, key: str, request: Any, job: Any, deadline: float) -> tuple:
        gone = threading.Event()
        try:
            await self._resident(key)
            return "ok", await self._call(self.inference.execute, key, request, job, deadline, gone.is_set)
        except ServerError as exc:
            return "error", exc
        except asyncio.CancelledError:  # the front's client left: the row leaves the engine
            gone.set()
            raise

    async def images(self, key: str, request: Any, params: Any, deadline: float, keep_alive: float | None) -> tuple:
        gone = threading.Event()
        try:
            await self._resident(key)
            return "ok", await self._call(self.inference.execute_images, key, request, params, deadline, keep_alive,
                                          gone.is_set)
        except ServerError as exc:
            return "error", exc
        except asyncio.CancelledError:
            gone.set()
            raise

    async def stream(self, key: str, request: Any, job: Any, deadline: float):
        """("start", device), then ("piece", text)..., then ("end", result); or one ("error", exc)."""
        try:
            await self._resident(key)
            opening = self._submit(self.inference.open_stream, key, request, job, deadline)
            try:
                pieces = await asyncio.shield(opening)
            except asyncio.CancelledError:  # the front gave up: the stream it will never read ends
                opening.add_done_callback(self._close_opened)
                raise
        except ServerError as exc:
            yield "error", exc
            return
        try:
            yield "start", pieces.device
            iterator = iter(pieces)
            while (piece := await self._call(next, iterator, _END)) is not _END:
                yield "piece", piece
            yield "end", pieces.result
        except ServerError as exc:
            yield "error", exc
        finally:
            self._pool.submit(pieces.close)  # cancels the row when the front closed the stream early

    # ------------------------------------------------------------------ operators

    async def status(self, replica_id: str | None = None) -> tuple:
        if replica_id and replica_id != self.id:
            return "elsewhere", None
        return "ok", await self._call(self._status)

    def _status(self) -> dict:
        import ray  # deferred: ray

        return {"replica": self.id, "group": self.group, "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id(), "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
                "models": self.manager.snapshot(), "loaded_bytes": self.manager.loaded_bytes(),
                "pressure": self.manager.pressure_status(), "memory": status.memory_report(self.services)}

    async def admin(self, action: str, key: str | None = None, replica_id: str | None = None, **options) -> tuple:
        """load / unload one model, cleanup (unload every idle model), reconfigure (new settings)."""
        if replica_id and replica_id != self.id:
            return "elsewhere", None
        try:
            if action == "load":
                value = await self._call(partial(self.manager.load, key, force_retry=True, **options))
                await self._resident(key)  # Serve's router learns that this replica holds it
            elif action == "unload":
                value = await self._call(partial(self.manager.unload, key, **options))
            elif action == "cleanup":
                value = await self._call(self._cleanup)
            elif action == "reconfigure":
                group = next(g for g in options["settings"].ray.groups if g.name == self.group)
                value = await self._call(self.manager.reconfigure, replica_settings(options["settings"], group))
            else:
                raise ValueError(f"unknown admin action {action!r}")
        except ServerError as exc:
            return "error", exc
        return "ok", value

    def _cleanup(self) -> list[str]:
        unloaded = self.manager.unload_idle(reason="emergency_cleanup")
        release_cached_memory()
        return unloaded

    # ------------------------------------------------------------------ helpers

    def _submit(self, fn, *args) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args))

    async def _call(self, fn, *args):
        """Blocking work (loads, forward passes, locks) in the replica's threads; a cancelled caller
        does not cancel the work under way (its `is_gone` stops it)."""
        return await asyncio.shield(self._submit(fn, *args))

    def _close_opened(self, opening: asyncio.Future) -> None:
        if not opening.cancelled() and opening.exception() is None:
            self._pool.submit(opening.result().close)  # ends the row and its lease

    def __del__(self) -> None:
        try:
            self.sweeper.stop()
            self.manager.shutdown()
        except Exception:
            pass
