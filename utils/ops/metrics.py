"""Prometheus metrics, one registry per app (several apps may live in one process, as in the tests).

No Flask here: app.py feeds `observe_request` from an after_request hook, the model manager calls
`on_load` / `on_unload` (this object is its `events` observer), the inference service calls
`on_result` with every finished generation, and a collector reads the gauges at scrape time from the
manager's snapshot, the memory probe and the temp manager, so they are never stale.

Names (all prefixed `model_server_`):
  http_requests_total{route,method,model,status}       counter
  http_request_duration_seconds{route,model}           histogram (until the response is returned;
                                                        a stream's body is not included)
  prompt_tokens_total{model}, completion_tokens_total{model}   counters (non-streamed generations)
  model_loads_total{model,outcome}                     counter, outcome ok|error
  model_unloads_total{model,reason}                    counter, reason admin|idle|count|memory|
                                                        emergency_cleanup|keep_alive=0|shutdown
  model_load_seconds{model}                            histogram (successful and failed loads)
  model_demotions_total{model,reason}                  counter: GPU models parked in RAM (RAM tier) instead
                                                        of unloaded, reason count|memory|memory_pressure|idle
  model_promotions_total{model}                        counter: parked models moved back to their GPU
  model_promotion_seconds{model}                       histogram: seconds a promotion took (move + engine start)
  memory_pressure_events_total{device}                 counter: times free memory fell below the headroom
                                                        (idle models there are released, reason memory_pressure)
  ram_total_bytes, ram_available_bytes, process_rss_bytes      gauges
  gpu_{total,free,allocated,reserved}_bytes{device}            gauges, one series per GPU
  models_bytes{device}                                 gauge: bytes held by loaded models per device
  model_bytes{model,device}                            gauge: bytes one loaded model holds
  model_loaded{model}                                  gauge 0/1
  model_state{model,state}                             gauge, 1 for the model's current state
  model_tier{model,tier}                               gauge, 1 for the model's tier: device (serving) | ram (parked)
  ram_tier_bytes, ram_tier_budget_bytes                gauges: bytes of parked models, and their budget
  requests_in_flight{model}                            gauge: leases held (the model's queue depth)
  temp_bytes, temp_files, temp_active_scopes           gauges
  out_of_memory_total{model}                           counter: forward passes that ran out of device memory
                                                        (retried in halves, then 503; the model serves on)
  queue_wait_seconds{model}                            histogram: submitted to started, per request
  batch_size{model}                                    histogram: rows per forward pass (continuous
                                                        engines) or per generate call (dynamic)
  engine_queue_depth{model}, engine_running_rows{model}          gauges
  engine_tokens_per_second{model}                      gauge: tokens generated over the last minute
  jobs{state}                                          gauge: asynchronous jobs on record, by state
  jobs_finished_total{model,state}                     counter: jobs that ended (succeeded|failed|cancelled)
  job_queue_seconds{model}, job_run_seconds{model}     histograms: submitted to started, started to ended
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

log = logging.getLogger("model_server.metrics")

PREFIX = "model_server_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf"))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, float("inf"))
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, float("inf"))
JOB_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 14400, float("inf"))
MODEL_STATES = ("unloaded", "waiting_to_load", "loading", "loaded", "unloading", "error", "parking", "parked")
TIERS = ("device", "ram")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(PREFIX + "http_requests", "HTTP requests answered, by route template, method, "
                                "model and status", ["route", "method", "model", "status"], registry=r)
        self.latency = Histogram(PREFIX + "http_request_duration_seconds", "Time to answer a request",
                                 ["route", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished generations",
                                     ["model"], registry=r)
        self.completion_tokens = Counter(PREFIX + "completion_tokens", "Tokens generated", ["model"], registry=r)
        self.loads = Counter(PREFIX + "model_loads", "Model loads, by outcome", ["model", "outcome"], registry=r)
        self.unloads = Counter(PREFIX + "model_unloads", "Model unloads (evictions included), by reason",
                               ["model", "reason"], registry=r)
        self.demotions = Counter(PREFIX + "model_demotions", "GPU models parked in RAM instead of unloaded, by "
                                 "eviction reason", ["model", "reason"], registry=r)
        self.promotions = Counter(PREFIX + "model_promotions", "Parked models moved back to their GPU", ["model"],
                                  registry=r)
        self.promotion_seconds = Histogram(PREFIX + "model_promotion_seconds", "Seconds a promotion from RAM took",
                                           ["model"], buckets=LOAD_BUCKETS, registry=r)
        self.pressure_events = Counter(PREFIX + "memory_pressure_events", "Times free memory on a device fell "
                                       "below its headroom", ["device"], registry=r)
        self.load_seconds = Histogram(PREFIX + "model_load_seconds", "Seconds a model load took", ["model"],
                                      buckets=LOAD_BUCKETS, registry=r)
        self.grouping_wait_seconds = Histogram(PREFIX + "grouping_wait_seconds", "Seconds a load waited for "
                                               "another model that grouping spared (its requests kept arriving)",
                                               ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.oom = Counter(PREFIX + "out_of_memory", "Forward passes that ran out of device memory", ["model"],
                           registry=r)
        self.queue_wait = Histogram(PREFIX + "queue_wait_seconds", "Seconds a request waited in its model's "
                                    "queue before its engine started it", ["model"], buckets=LATENCY_BUCKETS,
                                    registry=r)
        self.batch_size = Histogram(PREFIX + "batch_size", "Rows in one forward pass or generate call", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.jobs_finished = Counter(PREFIX + "jobs_finished", "Asynchronous jobs that ended, by state",
                                     ["model", "state"], registry=r)
        self.job_queue = Histogram(PREFIX + "job_queue_seconds", "Seconds a job waited before it started",
                                   ["model"], buckets=JOB_BUCKETS, registry=r)
        self.job_run = Histogram(PREFIX + "job_run_seconds", "Seconds a job ran", ["model"], buckets=JOB_BUCKETS,
                                 registry=r)
        self._collector: StateCollector | None = None
        self._jobs_collector: JobCollector | None = None

    # ------------------------------------------------------------ feeds

    def watch(self, *, manager: Any, probe: Any, temp: Any = None) -> None:
        """Registers the scrape-time gauges (once)."""
        if self._collector is None:
            self._collector = StateCollector(manager, probe, temp)
            self.registry.register(self._collector)

    def watch_jobs(self, jobs: Any) -> None:
        """Registers the jobs-by-state gauge (once), read from the job store at scrape time."""
        if self._jobs_collector is None:
            self._jobs_collector = JobCollector(jobs)
            self.registry.register(self._jobs_collector)

    # JobRunner events observer
    def on_job_finished(self, key: str, state: str, queue_seconds: float, run_seconds: float | None) -> None:
        """run_seconds None: the job never started (cancelled while queued)."""
        self.jobs_finished.labels(key, state).inc()
        self.job_queue.labels(key).observe(queue_seconds)
        if run_seconds is not None:
            self.job_run.labels(key).observe(run_seconds)

    def observe_request(self, route: str, method: str, model: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, model, str(status)).inc()
        self.latency.labels(route, model).observe(max(0.0, seconds))

    # ModelManager events observer
    def on_load(self, key: str, seconds: float, ok: bool) -> None:
        self.loads.labels(key, "ok" if ok else "error").inc()
        self.load_seconds.labels(key).observe(max(0.0, seconds))

    def on_unload(self, key: str, reason: str) -> None:
        self.unloads.labels(key, reason).inc()

    def on_demote(self, key: str, reason: str) -> None:
        self.demotions.labels(key, reason).inc()

    def on_promote(self, key: str, seconds: float) -> None:
        self.promotions.labels(key).inc()
        self.promotion_seconds.labels(key).observe(max(0.0, seconds))

    def on_grouping_wait(self, key: str, seconds: float) -> None:
        self.grouping_wait_seconds.labels(key).observe(max(0.0, seconds))

    def on_pressure(self, device: str) -> None:
        self.pressure_events.labels(device).inc()

    # Engine observer
    def on_queue_wait(self, key: str, seconds: float) -> None:
        self.queue_wait.labels(key).observe(max(0.0, seconds))

    def on_oom(self, key: str) -> None:
        self.oom.labels(key).inc()

    def on_batch(self, key: str, rows: int) -> None:
        self.batch_size.labels(key).observe(rows)

    # InferenceService on_result hook
    def on_result(self, key: str, result: Any) -> None:
        self.prompt_tokens.labels(key).inc(max(0, int(getattr(result, "prompt_tokens", 0) or 0)))
        self.completion_tokens.labels(key).inc(max(0, int(getattr(result, "completion_tokens", 0) or 0)))

    # ------------------------------------------------------------ exposition

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The registry in the format the scraper asked for (Prometheus text, or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class StateCollector:
    """Gauges read at scrape time; a failing source leaves its gauges out instead of failing the scrape."""

    def __init__(self, manager: Any, probe: Any, temp: Any = None) -> None:
        self.manager, self.probe, self.temp = manager, probe, temp

    def describe(self) -> Iterable:
        return []  # unchecked collector: its series depend on the state at scrape time

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for part in (self._memory, self._models, self._temp):
            try:
                yield from part()
            except Exception:
                log.exception("metrics collector %s failed", part.__name__)

    def _memory(self) -> Iterable[GaugeMetricFamily]:
        reading = self.probe.read()
        yield GaugeMetricFamily(PREFIX + "ram_total_bytes", "Physical RAM", value=reading.ram_total)
        yield GaugeMetricFamily(PREFIX + "ram_available_bytes", "RAM available to new allocations",
                                value=reading.ram_available)
        yield GaugeMetricFamily(PREFIX + "process_rss_bytes", "Resident memory of this server process",
                                value=reading.process_rss)
        gauges = {name: GaugeMetricFamily(PREFIX + f"gpu_{name}_bytes", f"GPU memory: {name}", labels=["device"])
                  for name in ("total", "free", "allocated", "reserved")}
        for gpu in reading.gpus:
            for name, family in gauges.items():
                family.add_metric([f"cuda:{gpu.index}"], getattr(gpu, name))
        yield from gauges.values()
        held = GaugeMetricFamily(PREFIX + "models_bytes", "Bytes held by loaded models, per device",
                                 labels=["device"])
        for device, value in sorted(self.manager.loaded_bytes().items()):
            held.add_metric([device], value)
        yield held
        tier = self.manager.ram_tier_status(reading)
        yield GaugeMetricFamily(PREFIX + "ram_tier_bytes", "Bytes of GPU models parked in RAM", value=tier["used"])
        yield GaugeMetricFamily(PREFIX + "ram_tier_budget_bytes", "Bytes the RAM tier may hold",
                                value=tier["budget"])

    def _models(self) -> Iterable[GaugeMetricFamily]:
        snapshot = self.manager.snapshot()
        in_flight = GaugeMetricFamily(PREFIX + "requests_in_flight", "Requests holding a lease on the model",
                                      labels=["model"])
        loaded = GaugeMetricFamily(PREFIX + "model_loaded", "1 when the model is loaded", labels=["model"])
        state = GaugeMetricFamily(PREFIX + "model_state", "1 for the model's current state",
                                  labels=["model", "state"])
        tier = GaugeMetricFamily(PREFIX + "model_tier", "1 for the model's tier: device (serving) or ram (parked)",
                                 labels=["model", "tier"])
        size = GaugeMetricFamily(PREFIX + "model_bytes", "Bytes the loaded model holds (measured)",
                                 labels=["model", "device"])
        depth = GaugeMetricFamily(PREFIX + "engine_queue_depth", "Requests waiting in the model's engine queue",
                                  labels=["model"])
        running = GaugeMetricFamily(PREFIX + "engine_running_rows", "Requests in the engine's running batch",
                                    labels=["model"])
        speed = GaugeMetricFamily(PREFIX + "engine_tokens_per_second", "Tokens generated per second over the "
                                  "last minute", labels=["model"])
        for key, info in snapshot.items():
            in_flight.add_metric([key], info["in_flight"])
            loaded.add_metric([key], 1 if info["loaded"] else 0)
            for name in MODEL_STATES:
                state.add_metric([key, name], 1 if info["state"] == name else 0)
            for name in TIERS:
                tier.add_metric([key, name], 1 if info.get("tier") == name else 0)
            if info["loaded"] and info["device"]:
                size.add_metric([key, info["device"]], info["bytes_in_memory"])
            engine = info.get("engine")
            if engine:
                depth.add_metric([key], engine["queue_depth"])
                running.add_metric([key], engine["running_batch"])
                speed.add_metric([key], engine["tokens_per_second"])
        yield from (in_flight, loaded, state, tier, size, depth, running, speed)

    def _temp(self) -> Iterable[GaugeMetricFamily]:
        if self.temp is None:
            return
        status = self.temp.status()
        yield GaugeMetricFamily(PREFIX + "temp_bytes", "Bytes under the temp folder", value=status["bytes"])
        yield GaugeMetricFamily(PREFIX + "temp_files", "Files under the temp folder", value=status["files"])
        yield GaugeMetricFamily(PREFIX + "temp_active_scopes", "Live per-request temp scopes",
                                value=status["active_scopes"])


class JobCollector:
    def __init__(self, jobs: Any) -> None:
        self.jobs = jobs

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            counts = self.jobs.store.counts()
        except Exception:
            log.exception("metrics collector for jobs failed")
            return
        family = GaugeMetricFamily(PREFIX + "jobs", "Asynchronous jobs on record, by state", labels=["state"])
        for state, count in counts.items():
            family.add_metric([state], count)
        yield family
