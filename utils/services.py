"""The composition root: builds every service of the HTTP server from settings, with the models in this
process (backend local: utils/local_services.py) or in Ray Serve replicas (backend ray:
utils/cluster/services.py), plus the asynchronous jobs the front always runs."""
from __future__ import annotations

from utils.cluster.services import build_cluster_services
from utils.config.settings import ServerSettings
from utils.jobs.executor import JobExecutor
from utils.jobs.runner import JobRunner
from utils.jobs.store import JobStore
from utils.local_services import Services, Sweeper, build_local_services

__all__ = ["Services", "Sweeper", "add_jobs", "build_services"]


def build_services(settings: ServerSettings) -> Services:
    if settings.backend == "ray":
        return build_cluster_services(settings)
    return build_local_services(settings)


def add_jobs(services: Services) -> None:
    """Asynchronous jobs belong to the front (the HTTP server), whichever backend runs the models:
    a Ray replica builds services without them."""
    settings = services.settings
    services.job_executor = JobExecutor(services.inference, settings.jobs.timeout)
    services.jobs = JobRunner(JobStore(settings.jobs_path), services.job_executor, workers=settings.jobs.workers,
                              max_queued=settings.jobs.max_queued, max_attempts=settings.jobs.max_attempts,
                              result_ttl=settings.jobs.result_ttl, max_finished=settings.jobs.max_finished,
                              orphan_grace=settings.jobs.orphan_grace,
                              is_configured=lambda model: model in services.settings.models,  # reloads too
                              events=services.metrics)
    services.metrics.watch_jobs(services.jobs)
