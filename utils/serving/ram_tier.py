"""The RAM tier's policy: when an evicted GPU model parks in CPU RAM, and how it comes back.

A model on a CUDA GPU that an eviction (count cap, memory budget, memory pressure, idle
keep-alive) takes off the GPU is parked in CPU RAM instead of dropped when the tier's budget and the
free RAM allow (`ram_tier` settings); its next lease promotes it back (room made on the GPU exactly as
for a load, under the same load_lock). Each entry has a tier: "device" (serving), "ram" (parked) or
none. One recency order spans both tiers: a model parks only by dropping parked models used less
recently than itself, else it is dropped itself. Parked models do not count against
max_loaded_models (it caps models on a device) and expire after `ram_tier.keep_alive`. The moves
themselves are the handle's (`park` / `unpark`, utils/engine/__init__.py).
"""
from __future__ import annotations

import logging
import time
from typing import Any

from utils.errors import InsufficientMemory, ModelUnavailable
from utils.serving.memory import MemoryReading, physical_room, ram_tier_budget
from utils.serving.entries import ModelEntry, _describe_exception, _mb, _measure

log = logging.getLogger("model_server.manager")

# Evictions that park a GPU model in RAM when the RAM tier allows. Every other reason drops: an
# operator asked to free memory (admin, emergency_cleanup), the model must go (reconfigured, moved,
# shutdown), or its keep-alive of 0 asked for nothing to be kept after each request.
DEMOTE_REASONS = frozenset({"count", "memory", "memory_pressure", "idle"})


class RamTier:
    """Part of ModelManager (utils/serving/manager.py), not a component of its own: a mixin whose
    methods run on the manager's state (`_entries`, `_lru`, settings, probe, clock) under the
    manager's `_lock` and entries' `load_lock`s, with the same lock order, and call back into it
    (`_take_out`, `_drop`, `_make_room`, `_forget_removed`, `_notify`). It is a separate module so
    that the tier's policy (park or drop, displacing parked models, promotion, expiry) reads in one
    place; ModelManager stays the one owner of the state.
    """

    def _evict(self, victim: ModelEntry, reason: str, reading: MemoryReading | None) -> list[tuple]:
        """Under _lock: takes an idle model out of service. A GPU model parks in RAM when the tier
        allows (after the parked models it displaces), else it is taken out to be dropped. Returns
        (entry, handle, reason, park) for _let_go, which does the slow part outside the lock."""
        displaced = self._park_plan(victim, reason, reading) if victim.state == "loaded" else None
        if displaced is None:
            return [(victim, self._take_out(victim, reason), reason, False)]
        exits = [(e, self._take_out(e, "ram_tier_full"), "ram_tier_full", False) for e in displaced]
        # Off the device now: its placement leaves the budgets (the move finishes outside the lock,
        # as an unload's release does); its bytes count in the RAM tier from here on.
        victim.state, victim.parked_bytes, victim.placement = "parking", victim.bytes_measured, {}
        victim.keep_alive = None
        victim.arrivals.left()  # off its device: grouping's gaps start again when it is back
        victim.demote_count += 1
        victim.last_demote_reason = reason
        self._changed.notify_all()
        return exits + [(victim, victim.handle, reason, True)]

    def _park_plan(self, victim: ModelEntry, reason: str, reading: MemoryReading | None) -> list[ModelEntry] | None:
        """Under _lock: the parked models to drop so that `victim` fits in the RAM tier (its budget and
        the RAM free after headroom), or None when it is not to be parked. Least recently used first
        across both tiers: only parked models used less recently than the victim make way for it."""
        if reading is None or not self._parkable(victim, reason):
            return None
        size = victim.bytes_measured
        parked = [e for e in self._entries.values() if e.parked_bytes]
        # A model being promoted (state "loading" with parked_bytes) counts against the budget until
        # _promote succeeds: its pinned copy stays in RAM until its move ends, and a promotion that
        # fails (no room on the GPU, no CPU fallback) puts it back in the tier. Leaving it out let the
        # victim evicted for it park against its bytes, and a failed promotion then left the tier over
        # max_bytes. (Its RAM is in the readings already: nothing to subtract from `room` for it.)
        used = sum(e.parked_bytes for e in parked)
        budget = ram_tier_budget(self.settings, reading)
        # RAM the readings do not show yet: models being parked right now, and CPU loads in flight
        # (their reservation, as _shortage counts it). Pinned memory cannot be swapped out, so
        # overcommitting it against a CPU load starves the whole machine, not just that load.
        room = physical_room(self.settings, reading, "cpu") - sum(e.parked_bytes for e in parked
                                                                   if e.state == "parking") - sum(
            e.placement.get("cpu", 0) for e in self._entries.values() if e.state == "loading")
        displaced: list[ModelEntry] = []
        for key in self._lru:  # least recently used first
            if used + size <= budget and size <= room:
                break
            candidate = self._entries[key]
            if candidate is victim:
                break  # every parked model left was used more recently than the victim
            if candidate.state == "parked":
                displaced.append(candidate)
                used -= candidate.parked_bytes
                room += candidate.parked_bytes
        return displaced if used + size <= budget and size <= room else None

    def _parkable(self, entry: ModelEntry, reason: str) -> bool:
        """Whether this eviction may park the model in RAM rather than drop it."""
        if not self.settings.ram_tier.enabled or reason not in DEMOTE_REASONS:
            return False
        spec, device = entry.spec, entry.device or ""
        # A whole model on one CUDA GPU only (on a CPU it is in RAM already). Not bitsandbytes models:
        # their weights carry quantization state (absmax, quant_state, 8-bit CB/SCB) that bitsandbytes
        # ties to the device it quantized on, and `.to()` does not move it reliably. Not split
        # (max_memory) or offloaded models: accelerate's hooks pin each part to its device and would
        # move it back, or keep the GPU copy, on their own.
        if not device.startswith("cuda") or set(entry.placement) != {device}:
            return False
        if spec.quantization != "none" or spec.offload != "none" or spec.max_memory:
            return False
        # Not compiled models (engine.compile: torch.compile, CUDA graphs): the compiled graphs and
        # their static buffers keep GPU memory that moving the parameters does not free, and CUDA
        # graphs replay against the parameters' device addresses, which a move to RAM and back changes.
        if spec.engine.compile:
            return False
        return callable(getattr(entry.handle, "park", None))

    def _let_go(self, exits: list[tuple]) -> None:
        """Outside _lock: what _evict decided, in order (displaced parked models first: their RAM
        goes before the newcomer's comes)."""
        for entry, handle, reason, park in exits:
            if park:
                self._park(entry, handle, reason)
            else:
                self._drop(entry, handle, reason)

    def _park(self, entry: ModelEntry, handle: Any, reason: str) -> None:
        """Outside _lock: moves an evicted model's weights to RAM (its engine drained and stopped
        first); a move that fails unloads it instead."""
        key, size = entry.spec.key, entry.parked_bytes
        try:
            handle.park(pin_memory=self.settings.ram_tier.pin_memory)
        except Exception:
            log.exception("parking %s in RAM failed; unloading it instead", key)
            with self._lock:
                self._take_out(entry, reason)
            self._drop(entry, handle, reason)
            return
        with self._lock:
            entry.state, entry.parked_at = "parked", self._clock()
            # Removed or changed in the config, or the tier turned off, while it moved: it goes.
            gone = entry.removed or entry.stale or not self.settings.ram_tier.enabled
            leftover = self._take_out(entry, "reconfigured") if gone else None
            self._forget_removed()
            self._changed.notify_all()
        log.info("parked %s in RAM (%s, %s)", key, reason, _mb(size))
        self._notify("on_demote", key, reason)
        if gone:
            self._drop(entry, leftover, "reconfigured")

    def _promote(self, entry: ModelEntry, handle: Any, device: str) -> Any:
        """Holding entry.load_lock, the entry taken out of the RAM tier (state "loading"): makes room
        on `device` as a load does, moves the weights back and restarts the engine; returns the handle
        leased. None when the parked copy had to be dropped (no room on the GPU but a CPU fallback
        allowed, or the move failed): the caller then loads from disk as for any unloaded model."""
        spec = entry.spec
        need = {device: entry.parked_bytes}
        try:
            self._make_room(entry, need)
        except InsufficientMemory:
            fallback = spec.device == "auto" and spec.fallback == "cpu" and device != "cpu" \
                and not entry.requested_device
            self._discard_parked(entry, "fallback" if fallback else None)
            if not fallback:
                raise  # it stays parked: it comes back once the GPU has room
            log.warning("%s: no room on %s to promote it from RAM; loading it again, where it fits", spec.key,
                        device)
            return None
        except Exception as exc:  # a probe or driver error: it stays parked
            self._discard_parked(entry, None)
            log.exception("making room to promote %s failed", spec.key)
            raise ModelUnavailable(f"could not check memory for '{spec.key}': {_describe_exception(exc)}",
                                   retry_after=5) from None
        except BaseException:
            self._discard_parked(entry, None)
            raise
        started = time.perf_counter()
        try:
            handle.unpark(device)
        except Exception as exc:
            log.error("promoting %s to %s failed (%s); loading it from disk instead", spec.key, device,
                      _describe_exception(exc), exc_info=True)
            self._discard_parked(entry, "promotion_failed")
            return None
        seconds = time.perf_counter() - started
        measured, placement = _measure(handle, device, need)
        with self._lock:
            entry.state, entry.handle, entry.bytes_measured, entry.bytes_reserved = "loaded", handle, measured, 0
            entry.placement, entry.parked_bytes, entry.parked_at = placement, 0, None
            entry.promote_count += 1
            entry.last_promote_seconds = seconds
            entry.leases += 1
            entry.last_used = self._clock()
            self._lru[spec.key] = None
            self._lru.move_to_end(spec.key)
            self._changed.notify_all()
        log.info("promoted %s from RAM to %s in %.2fs", spec.key, device, seconds)
        self._notify("on_promote", spec.key, seconds)
        return handle

    def _discard_parked(self, entry: ModelEntry, reason: str | None) -> None:
        """A promotion that did not happen: with a reason the parked copy is dropped (the entry ends
        unloaded, its reservation gone); without one the entry goes back to the RAM tier."""
        with self._lock:
            if reason is None:
                entry.state, entry.bytes_reserved, entry.placement = "parked", 0, {}
                self._changed.notify_all()
                return
            handle = self._take_out(entry, reason)
            entry.bytes_reserved = 0
        self._drop(entry, handle, reason)

    def _parked_expired(self, entry: ModelEntry, now: float) -> bool:
        keep = self.settings.ram_tier.keep_alive
        return keep >= 0 and entry.parked_at is not None and now - entry.parked_at >= keep

    def ram_tier_status(self, reading: MemoryReading) -> dict:
        """The RAM tier as operators see it: settings, budget, bytes parked and which models."""
        tier = self.settings.ram_tier
        with self._lock:
            parked = {key: e.parked_bytes for key, e in self._entries.items() if e.parked_bytes}
        return {"enabled": tier.enabled, "pin_memory": tier.pin_memory, "keep_alive": tier.keep_alive,
                "budget": ram_tier_budget(self.settings, reading), "used": sum(parked.values()),
                "models": sorted(parked)}
