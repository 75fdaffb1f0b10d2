"""The services of one process that runs models, without Flask: app.py builds them for the HTTP server
(backend local), and each Ray replica (utils/cluster/replica.py) builds the same ones for itself, so a
replica never imports Flask. utils/services.py chooses between these and the Ray front's."""
from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from utils.config.settings import ServerSettings
from utils.engine import make_loader
from utils.families import WEIGHT_LOADS
from utils.media.decode import MediaLimits
from utils.media.remote import RemoteFetcher
from utils.media.temp_files import TempManager
from utils.ops.metrics import Metrics
from utils.serving.inference import InferenceService
from utils.serving.manager import ModelManager
from utils.runtimes import estimate_bytes, load_adapter
from utils.runtimes.exporter import OpenVINOCache
from utils.serving.memory import MemoryProbe
from utils.serving.quantized_cache import QuantizedCache

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
    lifecycle: Any = None   # utils/ops/lifecycle.Lifecycle: readiness, requests in flight, drain, shutdown
    runtime: Any = None     # utils/config/runtime.RuntimeSettings
    quant_cache: Any = None  # utils/serving/quantized_cache.QuantizedCache: 4-bit / 8-bit models saved once quantized
    openvino_cache: Any = None  # utils/runtimes/exporter.OpenVINOCache: models exported to OpenVINO IR
    jobs: Any = None         # utils/jobs/runner.JobRunner: asynchronous jobs (records and results on disk)
    job_executor: Any = None  # utils/jobs/executor.JobExecutor: checks a job's body, runs a job
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


def build_local_services(settings: ServerSettings) -> Services:
    """backend local (and each Ray replica): the model manager, its engines and the inference service
    in this process."""
    set_torch_threads(settings.torch_threads)
    set_gil_switch_interval(settings.gil_switch_interval)
    probe = MemoryProbe()
    metrics = Metrics()  # per app: several apps may share one process (tests)
    quant_cache = QuantizedCache.from_settings(settings)
    openvino_cache = OpenVINOCache.from_settings(settings)
    loader = partial(load_adapter, quant_cache=quant_cache, openvino_cache=openvino_cache)
    manager = ModelManager(settings, make_loader(loader, observer=metrics),
                           estimator=partial(estimate_bytes, openvino_cache=openvino_cache), probe=probe,
                           events=metrics,
                           loads_waiting=WEIGHT_LOADS.waiting)
    media_limits = MediaLimits(**asdict(settings.media))
    temp = temp_manager(settings)
    metrics.watch(manager=manager, probe=probe, temp=temp)
    inference = InferenceService(manager, media_limits, on_result=metrics.on_result,
                                 fetch=RemoteFetcher(settings.remote_media).fetch)
    return Services(settings=settings, manager=manager, inference=inference, temp=temp, probe=probe,
                    metrics=metrics, quant_cache=quant_cache, openvino_cache=openvino_cache)


def temp_manager(settings: ServerSettings):
    jobs_dir = settings.jobs_path  # an operator may put it under tmp/: the temp sweeper must not touch it
    return TempManager(settings.tmp_dir, ttl_seconds=settings.tmp_ttl, max_total_bytes=settings.tmp_max_bytes,
                       others=frozenset({jobs_dir.name} if jobs_dir.parent == settings.tmp_dir else ()))


def set_gil_switch_interval(seconds: float | None) -> None:
    """The one place the process's GIL switch interval is set (server.gil_switch_interval). The engine
    thread gives the GIL up at every torch operator and must win it back from the request threads; at
    Python's 5 ms a busy request thread made each of those waits up to 5 ms (docs/engine_speed.md)."""
    if seconds is not None:
        sys.setswitchinterval(seconds)


def set_torch_threads(threads: int | None) -> None:
    """The one place torch's intra-op pool is sized: engines run every forward pass, so request
    threads never multiply it. Default: the cores this process may use, less one kept for request
    threads (HTTP, media decoding, processors): on 2 cores that took qwen_vl + image at c=8 from
    96 to 137 req/s (bench/README.md)."""
    import torch  # deferred: torch
    torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) - 1))
