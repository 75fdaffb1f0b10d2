"""Config reload without a restart (POST /admin/reload_config, SIGHUP): re-read settings are applied to
the running services, and what changed is reported. No Flask here; the route applies the body limit."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from utils.config.settings import ServerSettings, load_settings
from utils.media.decode import MediaLimits
from utils.media.remote import RemoteFetcher

log = logging.getLogger("model_server.config")

# Server settings a running process cannot take on: folders it opened, torch's thread pool and the GIL's
# switch interval (set once per process), the tokens its auth checks were built with, demo mode.
RESTART_ONLY = ("models_dir", "tmp_dir", "log_dir", "torch_threads", "gil_switch_interval", "admin_token",
                "api_token", "demo", "quant_cache_dir", "backend", "ray")
# Fields of a section a running process cannot take on, named "<section>.<field>" in needs_restart.
SECTION_RESTART_ONLY = {
    "jobs": ("dir", "workers"),                   # the open job store, the worker threads
    "openvino": ("cache_dir", "exporter_dir"),    # the export cache and the exporter's venv it opened
}


def apply(services: Any, new: ServerSettings) -> dict:
    """Applies `new` to the manager, the inference service, the temp manager and the sweeper.
    Returns {"models": {added, removed, changed, reload_when_idle}, "server": [changed fields],
    "needs_restart": [fields kept as they were]}."""
    old: ServerSettings = services.settings
    keep = {name: getattr(old, name) for name in RESTART_ONLY if getattr(old, name) != getattr(new, name)}
    needs_restart = sorted(keep)
    for section, fields in SECTION_RESTART_ONLY.items():  # the section's other fields apply
        was, now = getattr(old, section), getattr(new, section)
        kept = {name: getattr(was, name) for name in fields if getattr(was, name) != getattr(now, name)}
        if kept:
            keep[section] = dataclasses.replace(now, **kept)
            needs_restart += [f"{section}.{name}" for name in sorted(kept)]
    applied = dataclasses.replace(new, **keep)
    server_changes = [f.name for f in dataclasses.fields(ServerSettings)
                      if f.name not in ("models", "config_path", "env") and f.name not in RESTART_ONLY
                      and getattr(old, f.name) != getattr(applied, f.name)]
    models = services.manager.reconfigure(applied)
    services.settings = applied
    _apply_services(services, applied)
    diff = {"models": models, "server": server_changes, "needs_restart": sorted(needs_restart)}
    log.info("config reloaded: %s", diff)
    return diff


def _apply_services(services: Any, settings: ServerSettings) -> None:
    services.inference.media_limits = MediaLimits(**dataclasses.asdict(settings.media))
    services.inference.set_fetcher(RemoteFetcher(settings.remote_media).fetch)
    services.temp.ttl_seconds, services.temp.max_total_bytes = settings.tmp_ttl, settings.tmp_max_bytes
    if services.sweeper is not None:
        services.sweeper.interval = settings.sweep_interval
    jobs = getattr(services, "jobs", None)
    if jobs is not None:
        jobs.configure(max_queued=settings.jobs.max_queued, max_attempts=settings.jobs.max_attempts,
                       result_ttl=settings.jobs.result_ttl, max_finished=settings.jobs.max_finished,
                       orphan_grace=settings.jobs.orphan_grace)
        services.job_executor.job_timeout = settings.jobs.timeout
    for name in ("quant_cache", "openvino_cache"):
        cache = getattr(services, name, None)
        if cache is not None:  # the switch, the cap (and the export timeout): from the next load on
            cache.reconfigure(settings)


def reload_config(services: Any, app_config: Any = None) -> dict:
    """Re-reads the config file and environment the server started with and applies them; raises
    ConfigError (nothing changed) when the file is invalid. `app_config`: the web app's config dict,
    for the body size limit. Called by POST /admin/reload_config and on SIGHUP."""
    old = services.settings
    diff = apply(services, load_settings(old.config_path, env=old.env, demo="all" if old.demo_matrix else old.demo))
    if app_config is not None:
        app_config["MAX_CONTENT_LENGTH"] = services.settings.max_content_length
    return diff
