"""Policy of the model manager (LRU, leases, budgets, expiry, failures) with simple stand-ins.

The loader here is a stand-in object, not a model: these tests check bookkeeping fast. Everything
that claims to serve runs the real families on the tiny checkpoints (test_serving*.py).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from utils.errors import InsufficientMemory, ModelBusy, ModelUnavailable, UnknownModel
from utils.serving.memory import MemoryReading
from utils.serving.manager import ModelManager
from utils.serving.grouping import Arrivals, InFlight, spare_reason
from utils.config.settings import ModelSpec, ServerSettings

from tests.conftest import wait_for

GIB = 2**30


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeProbe:
    def __init__(self, available: int = 64 * GIB) -> None:
        self.available = available

    def read(self) -> MemoryReading:
        return MemoryReading(ram_total=64 * GIB, ram_available=self.available, ram_percent=0.0, process_rss=0)


class Handle:
    def __init__(self, key: str, size: int) -> None:
        self.key, self.size, self.released = key, size, False

    def memory_bytes(self) -> int:
        return self.size

    def release(self) -> None:
        self.released = True


class RecordingLoader:
    def __init__(self, size: int = 100, delay: float = 0.0, fail: set[str] | None = None) -> None:
        self.size, self.delay, self.fail = size, delay, set(fail or ())
        self.calls: list[str] = []
        self.handles: dict[str, list[Handle]] = {}
        self._lock = threading.Lock()

    def __call__(self, spec: ModelSpec, device: str) -> Handle:
        with self._lock:
            self.calls.append(spec.key)
        if self.delay:
            time.sleep(self.delay)
        if spec.key in self.fail:
            raise OSError(f"corrupt weights in {spec.key}")
        handle = Handle(spec.key, self.size)
        self.handles.setdefault(spec.key, []).append(handle)
        return handle


def make_settings(keys=("a", "b", "c"), **server) -> ServerSettings:
    models = {k: ModelSpec(key=k, repo_id=f"org/{k}", family="text", path=Path("/nonexistent") / k, device="cpu")
              for k in keys}
    base = dict(models=models, models_dir=Path("/nonexistent"), tmp_dir=Path("/nonexistent/tmp"),
                log_dir=Path("/nonexistent/logs"), max_loaded_models=2, idle_timeout=60.0,
                ram_headroom_bytes=0, failed_load_backoff=10.0, group_window=0.0)
    base.update(server)
    return ServerSettings(**base)


def make_manager(settings=None, loader=None, estimate=100, probe=None, clock=None, room_wait=0.5):
    clock = clock or FakeClock()
    manager = ModelManager(settings or make_settings(), loader or RecordingLoader(), estimator=lambda s: estimate,
                           probe=probe or FakeProbe(), clock=clock, release_memory=lambda: None,
                           room_wait=room_wait)
    return manager, clock


def use(manager, key, **kw):
    with manager.lease(key, **kw) as handle:
        return handle


def loaded(manager) -> set[str]:
    return {k for k, v in manager.snapshot().items() if v["loaded"]}


def test_concurrent_first_requests_load_once():
    loader = RecordingLoader(delay=0.3)
    manager, _ = make_manager(loader=loader)
    results, barrier = [], threading.Barrier(16)

    def request():
        barrier.wait()
        results.append(use(manager, "a"))

    threads = [threading.Thread(target=request) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loader.calls == ["a"]
    assert len(results) == 16 and all(r is results[0] for r in results)
    assert manager.snapshot_one("a")["load_count"] == 1


def test_lru_eviction_at_count_cap():
    loader = RecordingLoader()
    manager, clock = make_manager(loader=loader)
    use(manager, "a")
    clock.now += 1
    use(manager, "b")
    clock.now += 1
    use(manager, "a")            # a is now the most recently used
    clock.now += 1
    use(manager, "c")            # evicts b, the least recently used
    assert loaded(manager) == {"a", "c"}
    assert loader.handles["b"][0].released
    assert manager.snapshot_one("b")["last_unload_reason"] == "count"


def test_leased_model_is_never_evicted():
    manager, _ = make_manager(settings=make_settings(max_loaded_models=1), room_wait=0.3)
    with manager.lease("a"):
        with pytest.raises(InsufficientMemory) as info:
            use(manager, "b")
        assert loaded(manager) == {"a"}
        assert info.value.status == 503 and "Retry-After" in info.value.headers
    use(manager, "b")  # a is idle now, so it can make room
    assert loaded(manager) == {"b"}


def test_load_waits_for_a_lease_to_end():
    manager, _ = make_manager(settings=make_settings(max_loaded_models=1), room_wait=5)
    release = threading.Event()

    def hold():
        with manager.lease("a"):
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.1)
    threading.Timer(0.3, release.set).start()
    started = time.monotonic()
    use(manager, "b")
    holder.join()
    assert time.monotonic() - started >= 0.25
    assert loaded(manager) == {"b"}


def test_slow_load_does_not_stall_loaded_models():
    class SlowB(RecordingLoader):
        def __call__(self, spec, device):
            if spec.key == "b":
                time.sleep(1.0)
            return super().__call__(spec, device)

    manager, _ = make_manager(loader=SlowB())
    use(manager, "a")
    loading = threading.Thread(target=use, args=(manager, "b"))
    loading.start()
    time.sleep(0.1)
    assert manager.snapshot_one("b")["state"] == "loading"
    started = time.monotonic()
    for _ in range(20):
        use(manager, "a")
    assert time.monotonic() - started < 0.5
    loading.join()


def test_memory_budget_evicts_lru_before_loading():
    settings = make_settings(max_loaded_models=3, ram_budget_bytes=250)
    manager, clock = make_manager(settings=settings, estimate=100)
    use(manager, "a")
    clock.now += 1
    use(manager, "b")
    clock.now += 1
    use(manager, "c")  # 3 x 100 > 250: a goes first
    assert loaded(manager) == {"b", "c"}
    assert manager.snapshot_one("a")["last_unload_reason"] == "memory"


def test_model_larger_than_budget_is_refused_and_others_keep_serving():
    settings = make_settings(ram_budget_bytes=50)
    manager, _ = make_manager(settings=settings, estimate=100)
    with pytest.raises(InsufficientMemory) as info:
        use(manager, "a")
    assert "needs" in info.value.details and info.value.status == 503
    assert manager.snapshot_one("a")["state"] == "unloaded"


def test_physical_memory_shortage_evicts_idle_model():
    probe = FakeProbe(available=150)
    settings = make_settings(max_loaded_models=3)
    loader = RecordingLoader()
    manager, _ = make_manager(settings=settings, loader=loader, probe=probe, estimate=100)
    use(manager, "a")
    probe.available = 50  # the OS now has less than the next model needs

    original_release = Handle.release

    def release_and_free(self):
        original_release(self)
        probe.available += 100
    Handle.release = release_and_free
    try:
        use(manager, "b")
    finally:
        Handle.release = original_release
    assert loaded(manager) == {"b"}


def test_idle_expiry_and_per_request_keep_alive():
    manager, clock = make_manager(settings=make_settings(max_loaded_models=3, idle_timeout=60))
    use(manager, "a")
    use(manager, "b", keep_alive=-1)
    use(manager, "c", keep_alive=5)
    clock.now += 10
    assert manager.expire_idle() == ["c"]
    clock.now += 60
    assert manager.expire_idle() == ["a"]
    clock.now += 10_000
    assert manager.expire_idle() == []
    assert loaded(manager) == {"b"}


def test_keep_alive_zero_unloads_after_the_request():
    manager, _ = make_manager()
    use(manager, "a", keep_alive=0)
    assert loaded(manager) == set()
    assert manager.snapshot_one("a")["last_unload_reason"] == "keep_alive=0"


def test_pinned_model_is_never_evicted_or_expired():
    settings = make_settings(max_loaded_models=1)
    settings = settings.with_model("a", pinned=True)
    manager, clock = make_manager(settings=settings, room_wait=0.2)
    use(manager, "a")
    clock.now += 10_000
    assert manager.expire_idle() == []
    with pytest.raises(InsufficientMemory):
        use(manager, "b")
    assert loaded(manager) == {"a"}


def test_failed_load_is_contained_and_backs_off():
    loader = RecordingLoader(fail={"b"})
    manager, clock = make_manager(loader=loader)
    use(manager, "a")
    with pytest.raises(ModelUnavailable) as first:
        use(manager, "b")
    assert first.value.headers["Retry-After"] == "10"
    assert "corrupt weights" in first.value.details
    with pytest.raises(ModelUnavailable):
        use(manager, "b")
    assert loader.calls.count("b") == 1          # not reloaded during the backoff
    clock.now += 11
    with pytest.raises(ModelUnavailable) as second:
        use(manager, "b")
    assert second.value.headers["Retry-After"] == "20"  # doubled
    assert loader.calls.count("b") == 2
    assert use(manager, "a") is not None         # the other model kept serving
    status = manager.snapshot_one("b")
    assert status["state"] == "error" and status["failures"] == 2


def test_admin_unload_waits_for_leases_or_refuses():
    manager, _ = make_manager()
    use(manager, "a")
    with manager.lease("a"):
        with pytest.raises(ModelBusy):
            manager.unload("a", wait=0.1)
        assert loaded(manager) == {"a"}
    assert manager.unload("a") is True
    assert manager.unload("a") is False


def test_unload_idle_leaves_models_in_use():
    manager, _ = make_manager()
    use(manager, "a")
    with manager.lease("b"):
        assert manager.unload_idle() == ["a"]
        assert loaded(manager) == {"b"}


def test_unknown_model():
    manager, _ = make_manager()
    with pytest.raises(UnknownModel) as info:
        use(manager, "nope")
    assert info.value.status == 404


def test_snapshot_is_a_copy():
    manager, _ = make_manager()
    use(manager, "a")
    snap = manager.snapshot()
    snap["a"]["state"] = "mangled"
    assert manager.snapshot()["a"]["state"] == "loaded"


def test_two_cold_loads_at_cap_one_do_not_block_each_other():
    loader = RecordingLoader(delay=0.3)
    manager, _ = make_manager(settings=make_settings(max_loaded_models=1), loader=loader, room_wait=5)
    results = {}

    def request(key):
        try:
            use(manager, key)
            results[key] = "ok"
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            results[key] = repr(exc)

    threads = [threading.Thread(target=request, args=(k,)) for k in ("a", "b")]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"a": "ok", "b": "ok"}
    assert time.monotonic() - started < 3  # nobody waited out room_wait on a mere reservation


def test_concurrent_loads_reserve_physical_memory():
    probe = FakeProbe(available=1000)
    loader = RecordingLoader(delay=0.3)
    manager, _ = make_manager(settings=make_settings(max_loaded_models=3), loader=loader, probe=probe,
                              estimate=800, room_wait=0.2)
    outcomes = []

    def request(key):
        try:
            use(manager, key)
            outcomes.append("ok")
        except InsufficientMemory:
            outcomes.append("503")

    threads = [threading.Thread(target=request, args=(k,)) for k in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 1  # 1000 bytes free hold one 800-byte model, not three


@pytest.mark.parametrize("failure", ["loader_interrupt", "probe_error"])
def test_nothing_stays_loading_after_an_unexpected_failure(failure):
    class InterruptingLoader(RecordingLoader):
        def __call__(self, spec, device):
            raise KeyboardInterrupt

    class BrokenProbe(FakeProbe):
        def read(self):
            raise RuntimeError("CUDA error: device lost")

    loader = InterruptingLoader() if failure == "loader_interrupt" else RecordingLoader()
    probe = BrokenProbe() if failure == "probe_error" else FakeProbe()
    manager, _ = make_manager(loader=loader, probe=probe)
    with pytest.raises((KeyboardInterrupt, ModelUnavailable)):
        use(manager, "a")
    info = manager.snapshot_one("a")
    assert info["state"] == "unloaded" and manager.loaded_bytes() == {}


class ClockedLoader(RecordingLoader):
    """A loader whose load takes `cost` seconds of the manager's (fake) clock: the reload cost grouping
    weighs against a model's arrival gaps, without sleeping."""

    def __init__(self, clock: FakeClock, cost: float, costs: dict[str, float] | None = None) -> None:
        super().__init__()
        self.clock, self.cost, self.costs = clock, cost, costs or {}

    def __call__(self, spec: ModelSpec, device: str) -> Handle:
        self.clock.now += self.costs.get(spec.key, self.cost)
        return super().__call__(spec, device)


def grouping_manager(max_loaded_models=1, cost=5.0, costs=None, keys=("a", "b", "c"), **server):
    clock = FakeClock()
    settings = make_settings(keys, max_loaded_models=max_loaded_models,
                             **{"group_window": None, "max_pass_over": 2.0, **server})
    manager, _ = make_manager(settings, loader=ClockedLoader(clock, cost, costs), clock=clock, room_wait=30)
    return manager, clock


def test_one_client_switching_models_never_waits_for_the_model_it_left():
    """A, A, B, A, B from one client with one slot: nothing but its own request is in flight when it
    switches, so every switch evicts at once (the old automatic window held B for A's whole load time)."""
    manager, clock = grouping_manager(cost=5.0)   # each load: 5 s of the manager's clock
    for key in "aabab":
        clock.now += 0.1                          # the client reads the answer, then asks again
        use(manager, key)
    status = manager.snapshot()
    assert status["a"]["load_count"] == 2 and status["b"]["load_count"] == 2
    assert status["a"]["last_unload_reason"] == "count"
    assert [status[k]["grouping_waits"] for k in "ab"] == [0, 0]   # a wait would show (max_pass_over: 2 s)


def test_requests_for_a_model_in_demand_go_first_while_others_are_served(caplog):
    """A B A A C is served A A A B C: while a was asked less than a reload ago and requests are being
    served (on c), b's load waits and a keeps serving without a reload."""
    manager, clock = grouping_manager(max_loaded_models=2, cost=5.0, costs={"c": 0.01})
    for _ in range(3):                            # a in demand: a request every 0.1 s, a reload costs 5 s
        use(manager, "a")
        clock.now += 0.1
    done = threading.Event()
    with caplog.at_level("INFO", logger="model_server.manager"):
        with manager.lease("c"):                  # a request being served: its client may ask for a next
            threading.Thread(target=lambda: (use(manager, "b"), done.set()), daemon=True).start()
            assert wait_for(lambda: "b waits for room: a is spared" in caplog.text)
            assert use(manager, "a").key == "a" and not done.is_set()   # served before b, no reload
        clock.now += 5                            # a reload of a later, nobody asked again...
        assert done.wait(1.5)                     # ...b loads (before max_pass_over: 2 s)...
    info = manager.snapshot()                     # ...in the room of c, now used less recently than a
    assert loaded(manager) == {"a", "b"} and info["c"]["last_unload_reason"] == "count"
    assert info["a"]["load_count"] == 1
    assert info["b"]["grouping_waits"] == 1 and info["b"]["last_grouping_wait"]["spared"] == "a"
    assert "(3 request(s) since it loaded" in info["b"]["last_grouping_wait"]["reason"]


def test_a_spared_model_goes_once_its_requests_stop():
    manager, clock = grouping_manager(max_loaded_models=2, cost=5.0, costs={"c": 0.01})
    for _ in range(3):
        use(manager, "a")
        clock.now += 0.1
    done = threading.Event()
    with manager.lease("c"):
        threading.Thread(target=lambda: (use(manager, "b"), done.set()), daemon=True).start()
        assert not done.wait(0.2)
        clock.now += 5                            # no request for a for a whole reload
        assert done.wait(1.5)
    assert loaded(manager) == {"b", "c"}


def test_a_newer_model_not_worth_waiting_for_goes_before_an_older_one_in_demand():
    manager, clock = grouping_manager(keys=("a", "b", "c", "d"), max_loaded_models=3, cost=5.0,
                                      costs={"c": 0.01, "d": 0.01})
    for _ in range(3):
        use(manager, "a")
        clock.now += 0.1
    use(manager, "c")                             # more recent than a, but it reloads in 0.01 s...
    clock.now += 0.05                             # ...and was asked longer ago than that
    with manager.lease("d"):
        use(manager, "b")                         # needs a slot: c goes, a (least recently used) stays
    assert loaded(manager) == {"a", "b", "d"} and manager.snapshot_one("c")["last_unload_reason"] == "count"
    assert manager.snapshot_one("b")["grouping_waits"] == 0


def test_a_model_silent_for_longer_than_its_reload_is_not_spared():
    manager, clock = grouping_manager(max_loaded_models=2, cost=0.05, costs={"c": 0.0})  # cheaper to reload
    for _ in range(3):
        use(manager, "a")
        clock.now += 0.1
    with manager.lease("c"):
        use(manager, "b")
    assert loaded(manager) == {"b", "c"} and manager.snapshot_one("b")["grouping_waits"] == 0


@pytest.mark.parametrize("gaps, silence, could_ask, spared", [
    ([], 0.05, 1, True),               # asked just now (a 1 s reload), a client may ask again
    ([0.1, 0.1], 0.05, 1, True),
    ([0.1, 0.1], 0.05, 0, False),      # ...but nothing is being served: nobody left to ask for it
    ([0.1, 0.1], 1.5, 1, False),       # ...that stopped a reload ago
    ([2.0, 2.0], 0.1, 1, True),        # slower than a reload, but the last came just now
])
def test_demand_rule(gaps, silence, could_ask, spared):
    arrivals, now = Arrivals(), 100.0
    arrivals.record(now)
    for gap in gaps:
        now += gap
        arrivals.record(now)
    assert (spare_reason(arrivals, now, 1.0, now + silence, None, could_ask) is not None) == spared


def test_clients_between_two_requests_count_within_the_window():
    flight = InFlight()
    for at, delta in ((0.0, +1), (0.0, +1), (0.1, +1), (0.2, -1), (0.2, -1)):   # 3 in, 2 answered
        flight.change(at, delta)
    assert flight.count == 1
    assert flight.away(0.25, window=1.0) == 2     # two clients on their way back
    assert flight.away(5.0, window=1.0) == 0      # a reload later: they are not coming


def test_gaps_across_the_models_absence_are_not_measured():
    arrivals = Arrivals()
    for now in (0.0, 0.1, 0.2):
        arrivals.record(now)
    arrivals.left()                               # unloaded: the next request reloads it
    arrivals.record(5.0)
    assert arrivals.gap == pytest.approx(0.1) and arrivals.in_stay == 1
    assert "(1 request(s) since it loaded);" in spare_reason(arrivals, 5.0, 1.0, 5.05, None, could_ask=1)


def test_group_window_overrides_demand_with_a_fixed_window(caplog):
    """GROUP_WINDOW=5: a model that served within 5 s is spared even with no request coming."""
    manager, clock = make_manager(make_settings(max_loaded_models=1, group_window=5.0, max_pass_over=30.0),
                                  room_wait=30)
    use(manager, "a")
    done = threading.Event()
    with caplog.at_level("INFO", logger="model_server.manager"):
        threading.Thread(target=lambda: (use(manager, "b"), done.set()), daemon=True).start()
        assert wait_for(lambda: "within GROUP_WINDOW=5s" in caplog.text)
        assert use(manager, "a").key == "a" and not done.is_set()   # requests to the resident model go first
        clock.now += 6                             # a has been idle longer than the window
        assert done.wait(5)
    assert loaded(manager) == {"b"} and manager.snapshot_one("a")["last_unload_reason"] == "count"
    assert manager.snapshot_one("b")["grouping_waits"] == 1


def test_grouping_never_passes_a_load_over_for_longer_than_max_pass_over():
    manager, _ = make_manager(make_settings(max_loaded_models=1, group_window=1000.0, max_pass_over=0.3),
                              room_wait=30)
    use(manager, "a")
    started = time.monotonic()
    use(manager, "b")
    assert 0.25 <= time.monotonic() - started < 5 and loaded(manager) == {"b"}


# ------------------------------------------------------------------ memory pressure from outside

class GpuProbe(FakeProbe):
    """RAM plus one GPU whose free memory the test sets."""

    def __init__(self, available: int = 64 * GIB, gpu_free: int = 80 * GIB) -> None:
        super().__init__(available)
        self.gpu_free = gpu_free

    def read(self) -> MemoryReading:
        from utils.serving.memory import GpuReading
        reading = super().read()
        gpu = GpuReading(index=0, name="fake", total=80 * GIB, free=self.gpu_free, allocated=0, reserved=0)
        return MemoryReading(ram_total=reading.ram_total, ram_available=reading.ram_available, ram_percent=0.0,
                             process_rss=0, gpus=(gpu,))


class ReleasingLoader(RecordingLoader):
    """Each unload gives `size` bytes back to the probe, as a real unload gives them back to the OS."""

    def __init__(self, probe, size: int) -> None:
        super().__init__(size=size)
        self.probe = probe

    def __call__(self, spec, device):
        handle = super().__call__(spec, device)
        probe, size, on_gpu = self.probe, self.size, device.startswith("cuda")
        original = handle.release

        def release():
            original()
            if on_gpu:
                probe.gpu_free += size
            else:
                probe.available += size
        handle.release = release
        return handle


def pressure_manager(keys=("a", "b", "c", "d"), devices=None, **server):
    probe = GpuProbe()
    settings = make_settings(keys=keys, max_loaded_models=4, ram_headroom_bytes=4 * GIB,
                             gpu_headroom_bytes=2 * GIB, pressure_margin_bytes=1 * GIB, **server)
    devices = devices or {}
    for key, device in devices.items():
        settings = settings.with_model(key, device=device)
    loader = ReleasingLoader(probe, size=2 * GIB)
    manager, clock = make_manager(settings, loader=loader, probe=probe)
    return manager, clock, probe


def test_pressure_releases_idle_models_lru_first_and_stops_at_headroom_plus_margin():
    manager, clock, probe = pressure_manager()
    for key in ("a", "b", "c", "d"):
        use(manager, key)
        clock.now += 1
    assert manager.relieve_pressure() == []                       # plenty free: nothing happens
    probe.available = 1 * GIB                                     # something else took the memory
    released = manager.relieve_pressure()
    assert released == ["a", "b"]                                 # 1 + 2 x 2 GiB = headroom 4 + margin 1: enough
    assert loaded(manager) == {"c", "d"}
    assert manager.snapshot_one("a")["last_unload_reason"] == "memory_pressure"
    status = manager.pressure_status()["cpu"]
    assert status["events"] == 1 and status["active"] and status["released"] == ["a", "b"]
    assert use(manager, "a").key == "a"                           # loads again, no back-off
    assert manager.snapshot_one("a")["failures"] == 0


def test_pressure_never_releases_leased_or_pinned_models_and_names_them():
    manager, clock, probe = pressure_manager(keys=("a", "b", "c"))
    settings = manager.settings.with_model("b", pinned=True)
    manager.settings = settings
    manager._entries["b"].spec = settings.models["b"]
    for key in ("a", "b", "c"):
        use(manager, key)
    probe.available = 1 * GIB
    with manager.lease("a"):
        assert manager.relieve_pressure() == ["c"]
        assert loaded(manager) == {"a", "b"}
        assert set(manager.pressure_status()["cpu"]["held_by"]) == {"a", "b"}


def test_pressure_is_per_device():
    manager, clock, probe = pressure_manager(devices={"a": "cuda:0", "b": "cuda:0"})
    for key in ("a", "b", "c", "d"):
        use(manager, key)
        clock.now += 1
    probe.gpu_free = 1 * GIB                                       # the GPU is short, RAM is fine
    assert manager.relieve_pressure() == ["a"]                    # 1 + 2 GiB >= 2 GiB headroom + 1 GiB margin
    assert loaded(manager) == {"b", "c", "d"}
    assert "cpu" not in manager.pressure_status()
    assert manager.pressure_status()["cuda:0"]["events"] == 1


def test_one_pressure_episode_is_one_event_and_the_setting_turns_it_off():
    manager, clock, probe = pressure_manager(keys=("a",))
    use(manager, "a")
    probe.available = 1 * GIB
    with manager.lease("a"):
        manager.relieve_pressure()
        manager.relieve_pressure()                                 # still the same episode
    assert manager.pressure_status()["cpu"]["events"] == 1
    probe.available = 64 * GIB
    manager.relieve_pressure()
    assert manager.pressure_status()["cpu"]["active"] is False
    off, _, off_probe = pressure_manager(keys=("a",), memory_pressure_release=False)
    use(off, "a")
    off_probe.available = 0
    assert off.relieve_pressure() == [] and loaded(off) == {"a"}


# ------------------------------------------------------------------ small GPUs: CPU fallback, split models

def gpu_manager(estimate, gpu_free, **models):
    """Models on `auto` resolved to cuda:0 (a fake GPU of 80 GiB with `gpu_free` free)."""
    probe = GpuProbe(gpu_free=gpu_free)
    settings = make_settings(keys=tuple(models) or ("a",), max_loaded_models=4, gpu_headroom_bytes=1 * GIB,
                             ram_headroom_bytes=1 * GIB)
    for key, changes in models.items():
        settings = settings.with_model(key, device="auto", **changes)
    loader = RecordingLoader(size=estimate)
    manager = ModelManager(settings, loader, estimator=lambda spec: estimate, probe=probe, clock=FakeClock(),
                           device_resolver=lambda spec: "cuda:0", release_memory=lambda: None, room_wait=0.2)
    return manager, loader, probe


def test_a_model_that_fits_no_gpu_falls_back_to_the_cpu_and_says_why():
    manager, loader, _ = gpu_manager(4 * GIB, gpu_free=2 * GIB, a={})
    use(manager, "a")
    info = manager.snapshot_one("a")
    assert info["device"] == "cpu" and info["placement"] == {"cpu": 4 * GIB}
    assert "cuda:0" in info["fallback"] and "free after headroom" in info["fallback"]


def test_no_fallback_when_the_model_says_none_and_none_when_it_fits():
    manager, _, _ = gpu_manager(4 * GIB, gpu_free=2 * GIB, a={"fallback": "none"})
    with pytest.raises(InsufficientMemory):
        use(manager, "a")
    fits, _, _ = gpu_manager(4 * GIB, gpu_free=40 * GIB, a={})
    use(fits, "a")
    assert fits.snapshot_one("a")["device"] == "cuda:0" and fits.snapshot_one("a")["fallback"] is None


class SplitHandle(Handle):
    def __init__(self, key, placement):
        super().__init__(key, sum(placement.values()))
        self.placement = placement

    def memory_placement(self):
        return dict(self.placement)


def test_a_split_model_counts_each_part_on_its_own_device_and_eviction_frees_the_right_one():
    manager, loader, probe = gpu_manager(3 * GIB, gpu_free=40 * GIB, big={"max_memory": {"cuda:0": GIB, "cpu": 8 * GIB}},
                                         other={})
    manager.settings = manager.settings.replace(gpu_budget_bytes=2 * GIB)
    loader_calls = []

    def load(spec, device):
        loader_calls.append((spec.key, device))
        return SplitHandle(spec.key, {"cuda:0": GIB, "cpu": 2 * GIB}) if spec.key == "big" else Handle(spec.key, 3 * GIB)
    manager._loader = load
    use(manager, "big")
    assert manager.snapshot_one("big")["placement"] == {"cuda:0": GIB, "cpu": 2 * GIB}
    assert manager.loaded_bytes() == {"cuda:0": GIB, "cpu": 2 * GIB}
    use(manager, "other")  # 3 GiB on cuda:0 with a 2 GiB budget: does not fit even after evicting big
    assert manager.snapshot_one("other")["device"] == "cpu"        # so it fell back...
    assert manager.snapshot_one("big")["loaded"]                    # ...and big stayed
    manager.settings = manager.settings.replace(gpu_budget_bytes=4 * GIB)
    manager.unload("other")
    use(manager, "other")  # 1 + 3 > 4? no: fits next to big's GPU part
    assert manager.snapshot_one("other")["device"] == "cuda:0" and manager.snapshot_one("big")["loaded"]
    assert loader_calls[0] == ("big", "cuda:0")


def test_a_split_that_cannot_hold_the_model_is_refused_with_the_reason():
    manager, _, _ = gpu_manager(10 * GIB, gpu_free=40 * GIB, a={"max_memory": {"cuda:0": GIB, "cpu": GIB},
                                                                 "fallback": "none"})
    with pytest.raises(InsufficientMemory, match="max_memory allows"):
        use(manager, "a")


def test_an_operator_moves_a_fallen_back_model_to_a_gpu():
    manager, loader, probe = gpu_manager(4 * GIB, gpu_free=2 * GIB, a={})
    use(manager, "a")
    assert manager.snapshot_one("a")["device"] == "cpu"
    probe.gpu_free = 40 * GIB
    info = manager.load("a", device="cuda:0")
    assert info["device"] == "cuda:0" and info["fallback"] is None and info["last_unload_reason"] == "moved"
