"""The shared services of one process, without Flask: app.py builds them for the HTTP server, and
each Ray replica (utils/cluster/replica.py) builds the same ones for itself, so a replica never
imports Flask."""
from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from utils.settings import ServerSettings

log = logging.getLogger("model_server.app")


@dataclass
class Services:
    """Shared services, one instance per app, kept in app.extensions['model_server']."""
    settings: ServerSettings
    manager: Any
    inference: Any
    temp: Any
    probe: Any
    metrics: Any = None
    sweeper: Any = None
    lifecycle: Any = None   # utils/lifecycle.Lifecycle: readiness, requests in flight, drain, shutdown
    runtime: Any = None     # utils/runtime_settings.RuntimeSettings
    quant_cache: Any = None  # utils/checkpoints.QuantizedCache: 4-bit / 8-bit models saved once quantized
    openvino_cache: Any = None  # utils/runtimes/exporter.OpenVINOCache: models exported to OpenVINO IR
    jobs: Any = None         # utils/jobs.JobRunner: asynchronous jobs (records and results on disk)
    job_executor: Any = None  # utils/job_executor.JobExecutor: checks a job's body, runs a job
    cluster: Any = None     # backend ray: utils/cluster/front.Cluster (replicas, their status); None: local


class Sweeper:
    """One background thread for every periodic chore (idle models, old temp files)."""

    def __init__(self, interval: float, chores: list) -> None:
        self.interval, self.chores = interval, chores
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)

    def start(self) -> "Sweeper":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for chore in self.chores:
                try:
                    chore()
                except Exception:
                    log.exception("sweeper chore %s failed", getattr(chore, "__name__", chore))


def build_services(settings: ServerSettings) -> Services:
    if settings.backend == "ray":
        return build_cluster_services(settings)
    from utils.checkpoints import QuantizedCache
    from utils.engine import make_loader
    from utils.families import WEIGHT_LOADS
    from utils.inference import InferenceService
    from utils.media import MediaLimits
    from utils.memory import MemoryProbe
    from utils.metrics import Metrics
    from utils.model_manager import ModelManager
    from utils.remote_media import RemoteFetcher
    from utils.runtimes import estimate_bytes, load_adapter
    from utils.runtimes.exporter import OpenVINOCache

    set_torch_threads(settings.torch_threads)
    probe = MemoryProbe()
    metrics = Metrics()  # per app: several apps may share one process (tests)
    quant_cache = QuantizedCache.from_settings(settings)
    openvino_cache = OpenVINOCache.from_settings(settings)
    loader = partial(load_adapter, quant_cache=quant_cache, openvino_cache=openvino_cache)
    manager = ModelManager(settings, make_loader(loader, observer=metrics),
                           estimator=partial(estimate_bytes, openvino_cache=openvino_cache), probe=probe, events=metrics,
                           loads_waiting=WEIGHT_LOADS.waiting)
    media_limits = MediaLimits(**asdict(settings.media))
    temp = temp_manager(settings)
    metrics.watch(manager=manager, probe=probe, temp=temp)
    inference = InferenceService(manager, media_limits, on_result=metrics.on_result,
                                 fetch=RemoteFetcher(settings.remote_media).fetch)
    return Services(settings=settings, manager=manager, inference=inference, temp=temp, probe=probe,
                    metrics=metrics, quant_cache=quant_cache, openvino_cache=openvino_cache)


def add_jobs(services: Services) -> None:
    """Asynchronous jobs belong to the front (the HTTP server), whichever backend runs the models:
    a Ray replica builds services without them."""
    from utils.job_executor import JobExecutor
    from utils.jobs import JobRunner, JobStore
    settings = services.settings
    services.job_executor = JobExecutor(services.inference, settings.jobs.timeout)
    services.jobs = JobRunner(JobStore(settings.jobs_path), services.job_executor, workers=settings.jobs.workers,
                              max_queued=settings.jobs.max_queued, max_attempts=settings.jobs.max_attempts,
                              result_ttl=settings.jobs.result_ttl, max_finished=settings.jobs.max_finished,
                              orphan_grace=settings.jobs.orphan_grace,
                              is_configured=lambda model: model in services.settings.models,  # reloads too
                              events=services.metrics)
    services.metrics.watch_jobs(services.jobs)


def temp_manager(settings: ServerSettings):
    from utils.tmp_manage import TempManager
    jobs_dir = settings.jobs_path  # an operator may put it under tmp/: the temp sweeper must not touch it
    return TempManager(settings.tmp_dir, ttl_seconds=settings.tmp_ttl, max_total_bytes=settings.tmp_max_bytes,
                       others=frozenset({jobs_dir.name} if jobs_dir.parent == settings.tmp_dir else ()))


def build_cluster_services(settings: ServerSettings) -> Services:
    """backend ray: the front validates, decodes media and keeps temp files; the models, their
    manager and engines live in Ray Serve replicas (utils/cluster/). Started here, in the gunicorn
    worker (after the fork), never in the arbiter."""
    from utils.cluster.front import Cluster, ClusterManager, RayInference
    from utils.cluster.metrics import ReplicaCollector
    from utils.media import MediaLimits
    from utils.memory import MemoryProbe
    from utils.metrics import Metrics
    from utils.remote_media import RemoteFetcher

    cluster = Cluster(settings).start()
    probe, metrics = MemoryProbe(gpus=False), Metrics()  # the front holds no model: no CUDA context here
    manager = ClusterManager(cluster)
    temp = temp_manager(settings)
    metrics.watch(manager=manager, probe=probe, temp=temp)
    metrics.registry.register(ReplicaCollector(cluster))
    inference = RayInference(cluster, manager, MediaLimits(**asdict(settings.media)), on_result=metrics.on_result,
                             fetch=RemoteFetcher(settings.remote_media).fetch)
    return Services(settings=settings, manager=manager, inference=inference, temp=temp, probe=probe,
                    metrics=metrics, cluster=cluster)


def set_torch_threads(threads: int | None) -> None:
    """The one place torch's intra-op pool is sized: engines run every forward pass, so request
    threads never multiply it. Default: the cores this process may use, less one kept for request
    threads (HTTP, media decoding, processors): on 2 cores that took qwen_vl + image at c=8 from
    96 to 137 req/s (bench/README.md)."""
    import os

    import torch
    torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) - 1))
