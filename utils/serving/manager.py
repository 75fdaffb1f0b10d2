"""ModelManager: the only owner of loaded models.

It loads lazily, leases models to requests, evicts the least recently used idle model when the
count cap or a memory budget needs room, unloads idle models after their keep-alive, and contains
failed loads behind a backoff. Its loader, memory probe, estimator and clock are injected, so the
policy is unit-tested with stand-ins while the serving tests run the real families.

RAM tier: parking evicted GPU models in CPU RAM and promoting them back is the RamTier mixin's
(utils/serving/ram_tier.py), on this class's state and locks.

Lock order: an entry's `load_lock` (held across the slow load) may be taken first and `_lock`
(guards the dictionaries and counters, never held across a load, an unload or a wait on I/O)
second; never the reverse, and never two `load_lock`s at once. Eviction needs only `_lock`:
it takes idle models (no leases) out of the table, then drops them outside the lock.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from utils.config.settings import ModelSpec, ServerSettings
from utils.errors import InsufficientMemory, ModelBusy, ModelUnavailable, UnknownModel
from utils.serving.grouping import InFlight, spare_reason
from utils.observer import notify
from utils.serving.entries import LoadedModel, Loader, ModelEntry, _describe_exception, _handle_status, _mb, _measure
from utils.serving.memory import (MemoryProbe, MemoryReading, cuda_available, device_budget, physical_room,
                                  release_cached_memory, split_estimate)
from utils.serving.ram_tier import DEMOTE_REASONS, RamTier

log = logging.getLogger("model_server.manager")

# Public names, importable from here as before the RAM tier and the entries moved out.
__all__ = ["DEMOTE_REASONS", "IN_MEMORY", "MAX_BACKOFF", "RELEASE_SETTLE_SECONDS", "ROOM_WAIT_SECONDS", "LoadedModel",
           "Loader", "ModelEntry", "ModelManager", "RamTier", "default_device_resolver", "release_cached_memory"]

MAX_BACKOFF = 600.0
# How long a load waits for a leased model to become idle when it needs that model's room.
ROOM_WAIT_SECONDS = 30.0
# Drivers report freed memory late; wait this long for an unload to show in the readings.
RELEASE_SETTLE_SECONDS = 1.0
IN_MEMORY = ("loaded", "parked")  # states whose weights an unload drops


class ModelManager(RamTier):
    def __init__(self, settings: ServerSettings, loader: Loader, *, estimator: Callable[[ModelSpec], int],
                 probe: MemoryProbe | Any = None, clock: Callable[[], float] = time.monotonic,
                 device_resolver: Callable[[ModelSpec], str] | None = None,
                 release_memory: Callable[[], None] | None = None, events: Any = None,
                 room_wait: float = ROOM_WAIT_SECONDS,
                 loads_waiting: Callable[[], frozenset[str]] | None = None) -> None:
        self.settings = settings
        self._loader = loader
        self._estimate = estimator
        self._probe = probe or MemoryProbe()
        self._clock = clock
        self._resolve_device = device_resolver or default_device_resolver
        self._release_memory = release_memory or release_cached_memory
        self._room_wait = room_wait
        # Keys whose weights wait for another model's load (the loader serializes loads; see
        # utils/families/loading.py): shown as "waiting_to_load" instead of "loading".
        self._loads_waiting = loads_waiting or frozenset
        self._events = events  # optional observer: on_load(key, seconds, ok), on_unload(key, reason)
        self._pressure: dict[str, dict] = {}  # device -> events, last event, what was released / holds memory
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified when a lease ends or a model unloads
        self._entries: dict[str, ModelEntry] = {k: ModelEntry(spec=s) for k, s in settings.models.items()}
        self._lru: OrderedDict[str, None] = OrderedDict()  # loaded keys, least recently used first
        self._in_flight = InFlight()  # requests waiting for or holding a lease (grouping reads it)

    # ------------------------------------------------------------------ public API

    @property
    def keys(self) -> list[str]:
        return [key for key, entry in self._entries.items() if not entry.removed]

    def specs(self) -> dict[str, ModelSpec]:
        """Every model the manager still holds a record of (removed ones too, while they drain)."""
        with self._lock:
            return {key: entry.spec for key, entry in self._entries.items()}

    def reconfigure(self, settings: ServerSettings) -> dict:
        """Applies re-read settings (config reload): added models appear; removed ones take no new
        requests, finish those in flight and unload once idle; changed limits and generation defaults
        apply to the next request; a loaded model whose load-time settings changed (path, dtype,
        quantization, device, engine, ...) reloads once idle. Returns what changed."""
        diff: dict[str, list[str]] = {"added": [], "removed": [], "changed": [], "reload_when_idle": []}
        with self._lock:
            for key, spec in settings.models.items():
                entry = self._entries.get(key)
                if entry is None:
                    self._entries[key] = ModelEntry(spec=spec)
                    diff["added"].append(key)
                    continue
                if entry.removed:
                    entry.removed = False
                    diff["added"].append(key)
                if entry.spec != spec:
                    diff["changed"].append(key)
                    if _load_fields(entry.spec) != _load_fields(spec) and entry.state in (
                            "loaded", "loading", "parking", "parked"):
                        entry.stale = True
                        diff["reload_when_idle"].append(key)
                    entry.spec = spec
            for key, entry in self._entries.items():
                if key not in settings.models and not entry.removed:
                    entry.removed = True
                    diff["removed"].append(key)
            self.settings = settings
            tier_off = not settings.ram_tier.enabled  # parked models go with the tier
            taken = [(e, self._take_out(e, "reconfigured")) for e in self._entries.values()
                     if (e.removed or e.stale or (tier_off and e.state == "parked")) and e.state in IN_MEMORY
                     and e.leases == 0]
            self._forget_removed()
        for entry, handle in taken:
            self._drop(entry, handle, "reconfigured")
        return diff

    def spec(self, key: str) -> ModelSpec:
        return self._entry(key).spec

    @contextmanager
    def lease(self, key: str, *, keep_alive: float | None = None) -> Iterator[Any]:
        """Yields the loaded model; it is never evicted while any lease on it is held."""
        entry = self._entry(key)
        with self._lock:
            self._in_flight.change(self._clock(), +1)
        try:
            handle = self._acquire(entry)
        except BaseException:
            with self._lock:
                self._in_flight.change(self._clock(), -1)
            raise
        try:
            yield handle
        finally:
            self._release_lease(entry, keep_alive)

    def load(self, key: str, *, force_retry: bool = False, device: str | None = None, wait: float = 0.0) -> dict:
        """Loads without serving (admin, preload). force_retry ignores a failed load's backoff.
        `device` moves the model there (unloading it from elsewhere first, after its requests:
        `wait` as for unload), e.g. back to a GPU after a CPU fallback."""
        entry = self._entry(key)
        if force_retry:
            with self._lock:
                entry.retry_at = None
        if device is not None:
            with self._lock:
                elsewhere = entry.state == "loaded" and entry.device != device
            if elsewhere:
                self.unload(key, wait=wait, reason="moved")
            with self._lock:
                entry.requested_device = device
        try:
            with self.lease(key):
                pass
        finally:
            if device is not None:
                with self._lock:
                    entry.requested_device = None
        return self.snapshot_one(key)

    def unload(self, key: str, *, wait: float = 0.0, reason: str = "admin") -> bool:
        """Unloads one model. With leases held it waits up to `wait` seconds, then raises ModelBusy."""
        entry = self._entry(key)
        deadline = time.monotonic() + wait
        with self._lock:
            while entry.state == "parking":  # a move to RAM in progress: it ends on its own, in seconds
                self._changed.wait(timeout=0.5)
            while entry.state == "loaded" and entry.leases > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ModelBusy(f"'{key}' is serving {entry.leases} request(s); retry later or pass wait")
                self._changed.wait(timeout=min(remaining, 0.5))
            handle = self._take_out(entry, reason) if entry.state in IN_MEMORY else None
        if handle is None:
            return False
        self._drop(entry, handle, reason)
        return True

    def unload_idle(self, *, reason: str = "cleanup") -> list[str]:
        """Unloads every loaded or parked model no request holds (pinned ones too: an operator asked)."""
        with self._lock:
            taken = [(e, self._take_out(e, reason)) for e in self._entries.values()
                     if e.state in IN_MEMORY and e.leases == 0]
        for entry, handle in taken:
            self._drop(entry, handle, reason)
        return [e.spec.key for e, _ in taken]

    def expire_idle(self) -> list[str]:
        """Called by the sweeper: models idle past their keep-alive leave their device (parked in RAM
        when the tier allows, so the next request skips the cold load, else unloaded), and parked
        models idle in RAM past `ram_tier.keep_alive` are unloaded. Returns the keys that left."""
        now = self._clock()
        reading = None  # without a reading nothing is parked: expired models unload as without the tier
        if self.settings.ram_tier.enabled:
            try:
                reading = self._probe.read()
            except Exception:
                log.exception("reading memory for the RAM tier failed; idle models unload instead")
        exits: list[tuple] = []
        with self._lock:
            for entry in list(self._entries.values()):
                if entry.state == "loaded" and entry.leases == 0 and not entry.spec.pinned \
                        and self._expired(entry, now):
                    exits += self._evict(entry, "idle", reading)
                elif entry.state == "parked" and self._parked_expired(entry, now):
                    exits.append((entry, self._take_out(entry, "ram_tier_idle"), "ram_tier_idle", False))
        self._let_go(exits)
        return [entry.spec.key for entry, *_ in exits]

    def relieve_pressure(self) -> list[str]:
        """Called by the sweeper: on every device whose free memory is below its headroom (something
        else took it), releases idle models there, least recently used first, until free memory is
        back above headroom + margin or nothing idle is left. Never a leased or pinned model; a model
        released here loads again on its next request (no back-off)."""
        if not self.settings.memory_pressure_release:
            return []
        reading = self._probe.read()
        released: list[str] = []
        for device in self._devices(reading):
            if physical_room(self.settings, reading, device) >= 0:
                with self._lock:
                    if device in self._pressure:
                        self._pressure[device]["active"] = False
                continue
            with self._lock:
                event = self._pressure.setdefault(device, {"events": 0, "active": False})
                starts = not event["active"]
                if starts:  # one event per episode, however many sweeps it lasts
                    event.update(active=True, events=event["events"] + 1, last_at=time.time(), released=[],
                                 held_by=None)
            if starts:
                log.warning("memory pressure on %s: free memory is below its headroom", device)
                self._notify("on_pressure", device)
            while physical_room(self.settings, reading, device) < self.settings.pressure_margin_bytes:
                with self._lock:
                    victim = self._pick_victim(None, device, parked=device == "cpu")
                    if victim is None:
                        holders = [e.spec.key for e in self._entries.values() if device in e.placement
                                   and e.state in ("loaded", "loading")]
                        if event["held_by"] != holders:
                            event["held_by"] = holders
                            log.warning("memory pressure on %s: nothing idle left to release; in use or pinned: "
                                        "%s", device, ", ".join(holders) or "none of our models")
                        break
                    exits = self._evict(victim, "memory_pressure", reading)  # a GPU model may park in RAM
                    event["released"] = event["released"] + [victim.spec.key]
                self._let_go(exits)
                released.append(victim.spec.key)
                self._await_release(device, reading)
                reading = self._probe.read()
        return released

    def pressure_status(self) -> dict[str, dict]:
        """Per device: pressure events so far, whether one is going on, what it released or what holds."""
        with self._lock:
            return {device: dict(event) for device, event in self._pressure.items()}

    @staticmethod
    def _devices(reading: MemoryReading) -> list[str]:
        return ["cpu"] + [f"cuda:{gpu.index}" for gpu in reading.gpus]

    def preload(self) -> None:
        for key, entry in self._entries.items():
            if entry.spec.preload:
                try:
                    self.load(key)
                except Exception as exc:  # contained: the error shows in model status
                    log.warning("preload of %s failed: %s", key, exc)

    def snapshot(self) -> dict[str, dict]:
        """A copy of every model's state, taken under the lock (admin routes read only this)."""
        now, waiting = self._clock(), self._loads_waiting()
        with self._lock:
            described = {key: self._describe(entry, now, waiting) for key, entry in self._entries.items()}
            handles = {key: entry.handle for key, entry in self._entries.items() if entry.handle is not None}
        for key, handle in handles.items():  # outside _lock: an engine's status takes the engine's own lock
            described[key]["engine"] = _handle_status(handle)
        return described

    def snapshot_one(self, key: str) -> dict:
        entry, waiting = self._entry(key), self._loads_waiting()
        with self._lock:
            described, handle = self._describe(entry, self._clock(), waiting), entry.handle
        if handle is not None:
            described["engine"] = _handle_status(handle)
        return described

    def loaded_bytes(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for entry in self._entries.values():
                if entry.state in ("loaded", "loading"):
                    for device, held in entry.placement.items():
                        out[device] = out.get(device, 0) + held
            return out

    def shutdown(self) -> None:
        """Unloads every idle model (at process exit; models still leased go with the process)."""
        with self._lock:
            taken = [(e, self._take_out(e, "shutdown")) for e in self._entries.values()
                     if e.state in IN_MEMORY and e.leases == 0]
        for entry, handle in taken:
            self._drop(entry, handle, "shutdown")

    # ------------------------------------------------------------------ leasing and loading

    def _entry(self, key: str) -> ModelEntry:
        entry = self._entries.get(key)
        if entry is None or entry.removed:
            raise UnknownModel(f"no model named '{key}'; available: {', '.join(self.keys)}")
        return entry

    def _forget_removed(self) -> None:
        """Under _lock: removed models that hold nothing any more leave the table."""
        for key in [k for k, e in self._entries.items() if e.removed
                    and e.state not in ("loaded", "loading", "parking", "parked") and e.leases == 0]:
            del self._entries[key]
            self._lru.pop(key, None)

    def _lease_if_loaded(self, entry: ModelEntry) -> Any:
        """Under _lock: leases a loaded model, or raises while a failed load backs off."""
        if entry.state == "loaded":
            entry.leases += 1
            entry.last_used = self._clock()
            self._lru.move_to_end(entry.spec.key)
            return entry.handle
        if entry.state == "error" and entry.retry_at is not None and self._clock() < entry.retry_at:
            raise ModelUnavailable(f"'{entry.spec.key}' failed to load: {entry.error}",
                                   retry_after=entry.retry_at - self._clock(), error="model failed to load")
        return None

    def _acquire(self, entry: ModelEntry) -> Any:
        with self._lock:
            entry.arrivals.record(self._clock())  # demand, for grouping
            handle = self._lease_if_loaded(entry)
            if handle is not None:
                return handle
        with entry.load_lock:
            with self._lock:  # someone may have loaded it while this request waited for load_lock
                handle = self._lease_if_loaded(entry)
                if handle is not None:
                    return handle
            return self._load(entry)

    def _load(self, entry: ModelEntry) -> Any:
        """Holding entry.load_lock: makes room, loads (or promotes a parked model), and returns the
        handle already leased.

        Whatever goes wrong, the entry never stays in "loading" and its reservation is dropped.
        """
        spec = entry.spec
        with self._lock:
            while entry.state == "parking":  # an eviction is moving it to RAM right now: promote after
                self._changed.wait(timeout=0.5)
            parked = entry.handle if entry.state == "parked" else None
            if parked is not None:
                # Promoting: no sweep, unload or RAM-tier LRU touches it meanwhile.
                entry.state = "loading"
                device = entry.requested_device or entry.device
        if parked is not None:
            handle = self._promote(entry, parked, device)
            if handle is not None:
                return handle
        try:
            device, need = self._reserve(entry)  # on return the entry is "loading" with `need` reserved
        except InsufficientMemory:
            raise
        except Exception as exc:  # a probe or driver error: not this model's fault, no backoff
            self._abandon(entry)
            log.exception("making room for %s failed", spec.key)
            raise ModelUnavailable(f"could not check memory for '{spec.key}': {_describe_exception(exc)}",
                                   retry_after=5) from None
        except BaseException:
            self._abandon(entry)
            raise
        started = self._clock()  # the manager's clock: what grouping compares arrival gaps with
        failure = None
        try:
            handle = self._loader(spec, device)
        except Exception as exc:  # contained: this model reports it, others keep serving
            failure = _describe_exception(exc)
            log.error("loading %s failed: %s", spec.key, failure, exc_info=True)
        except BaseException:
            self._abandon(entry)
            raise
        seconds = self._clock() - started
        if failure is not None:
            # Outside the except block: the traceback no longer pins the half-loaded weights.
            try:
                self._release_memory()
            finally:
                self._record_failure(entry, failure, seconds)
        measured, placement = _measure(handle, device, need)
        with self._lock:
            entry.state, entry.handle, entry.bytes_measured, entry.bytes_reserved = "loaded", handle, measured, 0
            entry.placement = placement
            entry.load_count += 1
            entry.load_seconds_total += seconds
            entry.last_load_seconds = seconds
            entry.failures, entry.retry_at, entry.error = 0, None, None
            entry.leases += 1
            entry.last_used = self._clock()
            self._lru[spec.key] = None
            self._lru.move_to_end(spec.key)
            self._changed.notify_all()
        log.info("loaded %s on %s in %.2fs (%d bytes, estimated %d)", spec.key,
                 " + ".join(placement) if len(placement) > 1 else device, seconds, measured, sum(need.values()))
        self._notify("on_load", spec.key, seconds, True)
        return handle

    def _reserve(self, entry: ModelEntry) -> tuple[str, dict[str, int]]:
        """Where the model goes and the bytes it needs there, with room made and reserved: its
        device (or its max_memory split); with device auto and fallback cpu, the CPU when no GPU
        has room even after the evictions allowed."""
        spec = entry.spec
        device = entry.requested_device or self._resolve_device(spec)
        try:
            total = self._estimate(spec)
        except Exception as exc:
            total = 0
            log.warning("could not estimate %s: %s", spec.key, exc)
        if spec.max_memory and not entry.requested_device:
            try:
                need = split_estimate(total, spec.max_memory)
            except ValueError as exc:
                raise InsufficientMemory(f"'{spec.key}': {exc}", retry_after=None) from None
            device = next(iter(need), device)
        else:
            need = {device: total}
        try:
            self._make_room(entry, need)
            entry.fallback = None
            return device, need
        except InsufficientMemory as exc:
            if not (spec.device == "auto" and spec.fallback == "cpu" and device != "cpu"
                    and not entry.requested_device):
                raise
            reason = f"no room on {device}: {exc.details}"
        log.warning("%s does not fit on %s; loading it on the CPU instead (%s)", spec.key, device, reason)
        self._make_room(entry, {"cpu": total})
        entry.fallback = reason
        return "cpu", {"cpu": total}

    def _abandon(self, entry: ModelEntry) -> None:
        with self._lock:
            if entry.state == "loading":
                entry.state = "unloaded"
            entry.bytes_reserved, entry.device, entry.placement = 0, None, {}
            self._changed.notify_all()

    def _record_failure(self, entry: ModelEntry, reason: str, seconds: float) -> None:
        with self._lock:
            entry.failures += 1
            backoff = min(MAX_BACKOFF, self.settings.failed_load_backoff * (2 ** (entry.failures - 1)))
            entry.state, entry.handle, entry.error = "error", None, reason
            entry.bytes_reserved, entry.device, entry.placement = 0, None, {}
            entry.retry_at = self._clock() + backoff if backoff > 0 else None
            self._changed.notify_all()
        self._notify("on_load", entry.spec.key, seconds, False)
        raise ModelUnavailable(f"'{entry.spec.key}' failed to load: {reason}", retry_after=backoff or None,
                               error="model failed to load")

    def _release_lease(self, entry: ModelEntry, keep_alive: float | None) -> None:
        handle = None
        with self._lock:
            entry.leases -= 1
            entry.last_used = self._clock()
            self._in_flight.change(entry.last_used, -1)
            if keep_alive is not None:
                entry.keep_alive = keep_alive
            reason = None
            if entry.state == "loaded" and entry.leases == 0:
                if entry.removed or entry.stale:
                    reason = "reconfigured"
                elif not entry.spec.pinned and self._keep_alive(entry) == 0:
                    reason = "keep_alive=0"
            if reason:
                handle = self._take_out(entry, reason)
                self._forget_removed()
            self._changed.notify_all()
        if handle is not None:
            self._drop(entry, handle, reason)

    # ------------------------------------------------------------------ room and eviction

    def _make_room(self, entry: ModelEntry, need: dict[str, int]) -> None:
        """The one place that frees room: count cap, memory budgets and physical memory alike, on
        every device the model will use (`need`: bytes per device).

        Evicts least recently used idle models (never leased, never pinned, never the one being
        loaded); waits for a lease to end when only leased models stand in the way; measures
        memory again after each unload. Raises InsufficientMemory when nothing more can go.

        Grouping (utils/serving/grouping.py): an idle model asked for within its reload time while a
        client may still ask again (or, with GROUP_WINDOW set, one that served within that window) is
        passed over while this load has waited less than `max_pass_over`, so requests to resident
        models go first (A B A A C is served A A A B C) instead of every other request paying for a
        load. A model nobody can ask for goes at once: a single client switching models never waits.
        """
        started = time.monotonic()
        deadline = started + self._room_wait
        held_since: float | None = None  # when this load began waiting for a model spared by grouping
        last_spared: tuple[str, str] | None = None
        while True:
            reading = self._probe.read()
            waited = None
            with self._lock:
                problem = self._shortage(entry, need, reading)
                if problem is None:
                    waited = self._end_grouping_wait(entry, held_since, last_spared)
                    # Reserve in the same critical section that found the room, so two loads
                    # never both count on it (and never wait on each other's reservation).
                    entry.state, entry.device, entry.error = "loading", next(iter(need)), None
                    entry.placement, entry.bytes_reserved = dict(need), sum(need.values())
                else:
                    kind, message, short, physical = problem
                    if kind == "impossible":
                        raise InsufficientMemory(message, retry_after=5)
                    on_device = short if kind == "memory" else None
                    grouping = time.monotonic() - started < self.settings.max_pass_over
                    spared: list[tuple[str, str]] = []
                    # Parked models hold RAM, not budget: dropping them helps only a physical RAM shortage.
                    victim = self._pick_victim(entry, on_device, spare=grouping, spared=spared,
                                               parked=physical and on_device == "cpu")
                    if victim is None:
                        held_for_grouping = bool(spared)
                        if held_for_grouping:
                            if held_since is None or last_spared is None or spared[0][0] != last_spared[0]:
                                log.info("%s waits for room: %s is spared (%s)", entry.spec.key, *spared[0])
                            held_since = time.monotonic() if held_since is None else held_since
                            last_spared = spared[0]
                        waiting = held_for_grouping or self._blocked_by_leases(entry, on_device)
                        remaining = deadline - time.monotonic()
                        if not waiting or (remaining <= 0 and not held_for_grouping):
                            raise InsufficientMemory(message, retry_after=5)
                        # Demand is read off the clock, so a spared model is looked at again soon.
                        self._changed.wait(timeout=0.05 if held_for_grouping else min(remaining, 0.5))
                        continue
                    waited = self._end_grouping_wait(entry, held_since, last_spared)
                    held_since = None
                    exits = self._evict(victim, kind, reading)  # a GPU model may park in RAM instead
            if waited is not None:
                self._notify("on_grouping_wait", entry.spec.key, waited)
            if problem is None:
                return
            self._let_go(exits)
            if kind == "memory":
                self._await_release(short, reading)

    def _end_grouping_wait(self, entry: ModelEntry, held_since: float | None,
                           spared: tuple[str, str] | None) -> float | None:
        """Under _lock: records a wait of this load for a model spared by grouping (seconds, which
        model, why) in the entry; returns the seconds, None when it did not wait."""
        if held_since is None or spared is None:
            return None
        seconds = time.monotonic() - held_since
        entry.grouping_waits += 1
        entry.grouping_wait_seconds_total += seconds
        entry.last_grouping_wait = {"seconds": round(seconds, 4), "spared": spared[0], "reason": spared[1]}
        return seconds

    def _shortage(self, entry: ModelEntry, need: dict[str, int], reading: MemoryReading
                  ) -> tuple[str, str, str | None, bool] | None:
        """Under _lock: why `need` (bytes per device) does not fit now, on which device, and whether
        it is free memory (not a budget) that is short; None when it fits. Parked models count on
        neither the count cap nor a budget, but hold RAM: in RAM's physical room they can be dropped."""
        resident = [e for e in self._entries.values() if e is not entry and e.state in ("loaded", "loading")]
        if len(resident) >= self.settings.max_loaded_models:
            return ("count", f"max_loaded_models={self.settings.max_loaded_models} reached and every loaded "
                             f"model is in use, pinned or still loading", None, False)
        for device, bytes_needed in need.items():
            used = sum(e.placement.get(device, 0) for e in resident)
            budget = device_budget(self.settings, reading, device)
            parked = sum(e.parked_bytes for e in self._entries.values() if e is not entry and e.state == "parked") \
                if device == "cpu" else 0
            # Not even with every other model gone: evicting them would only cost their reloads.
            if bytes_needed > budget:
                return ("impossible", f"'{entry.spec.key}' needs ~{_mb(bytes_needed)} on {device}; its budget is "
                                      f"{_mb(budget)}", device, False)
            best = physical_room(self.settings, reading, device) + used + parked
            if bytes_needed > best:
                return ("impossible", f"'{entry.spec.key}' needs ~{_mb(bytes_needed)} on {device}; only "
                                      f"{_mb(max(best, 0))} would be free after headroom even with every other "
                                      f"model unloaded", device, True)
            if used + bytes_needed > budget:
                return ("memory", f"'{entry.spec.key}' needs ~{_mb(bytes_needed)} on {device}; budget "
                                  f"{_mb(budget)}, {_mb(used)} held by other models that cannot be unloaded", device,
                        False)
            # Loads in flight have reserved memory the readings do not show yet (and so have models
            # being parked in RAM right now).
            room = physical_room(self.settings, reading, device) - sum(
                e.placement.get(device, 0) for e in resident if e.state == "loading") - (
                sum(e.parked_bytes for e in self._entries.values() if e.state == "parking") if device == "cpu" else 0)
            if bytes_needed > room:
                return ("memory", f"'{entry.spec.key}' needs ~{_mb(bytes_needed)} on {device}; only "
                                  f"{_mb(max(room, 0))} free after headroom", device, True)
        return None

    def _pick_victim(self, entry: ModelEntry | None, device: str | None, *, spare: bool = False,
                     spared: list[tuple[str, str]] | None = None, parked: bool = False) -> ModelEntry | None:
        """The least recently used idle model to take out (on `device` when given); with `parked`,
        parked models first (RAM is short: they serve nothing). With `spare`, models grouping spares
        are passed over (and listed in `spared` with the reason): a newer model nobody asks for goes
        before an older one in demand."""
        if parked:
            for key in self._lru:
                candidate = self._entries[key]
                if candidate is not entry and candidate.state == "parked":
                    return candidate
        now = self._clock()
        serving = sum(e.leases for e in self._entries.values()) if spare else 0
        for key in self._lru:  # least recently used first
            candidate = self._entries[key]
            if (candidate is not entry and candidate.state == "loaded" and candidate.leases == 0
                    and not candidate.spec.pinned and (device is None or device in candidate.placement)):
                reason = spare_reason(candidate.arrivals, candidate.last_used, candidate.last_load_seconds, now,
                                      self.settings.group_window, self._could_ask(candidate, serving, now)
                                      ) if spare else None
                if reason is None:
                    return candidate
                if spared is not None:
                    spared.append((key, reason))
        return None

    def _could_ask(self, candidate: ModelEntry, serving: int, now: float) -> int:
        """Under _lock: clients that may send `candidate` a request soon: those being served, and those
        between two requests (in the server during the candidate's last reload time, not now)."""
        return serving + self._in_flight.away(now, candidate.last_load_seconds or 0.0)

    def _blocked_by_leases(self, entry: ModelEntry, device: str | None) -> bool:
        return any(e is not entry and e.state in ("loaded", "loading") and not e.spec.pinned
                   and (device is None or device in e.placement) for e in self._entries.values())

    def _await_release(self, device: str, before: MemoryReading) -> None:
        deadline = time.monotonic() + RELEASE_SETTLE_SECONDS
        start_room = physical_room(self.settings, before, device)
        while time.monotonic() < deadline:
            if physical_room(self.settings, self._probe.read(), device) > start_room:
                return
            time.sleep(0.05)

    def _take_out(self, entry: ModelEntry, reason: str) -> Any:
        """Under _lock: removes a loaded (or parked), unleased model from the table; returns its handle
        to drop."""
        handle = entry.handle
        entry.handle, entry.state, entry.bytes_measured, entry.device = None, "unloaded", 0, None
        entry.placement, entry.stale = {}, False
        entry.parked_bytes, entry.parked_at = 0, None
        entry.unload_count += 1
        entry.keep_alive = None
        entry.last_unload_reason = reason
        entry.arrivals.left()
        self._lru.pop(entry.spec.key, None)
        self._changed.notify_all()
        return handle

    def _drop(self, entry: ModelEntry, handle: Any, reason: str) -> None:
        """Outside _lock: frees the weights for real (every reference, gc, CUDA cache)."""
        try:
            if handle is not None:
                handle.release()
        except Exception:
            log.exception("releasing %s failed", entry.spec.key)
        del handle
        self._release_memory()
        log.info("unloaded %s (%s)", entry.spec.key, reason)
        self._notify("on_unload", entry.spec.key, reason)

    # ------------------------------------------------------------------ helpers

    def _keep_alive(self, entry: ModelEntry) -> float:
        if entry.keep_alive is not None:
            return entry.keep_alive
        if entry.spec.keep_alive is not None:
            return entry.spec.keep_alive
        return self.settings.idle_timeout

    def _expired(self, entry: ModelEntry, now: float) -> bool:
        keep = self._keep_alive(entry)
        return keep >= 0 and entry.last_used is not None and now - entry.last_used >= keep

    def _describe(self, entry: ModelEntry, now: float, waiting: frozenset[str] = frozenset()) -> dict:
        spec = entry.spec
        state = "waiting_to_load" if entry.state == "loading" and spec.key in waiting else entry.state
        return {
            "key": spec.key, "family": spec.family, "repo_id": spec.repo_id, "state": state,
            "loaded": entry.state == "loaded", "device": entry.device, "placement": dict(entry.placement),
            "fallback": entry.fallback, "path_note": spec.path_note, "removed": entry.removed,
            "reload_when_idle": entry.stale, "quantization": spec.quantization,
            "dtype": spec.dtype, "bytes_in_memory": entry.bytes_measured, "in_flight": entry.leases,
            "pinned": spec.pinned, "keep_alive": self._keep_alive(entry),
            "idle_seconds": (now - entry.last_used) if entry.last_used is not None else None,
            "last_used_ago": (now - entry.last_used) if entry.last_used is not None else None,
            "load_count": entry.load_count, "unload_count": entry.unload_count,
            "load_seconds_total": round(entry.load_seconds_total, 4),
            "last_load_seconds": entry.last_load_seconds, "error": entry.error, "failures": entry.failures,
            "retry_after": max(0.0, entry.retry_at - now) if entry.retry_at else None,
            "last_unload_reason": entry.last_unload_reason,
            # Grouping: the recent gap between this model's requests, and its loads' waits for a spared model
            "arrival_gap_seconds": round(entry.arrivals.gap, 4) if entry.arrivals.gap is not None else None,
            "grouping_waits": entry.grouping_waits,
            "grouping_wait_seconds_total": round(entry.grouping_wait_seconds_total, 4),
            "last_grouping_wait": dict(entry.last_grouping_wait) if entry.last_grouping_wait else None,
            # RAM tier: "device" serving where it loaded, "ram" parked (promoted by its next request)
            "tier": "device" if entry.state == "loaded" else ("ram" if entry.parked_bytes else None),
            "parked_bytes": entry.parked_bytes,
            "parked_seconds": (now - entry.parked_at) if entry.parked_at is not None else None,
            "demote_count": entry.demote_count, "promote_count": entry.promote_count,
            "last_demote_reason": entry.last_demote_reason, "last_promote_seconds": entry.last_promote_seconds,
        }

    def _notify(self, method: str, *args: Any) -> None:
        notify(self._events, method, *args)


def default_device_resolver(spec: ModelSpec) -> str:
    if spec.device == "cuda":
        return "cuda:0"
    if spec.device != "auto":
        return spec.device
    if not cuda_available():
        return "mps" if _mps_available() else "cpu"
    import torch  # deferred: torch; the GPU with the most free memory
    frees = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    return f"cuda:{max(range(len(frees)), key=frees.__getitem__)}"


def _load_fields(spec: ModelSpec) -> tuple:
    """What a loaded model was built from: a change to any of these needs a reload to apply."""
    return (spec.family, spec.path, spec.revision, spec.dtype, spec.quantization, spec.device, spec.engine,
            spec.max_memory, spec.offload)


def _mps_available() -> bool:
    """Apple silicon (not tested on our machines)."""
    try:
        import torch  # deferred: torch
        return bool(torch.backends.mps.is_available())
    except Exception:
        return False
