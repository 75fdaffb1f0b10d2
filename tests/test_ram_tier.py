"""RAM tier policy (issue 16, part 3): GPU models evicted to CPU RAM instead of dropped, promoted back.

The policy runs through the manager's seams: stand-in handles that record park / unpark, a fake GPU
(cuda:0) through the device resolver and the memory probe, and a fake clock. The real move of a real
tiny model runs on the CPU at the end (GPU -> pinned RAM -> GPU is measured by
`bench/cold_start.py --ram-tier` where a GPU is lent).
"""
from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from utils.errors import InsufficientMemory
from utils.serving.memory import GpuReading, MemoryReading
from utils.serving.manager import ModelManager
from utils.config.settings import EngineSettings, ModelSpec, RamTierSettings, ServerSettings

GIB = 2**30
SIZE = 4 * GIB  # every stand-in model


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Probe:
    """64 GiB of RAM and one 80 GiB GPU, `available` / `gpu_free` as the test sets them."""

    def __init__(self, available: int = 60 * GIB, gpu_free: int = 70 * GIB) -> None:
        self.available, self.gpu_free = available, gpu_free

    def read(self) -> MemoryReading:
        gpu = GpuReading(index=0, name="fake", total=80 * GIB, free=self.gpu_free, allocated=0, reserved=0)
        return MemoryReading(ram_total=64 * GIB, ram_available=self.available, ram_percent=0.0, process_rss=0,
                             gpus=(gpu,))


class Handle:
    """A loaded model that can move; every call lands in the shared `events` list. With a probe, its
    moves and release give memory back to the readings as real ones do."""

    def __init__(self, key: str, device: str, events: list, fail: str | None = None, probe=None) -> None:
        self.key, self.device, self.events, self.fail, self.probe = key, device, events, fail, probe
        self.released = False

    def memory_bytes(self) -> int:
        return SIZE

    def release(self) -> None:
        self.released = True
        self.events.append(("release", self.key))
        if self.probe and self.device == "cpu":
            self.probe.available += SIZE

    def park(self, *, pin_memory: bool) -> None:
        if self.fail == "park":
            raise RuntimeError("cannot move")
        self.events.append(("park", self.key, pin_memory))
        self.device = "cpu"
        if self.probe:
            self.probe.gpu_free += SIZE

    def unpark(self, device: str) -> None:
        if self.fail == "unpark":
            raise RuntimeError("CUDA out of memory")
        self.events.append(("unpark", self.key, device))
        self.device = device


class PlainHandle(Handle):
    """A handle that cannot move (no park/unpark): what a model that only unloads looks like."""
    park = None  # type: ignore[assignment]
    unpark = None  # type: ignore[assignment]


class Gate:
    """Holds a move or a load half-way: `started` is set when it begins, it goes on once `open` is set."""

    def __init__(self) -> None:
        self.started, self.open = threading.Event(), threading.Event()

    def pass_through(self) -> None:
        self.started.set()
        assert self.open.wait(10), "a gate was never opened"


class Loader:
    def __init__(self, events: list, handle_class=Handle, fail: dict | None = None, probe=None,
                 gates: dict | None = None) -> None:
        self.events, self.handle_class, self.fail, self.probe = events, handle_class, fail or {}, probe
        self.gates = gates or {}  # key -> Gate: that model's load waits half-way (its reservation held)
        self.calls: list[tuple[str, str]] = []
        self.handles: dict[str, list[Handle]] = {}

    def __call__(self, spec: ModelSpec, device: str) -> Handle:
        self.calls.append((spec.key, device))
        self.events.append(("load", spec.key, device))
        if spec.key in self.gates:
            self.gates[spec.key].pass_through()
        handle = self.handle_class(spec.key, device, self.events, self.fail.get(spec.key), self.probe)
        self.handles.setdefault(spec.key, []).append(handle)
        return handle


def make(keys=("a", "b", "c"), tier: RamTierSettings | None = None, handle_class=Handle, fail=None, probe=None,
         models: dict | None = None, releasing: bool = False, gates: dict | None = None, **server):
    settings_kw = dict(max_loaded_models=1, idle_timeout=60.0, ram_headroom_bytes=2 * GIB,
                       gpu_headroom_bytes=1 * GIB, group_window=0.0, failed_load_backoff=10.0,
                       ram_tier=tier or RamTierSettings(max_bytes=10 * GIB))
    settings_kw.update(server)
    specs = {k: ModelSpec(key=k, repo_id=None, family="text", path=Path("/nonexistent") / k, device="auto",
                          fallback="none") for k in keys}
    settings = ServerSettings(models=specs, models_dir=Path("/nonexistent"), tmp_dir=Path("/nonexistent/tmp"),
                              log_dir=Path("/nonexistent/logs"), **settings_kw)
    for key, changes in (models or {}).items():
        settings = settings.with_model(key, **changes)
    events: list = []
    probe = probe or Probe()
    loader = Loader(events, handle_class, fail, probe if releasing else None, gates)
    clock = FakeClock()

    def resolve(spec):
        return "cuda:0" if spec.device == "auto" else spec.device
    manager = ModelManager(settings, loader, estimator=lambda spec: SIZE, probe=probe, clock=clock,
                           device_resolver=resolve, release_memory=lambda: None, room_wait=0.2)
    return manager, loader, events, clock, probe


def use(manager, key):
    with manager.lease(key) as handle:
        return handle


def tier(manager, key):
    return manager.snapshot_one(key)["tier"]


def moves(events, kind):
    return [e[1] for e in events if e[0] == kind]


# ------------------------------------------------------------------ demotion

def test_an_evicted_gpu_model_is_parked_in_ram_not_dropped():
    manager, loader, events, clock, probe = make()
    a = use(manager, "a")
    clock.now += 1
    use(manager, "b")                       # max_loaded_models=1: a leaves the GPU
    info = manager.snapshot_one("a")
    assert ("park", "a", True) in events and not a.released
    assert info["state"] == "parked" and info["tier"] == "ram" and not info["loaded"]
    assert info["parked_bytes"] == SIZE and info["placement"] == {} and info["device"] == "cuda:0"
    assert info["demote_count"] == 1 and info["last_demote_reason"] == "count"
    assert tier(manager, "b") == "device" and tier(manager, "c") is None
    assert manager.loaded_bytes() == {"cuda:0": SIZE}            # parked bytes leave the GPU accounting...
    status = manager.ram_tier_status(probe.read())
    assert status["used"] == SIZE and status["models"] == ["a"] and status["budget"] == 10 * GIB  # ...for RAM's


def test_a_memory_budget_eviction_parks_too():
    manager, loader, events, clock, _ = make(max_loaded_models=3, gpu_budget_bytes=9 * GIB)
    use(manager, "a")
    clock.now += 1
    use(manager, "b")
    clock.now += 1
    use(manager, "c")                       # 3 x 4 GiB > 9 GiB on cuda:0: a (LRU) is parked
    assert moves(events, "park") == ["a"] and manager.snapshot_one("a")["last_demote_reason"] == "memory"
    assert {k for k, v in manager.snapshot().items() if v["loaded"]} == {"b", "c"}
    assert manager.loaded_bytes() == {"cuda:0": 8 * GIB}


def test_promotion_makes_room_on_the_gpu_first_and_reuses_the_parked_model():
    manager, loader, events, clock, _ = make()
    a = use(manager, "a")
    clock.now += 1
    use(manager, "b")
    clock.now += 1
    again = use(manager, "a")               # promoted: b leaves the GPU first (parked), then a comes back
    assert again is a and loader.calls == [("a", "cuda:0"), ("b", "cuda:0")]  # no second load of a
    assert events[-2:] == [("park", "b", True), ("unpark", "a", "cuda:0")]
    info = manager.snapshot_one("a")
    assert info["state"] == "loaded" and info["tier"] == "device" and info["placement"] == {"cuda:0": SIZE}
    assert info["promote_count"] == 1 and info["last_promote_seconds"] is not None and info["parked_bytes"] == 0
    assert info["load_count"] == 1
    assert tier(manager, "b") == "ram"
    assert manager.ram_tier_status(Probe().read())["models"] == ["b"]


def test_ram_budget_too_small_drops_as_before():
    manager, loader, events, clock, _ = make(tier=RamTierSettings(max_bytes=3 * GIB))  # < one model
    a = use(manager, "a")
    clock.now += 1
    use(manager, "b")
    assert a.released and moves(events, "park") == []
    assert manager.snapshot_one("a")["state"] == "unloaded" and manager.snapshot_one("a")["last_unload_reason"] == "count"


def test_free_ram_is_checked_as_well_as_the_budget():
    manager, loader, events, clock, probe = make()
    probe.available = 5 * GIB               # 5 GiB free - 2 GiB headroom < 4 GiB
    a = use(manager, "a")
    use(manager, "b")
    assert a.released and moves(events, "park") == []


def test_parked_models_leave_least_recently_used_first_when_the_tier_is_full():
    manager, loader, events, clock, _ = make(keys=("a", "b", "c", "d"), tier=RamTierSettings(max_bytes=8 * GIB))
    for key in ("a", "b", "c", "d"):        # each load evicts the previous one into RAM (room for two)
        use(manager, key)
        clock.now += 1
    assert moves(events, "park") == ["a", "b", "c"]
    assert loader.handles["a"][0].released and not loader.handles["b"][0].released
    assert manager.snapshot_one("a")["last_unload_reason"] == "ram_tier_full"
    assert {k: tier(manager, k) for k in "abcd"} == {"a": None, "b": "ram", "c": "ram", "d": "device"}
    assert manager.ram_tier_status(Probe().read())["used"] == 8 * GIB


def test_lru_spans_both_tiers_a_model_used_after_the_victim_stays_parked():
    # a leaves the GPU first (a short keep-alive) although b was used before it. When b is evicted
    # later and the tier has room for one model only, a (used more recently than b) keeps its place
    # and b is dropped: one recency order over both tiers, not "the newest demotion wins".
    manager, loader, events, clock, _ = make(keys=("a", "b", "c", "d"), max_loaded_models=2,
                                             tier=RamTierSettings(max_bytes=5 * GIB),
                                             models={"a": {"keep_alive": 10.0}})
    use(manager, "b")
    clock.now += 5
    use(manager, "a")
    clock.now += 15
    assert manager.expire_idle() == ["a"] and tier(manager, "a") == "ram"
    use(manager, "c")                        # GPU: b, c (parked a does not count against the cap)
    use(manager, "d")                        # evicts b, the least recently used of all four
    assert loader.handles["b"][0].released and tier(manager, "b") is None
    assert tier(manager, "a") == "ram" and moves(events, "park") == ["a"]
    # Conversely a parked model used before the victim makes way for it.
    clock.now += 1
    use(manager, "c")                        # d is now the least recently used on the GPU
    clock.now += 1
    use(manager, "b")                        # evicts d, used after parked a: a is dropped, d parked
    assert tier(manager, "d") == "ram" and tier(manager, "a") is None
    assert manager.snapshot_one("a")["last_unload_reason"] == "ram_tier_full"
    assert manager.ram_tier_status(Probe().read())["used"] == SIZE


def test_a_promotion_counts_against_the_tier_until_it_succeeds():
    # b is promoted while c is leased and something else holds most of the GPU: the count cap evicts
    # a for it, then the GPU is still short and the promotion fails (no CPU fallback), so b stays
    # parked. Had a parked against b's bytes (b "leaving" the tier), the tier would now hold a and b:
    # 8 GiB in a 5 GiB budget. Counted until the promotion succeeds, a is dropped instead.
    manager, loader, events, clock, probe = make(max_loaded_models=2, tier=RamTierSettings(max_bytes=5 * GIB))
    use(manager, "b")
    clock.now += 1
    use(manager, "a")
    clock.now += 1
    use(manager, "c")                        # evicts b (LRU) into RAM
    assert tier(manager, "b") == "ram"
    clock.now += 1
    with manager.lease("c"):
        probe.gpu_free = 4 * GIB             # 3 GiB after headroom: not enough for b even once a is gone
        with pytest.raises(InsufficientMemory):
            use(manager, "b")
    assert tier(manager, "b") == "ram" and manager.snapshot_one("b")["state"] == "parked"
    assert loader.handles["a"][0].released and tier(manager, "a") is None
    assert manager.snapshot_one("a")["last_unload_reason"] == "count" and moves(events, "park") == ["b"]
    status = manager.ram_tier_status(probe.read())
    assert status["used"] == SIZE <= status["budget"] and status["models"] == ["b"]


def test_a_cpu_load_in_flight_holds_ram_a_park_cannot_take():
    # c loads on the CPU with 4 GiB reserved that the readings do not show yet (8 GiB free, 2 GiB
    # headroom: 6 GiB, of which c takes 4). a expiring now must not park 4 GiB of pinned RAM on top.
    gate = Gate()
    manager, loader, events, clock, probe = make(max_loaded_models=3, models={"c": {"device": "cpu"}},
                                                 gates={"c": gate})
    probe.available = 8 * GIB
    a = use(manager, "a")
    clock.now += 61                          # idle_timeout 60
    loading = threading.Thread(target=use, args=(manager, "c"))
    loading.start()
    try:
        assert gate.started.wait(10)
        assert manager.snapshot_one("c")["state"] == "loading"
        assert manager.expire_idle() == ["a"]
        assert a.released and moves(events, "park") == [] and tier(manager, "a") is None
    finally:
        gate.open.set()
        loading.join(10)
    assert manager.snapshot_one("c")["state"] == "loaded" and manager.snapshot_one("c")["device"] == "cpu"


# ------------------------------------------------------------------ what is never moved

def test_a_leased_model_is_never_moved():
    manager, loader, events, clock, probe = make()
    with manager.lease("a"):
        with pytest.raises(InsufficientMemory):
            use(manager, "b")               # the only slot is held: b waits, then 503
        clock.now += 3600
        assert manager.expire_idle() == []  # past its keep-alive, but in use
        probe.gpu_free = 0                  # under pressure on its GPU: still not moved
        assert manager.relieve_pressure() == []
        assert manager.pressure_status()["cuda:0"]["held_by"] == ["a"]
    assert moves(events, "park") == [] and tier(manager, "a") == "device"


def test_a_pinned_model_is_never_parked():
    manager, loader, events, clock, _ = make(models={"a": {"pinned": True}}, max_loaded_models=2)
    use(manager, "a")
    clock.now += 3600
    assert manager.expire_idle() == [] and moves(events, "park") == []


@pytest.mark.parametrize("changes", [{"quantization": "4bit"}, {"quantization": "8bit"},
                                     {"max_memory": {"cuda:0": 2 * GIB, "cpu": 8 * GIB}},
                                     {"device": "cpu"},
                                     {"engine": EngineSettings(static_cache=True, compile=True)}])
def test_quantized_split_compiled_and_cpu_models_are_dropped_not_parked(changes):
    manager, loader, events, clock, _ = make(models={"a": changes}, ram_budget_bytes=40 * GIB)
    a = use(manager, "a")
    clock.now += 1
    use(manager, "b")
    assert a.released and moves(events, "park") == [] and tier(manager, "a") is None


def test_a_handle_that_cannot_move_is_dropped():
    manager, loader, events, clock, _ = make(handle_class=PlainHandle)
    a = use(manager, "a")
    use(manager, "b")
    assert a.released and tier(manager, "a") is None


def test_tier_disabled_is_todays_behaviour():
    manager, loader, events, clock, _ = make(tier=RamTierSettings(enabled=False))
    a = use(manager, "a")
    clock.now += 1
    use(manager, "b")
    use(manager, "a")
    assert a.released and moves(events, "park") == [] and loader.calls == [("a", "cuda:0"), ("b", "cuda:0"),
                                                                             ("a", "cuda:0")]
    assert manager.ram_tier_status(Probe().read()) == {"enabled": False, "pin_memory": True, "keep_alive": 1800.0,
                                                       "budget": 0, "used": 0, "models": []}


def test_operator_unloads_drop_for_good():
    manager, loader, events, clock, _ = make(max_loaded_models=2)
    use(manager, "a")
    use(manager, "b")
    assert manager.unload("a") and loader.handles["a"][0].released     # admin: dropped, not parked
    manager.settings = manager.settings.replace(max_loaded_models=1)
    use(manager, "c")                                                   # b parked
    assert tier(manager, "b") == "ram"
    assert manager.unload("b") and loader.handles["b"][0].released      # a parked model unloads too
    use(manager, "a")                                                   # c parked
    assert set(manager.unload_idle(reason="emergency_cleanup")) == {"a", "c"}
    assert all(tier(manager, k) is None for k in "abc") and manager.ram_tier_status(Probe().read())["used"] == 0


# ------------------------------------------------------------------ keep-alive, pressure, failures

def test_idle_expiry_parks_then_the_ram_keep_alive_drops():
    manager, loader, events, clock, _ = make(tier=RamTierSettings(max_bytes=10 * GIB, keep_alive=100))
    use(manager, "a")
    clock.now += 61                          # idle_timeout 60
    assert manager.expire_idle() == ["a"] and tier(manager, "a") == "ram"
    clock.now += 50
    assert manager.expire_idle() == [] and tier(manager, "a") == "ram"
    clock.now += 51
    assert manager.expire_idle() == ["a"] and tier(manager, "a") is None
    assert loader.handles["a"][0].released and manager.snapshot_one("a")["last_unload_reason"] == "ram_tier_idle"


def test_keep_alive_zero_drops_instead_of_parking():
    manager, loader, events, clock, _ = make(models={"a": {"keep_alive": 0.0}})
    a = use(manager, "a")
    assert a.released and moves(events, "park") == []


def test_gpu_pressure_parks_and_ram_pressure_drops_parked_models_first():
    manager, loader, events, clock, probe = make(max_loaded_models=3, pressure_margin_bytes=0, releasing=True,
                                                 models={"c": {"device": "cpu"}})
    use(manager, "a")
    clock.now += 1
    use(manager, "b")
    clock.now += 1
    use(manager, "c")
    probe.gpu_free = 0                       # something else took the GPU
    assert manager.relieve_pressure() == ["a"]  # parked: 4 GiB back on the GPU is enough
    assert tier(manager, "a") == "ram" and tier(manager, "b") == "device"
    probe.gpu_free, probe.available = 70 * GIB, 1 * GIB  # now RAM is short (headroom 2 GiB)
    assert manager.relieve_pressure() == ["a"]  # the parked model goes first; the CPU model c serves on
    assert loader.handles["a"][0].released and manager.snapshot_one("a")["last_unload_reason"] == "memory_pressure"
    assert tier(manager, "c") == "device"


def test_a_failed_park_unloads_and_a_failed_promotion_loads_from_disk():
    manager, loader, events, clock, _ = make(fail={"a": "park"})
    a = use(manager, "a")
    use(manager, "b")
    assert a.released and tier(manager, "a") is None
    manager, loader, events, clock, _ = make(fail={"a": "unpark"})
    a = use(manager, "a")
    clock.now += 1
    use(manager, "b")
    assert tier(manager, "a") == "ram"
    again = use(manager, "a")                # the move back fails: dropped, loaded again
    assert again is not a and a.released and loader.calls[-1] == ("a", "cuda:0")
    assert manager.snapshot_one("a")["load_count"] == 2 and tier(manager, "a") == "device"


def test_no_room_on_the_gpu_keeps_it_parked_or_falls_back_to_the_cpu():
    manager, loader, events, clock, _ = make()
    use(manager, "a")
    use(manager, "b")
    with manager.lease("b"):                 # the GPU slot is held: a cannot come back now
        with pytest.raises(InsufficientMemory):
            use(manager, "a")
        assert tier(manager, "a") == "ram" and manager.snapshot_one("a")["state"] == "parked"
    assert use(manager, "a") is loader.handles["a"][0]  # and comes back once b is idle
    fallback, loader2, _, clock2, probe2 = make(models={"a": {"fallback": "cpu"}}, max_loaded_models=2,
                                                gpu_budget_bytes=5 * GIB)
    use(fallback, "a")
    clock2.now += 1
    use(fallback, "b")                       # 4 + 4 > 5 GiB: a parked
    with fallback.lease("b"):
        use(fallback, "a")                   # the GPU is held: dropped from RAM, loaded on the CPU
    info = fallback.snapshot_one("a")
    assert info["device"] == "cpu" and info["tier"] == "device" and loader2.handles["a"][0].released


def test_reconfigure_turning_the_tier_off_drops_parked_models():
    manager, loader, events, clock, _ = make()
    use(manager, "a")
    use(manager, "b")
    assert tier(manager, "a") == "ram"
    manager.reconfigure(manager.settings.replace(ram_tier=RamTierSettings(enabled=False)))
    assert loader.handles["a"][0].released and tier(manager, "a") is None


def test_metrics_count_demotions_and_promotions():
    from utils.ops.metrics import Metrics

    metrics = Metrics()
    manager, loader, events, clock, probe = make()
    manager._events = metrics
    metrics.watch(manager=manager, probe=probe)
    use(manager, "a")
    use(manager, "b")
    use(manager, "a")
    metrics.render()
    value = metrics.registry.get_sample_value
    assert value("model_server_model_demotions_total", {"model": "a", "reason": "count"}) == 1
    assert value("model_server_model_demotions_total", {"model": "b", "reason": "count"}) == 1
    assert value("model_server_model_promotions_total", {"model": "a"}) == 1
    assert value("model_server_model_promotion_seconds_count", {"model": "a"}) == 1
    assert value("model_server_model_tier", {"model": "b", "tier": "ram"}) == 1
    assert value("model_server_model_tier", {"model": "a", "tier": "device"}) == 1
    assert value("model_server_model_state", {"model": "b", "state": "parked"}) == 1
    assert value("model_server_ram_tier_bytes") == SIZE and value("model_server_ram_tier_budget_bytes") == 10 * GIB


# ------------------------------------------------------------------ races

def test_a_promotion_racing_the_sweeper_and_a_load_that_wants_room():
    """a is promoted by a lease while the sweeper expires idle and parked models, a pressure check
    runs and a load of c wants a's slot: first while b is being parked to make room for a (before a's
    reservation), then with a's move back half done. Nothing moves a twice, nothing moves it while it
    is promoting or leased, and the accounting adds up at the end."""
    gate, parking = Gate(), Gate()

    class GatedHandle(Handle):
        def park(self, *, pin_memory: bool) -> None:
            if self.key == "b":
                parking.pass_through()
            super().park(pin_memory=pin_memory)

        def unpark(self, device: str) -> None:
            gate.pass_through()
            super().unpark(device)

    manager, loader, events, clock, probe = make(handle_class=GatedHandle)  # one GPU slot
    use(manager, "a")
    clock.now += 1
    use(manager, "b")                        # a parked
    leased, done, results = threading.Event(), threading.Event(), {}

    def promote():
        with manager.lease("a") as handle:
            results["a"] = handle
            leased.set()
            done.wait(10)

    def load_c():
        try:
            use(manager, "c")
            results["c"] = "loaded"
        except InsufficientMemory:
            results["c"] = "busy"

    promoting, loading = threading.Thread(target=promote), threading.Thread(target=load_c)
    promoting.start()
    try:
        assert parking.started.wait(10)      # b leaving the GPU for a; a not reserved there yet
        assert manager.snapshot_one("a")["state"] == "loading"
        clock.now += 3600                    # past every keep-alive, the RAM tier's too
        assert manager.expire_idle() == []   # promoting a and parking b are both left alone
        parking.open.set()
        assert gate.started.wait(10)         # b parked for a, a's move back under way
        assert manager.snapshot_one("a")["state"] == "loading" and tier(manager, "b") == "ram"
        clock.now += 3600
        loading.start()                      # wants a's slot: a is promoting, so it waits
        assert manager.expire_idle() == ["b"]  # parked b expires; promoting a is not touched
        probe.gpu_free = 0
        assert manager.relieve_pressure() == []
        time.sleep(0.05)
        gate.open.set()
        assert leased.wait(10)
        clock.now += 3600
        assert manager.expire_idle() == [] and manager.relieve_pressure() == []  # leased: stays
        loading.join(10)
        assert results["c"] == "busy"        # the only slot stayed leased
    finally:
        parking.open.set()
        gate.open.set()
        done.set()
        promoting.join(10)
        loading.join(10)
    a = loader.handles["a"][0]
    assert results["a"] is a and not a.released and a.device == "cuda:0"
    assert moves(events, "park") == ["a", "b"] and moves(events, "unpark") == ["a"]
    assert moves(events, "release") == ["b"] and ("c", "cuda:0") not in loader.calls
    info = manager.snapshot_one("a")
    assert info["state"] == "loaded" and info["in_flight"] == 0 and info["promote_count"] == 1
    assert info["parked_bytes"] == 0 and info["placement"] == {"cuda:0": SIZE}
    assert manager.snapshot_one("b")["last_unload_reason"] == "ram_tier_idle"
    assert manager.loaded_bytes() == {"cuda:0": SIZE}
    assert manager.ram_tier_status(probe.read())["used"] == 0


def test_concurrent_leases_and_sweeps_keep_the_tier_consistent():
    """Threads lease four models through two GPU slots and a two-model tier while a sweeper expires
    them: a leased model is always on its GPU, no handle is moved twice the same way or after its
    release, and at the end each model has one live handle exactly when it is loaded or parked."""
    problems: list[str] = []

    class CheckedHandle(Handle):
        def park(self, *, pin_memory: bool) -> None:
            if self.device == "cpu" or self.released:
                problems.append(f"park of {self.key} on {self.device}, released={self.released}")
            super().park(pin_memory=pin_memory)

        def unpark(self, device: str) -> None:
            if self.device != "cpu" or self.released:
                problems.append(f"unpark of {self.key} on {self.device}, released={self.released}")
            super().unpark(device)

        def release(self) -> None:
            if self.released:
                problems.append(f"{self.key} released twice")
            super().release()

    manager, loader, events, clock, probe = make(keys=("a", "b", "c", "d"), handle_class=CheckedHandle,
                                                 max_loaded_models=2, tier=RamTierSettings(max_bytes=8 * GIB))
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(40):
            try:
                with manager.lease(rng.choice("abcd")) as handle:
                    if handle.device != "cuda:0" or handle.released:
                        problems.append(f"leased {handle.key} on {handle.device}, released={handle.released}")
                    time.sleep(0.001)
            except InsufficientMemory:
                pass                         # both slots leased past room_wait: a 503, not a fault

    def sweeper() -> None:
        while not stop.is_set():
            clock.now += 40                  # idle models expire (60 s), parked ones later (1800 s)
            manager.expire_idle()
            time.sleep(0.002)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(3)]
    sweeping = threading.Thread(target=sweeper)
    sweeping.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    stop.set()
    sweeping.join(10)
    assert problems == []
    snapshot = manager.snapshot()
    assert all(info["state"] in ("loaded", "parked", "unloaded") and info["in_flight"] == 0
               for info in snapshot.values())
    for key, info in snapshot.items():
        live = [h for h in loader.handles.get(key, []) if not h.released]
        assert len(live) == (1 if info["state"] in ("loaded", "parked") else 0), key
        if live:
            assert live[0].device == ("cpu" if info["state"] == "parked" else "cuda:0"), key
    loaded = [k for k, v in snapshot.items() if v["state"] == "loaded"]
    parked = [k for k, v in snapshot.items() if v["state"] == "parked"]
    assert len(loaded) <= 2 and manager.loaded_bytes() == ({"cuda:0": SIZE * len(loaded)} if loaded else {})
    status = manager.ram_tier_status(probe.read())
    assert status["models"] == sorted(parked) and status["used"] == SIZE * len(parked) <= status["budget"]


# ------------------------------------------------------------------ a real model on the CPU

def test_a_real_model_parks_and_comes_back_with_the_same_greedy_answer(tmp_path):
    """On the CPU the move is trivial (cpu -> cpu, nothing to pin); what this proves is that park()
    drains and stops the engine, unpark() starts a new one, and the model still answers the same."""
    from utils.hub.demo_models import build_demo_models
    from utils.engine import make_loader
    from utils.families import GenerationParams, GenerationRequest, load_family
    from utils.config.settings import load_settings

    build_demo_models(tmp_path / "models" / "demo", ["deepseek"])
    settings = load_settings(env={"MODELS_DIR": str(tmp_path / "models"), "TMP_DIR": str(tmp_path / "tmp"),
                                  "LOG_DIR": str(tmp_path / "logs"), "DEMO_MODE": "1"})
    served = make_loader(load_family)(settings.models["deepseek"], "cpu")
    params = GenerationParams(max_new_tokens=8, temperature=1.0, top_p=1.0, do_sample=False)

    def answer():
        prepared = served.adapter.prepare(GenerationRequest(prompt="Tell me about the sea"))
        return served.engine.run(served.engine.submit(prepared, params)).text

    try:
        before, first_engine = answer(), served.engine
        served.park(pin_memory=True)
        assert not first_engine._thread.is_alive()           # drained and stopped before the move
        assert set(served.memory_placement()) == {"cpu"}
        served.unpark("cpu")
        assert served.engine is not first_engine and served.engine._thread.is_alive()
        assert answer() == before and served.adapter.device == "cpu"
    finally:
        served.release()
