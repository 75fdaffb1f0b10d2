"""/admin: what operators read and do. Reads snapshots; changes go through the model manager.

Also GET /metrics (Prometheus), open like /health; the dashboard page lives in dashboard.py."""
from __future__ import annotations

import re
import time

from flask import Blueprint, Response, current_app, jsonify, request

from utils.errors import InvalidInput
from utils.inference import number_field
from utils.memory import gpu_budget, ram_budget

bp = Blueprint("admin", __name__, url_prefix="/admin")
metrics_bp = Blueprint("metrics", __name__)
WARNING_FRACTION = 0.9
DEVICE_RE = re.compile(r"^(cpu|mps|cuda:\d+)$")


def services():
    return current_app.extensions["model_server"]


def memory_report() -> dict:
    svc = services()
    settings = svc.settings
    reading = svc.probe.read()
    held = svc.manager.loaded_bytes()
    ram_limit = ram_budget(settings, reading)
    ram_models = held.get("cpu", 0)
    warnings = []
    if ram_models > WARNING_FRACTION * ram_limit:
        warnings.append(f"models hold {ram_models} of the {ram_limit}-byte RAM budget")
    if reading.ram_available < settings.ram_headroom_bytes:
        warnings.append("available RAM is below the configured headroom")
    gpus = []
    for gpu in reading.gpus:
        device = f"cuda:{gpu.index}"
        budget = gpu_budget(settings, gpu)
        models = held.get(device, 0)
        if models > WARNING_FRACTION * budget:
            warnings.append(f"models hold {models} of the {budget}-byte budget of {device}")
        if gpu.free < settings.gpu_headroom_bytes:
            warnings.append(f"free memory on {device} is below the configured headroom")
        gpus.append({"device": device, "name": gpu.name, "total": gpu.total, "free": gpu.free,
                     "allocated": gpu.allocated, "reserved": gpu.reserved, "budget": budget,
                     "models_bytes": models})
    return {
        "timestamp": time.time(),
        "ram": {"total": reading.ram_total, "available": reading.ram_available, "percent": reading.ram_percent,
                "process_rss": reading.process_rss, "budget": ram_limit,
                "headroom": settings.ram_headroom_bytes, "models_bytes": ram_models},
        "gpu_available": bool(reading.gpus),
        "gpus": gpus,
        "gpu_headroom": settings.gpu_headroom_bytes,
        "memory_warning": bool(warnings),
        "warnings": warnings,
        "pressure": svc.manager.pressure_status(),  # per device: events, active, released, held_by
        "ram_tier": svc.manager.ram_tier_status(reading),  # GPU models parked in RAM: budget, used, which
    }


@bp.get("/memory_status")
def memory_status():
    return jsonify(memory_report())


def _disk_state(spec) -> str:
    from utils.download_model import checkpoint_state
    return checkpoint_state(spec.path)


@bp.get("/model_status")
def model_status():
    from utils.memory import estimate_model_bytes

    svc = services()
    snapshot = svc.manager.snapshot()
    specs = svc.manager.specs()
    cache = getattr(svc, "quant_cache", None)
    cache_usage = cache.usage() if cache else {}
    models = {}
    for key, info in snapshot.items():
        spec = specs[key]
        disk = _disk_state(spec)
        state = info["state"]
        if state in ("unloaded",):
            state = disk if disk != "partial" else "partial"
        try:
            estimated = estimate_model_bytes(spec) if disk != "not_downloaded" else None
        except Exception:
            estimated = None
        models[key] = dict(info, state=state, manager_state=info["state"], files=disk,
                           path=spec.path.name, bytes_estimated=estimated, quant_cache_bytes=cache_usage.get(key, 0))
    return jsonify({"timestamp": time.time(), "available_models": list(snapshot),
                    "loaded_models": [k for k, v in snapshot.items() if v["loaded"]],
                    "parked_models": [k for k, v in snapshot.items() if v["tier"] == "ram"],
                    "max_loaded_models": svc.settings.max_loaded_models, "models": models,
                    "quant_cache": cache.status() if cache else None, "settings": svc.settings.public_dict()})


def wait_seconds() -> float:
    wait = request.args.get("wait", "0")
    try:
        seconds = float(wait)
    except ValueError:
        raise InvalidInput(f"'wait' must be a number of seconds; got {wait!r}", field="wait") from None
    if not 0 <= seconds <= 600:
        raise InvalidInput("'wait' must be between 0 and 600 seconds", field="wait")
    return seconds


@bp.post("/models/<key>/load")
def load_model(key: str):
    """?device=cpu|cuda:N|mps moves the model there (e.g. back to a GPU after a CPU fallback)."""
    device = request.args.get("device")
    if device is not None and not DEVICE_RE.match(device):
        raise InvalidInput(f"'device' must be cpu, cuda:N or mps; got {device!r}", field="device")
    status = services().manager.load(key, force_retry=True, device=device, wait=wait_seconds())
    return jsonify({"loaded": True, "model": status})


@bp.post("/models/<key>/unload")
def unload_model(key: str):
    unloaded = services().manager.unload(key, wait=wait_seconds())
    return jsonify({"unloaded": unloaded, "model": services().manager.snapshot_one(key)})


@bp.post("/reload_config")
def reload_config():
    """Re-reads models.yaml and the environment; an invalid file changes nothing (400 naming the key)."""
    from utils import config_reload
    from utils.errors import ConfigError

    try:
        diff = config_reload.reload_config(services(), current_app.config)
    except ConfigError as exc:
        raise InvalidInput(f"nothing changed: {exc}", error="invalid config") from None
    return jsonify(dict(diff, reloaded=True))


@bp.post("/emergency_cleanup")
def emergency_cleanup():
    """Unloads every idle model, releases caches (gc, CUDA cache, malloc trim) and purges expired temp
    files. Leased models and live temp scopes are left alone."""
    from utils.model_manager import release_cached_memory

    svc = services()
    before = svc.probe.read()
    held_before = svc.manager.loaded_bytes()
    unloaded = svc.manager.unload_idle(reason="emergency_cleanup")
    release_cached_memory()  # even when no model was idle: caches of finished requests
    temp = svc.temp.sweep()
    after = svc.probe.read()
    held_after = svc.manager.loaded_bytes()
    gpu_freed = {f"cuda:{b.index}": b.allocated - a.allocated for b, a in zip(before.gpus, after.gpus)}
    gpu_reserved_freed = {f"cuda:{b.index}": b.reserved - a.reserved for b, a in zip(before.gpus, after.gpus)}
    return jsonify({
        "unloaded_models": unloaded,
        "model_bytes_freed": sum(held_before.values()) - sum(held_after.values()),
        "rss_freed": before.process_rss - after.process_rss,
        "gpu_allocated_freed": gpu_freed,
        "gpu_reserved_freed": gpu_reserved_freed,
        "temp": temp,
        "kept_in_use": [k for k, v in svc.manager.snapshot().items() if v["loaded"]],
    })


@bp.get("/temp_status")
def temp_status():
    return jsonify(services().temp.status())


@bp.get("/jobs")
def jobs_status():
    """Jobs by state and the most recent ones (the dashboard's list); GET /jobs pages through all."""
    limit = number_field(request.args, "limit", integer=True, low=1, high=200, default=20)
    jobs = services().jobs
    return jsonify({**jobs.status(), "recent": [view for view, _ in jobs.page(limit=limit)]})


@bp.post("/cleanup_temp")
def cleanup_temp():
    force = request.args.get("force", "false").lower() in ("1", "true", "yes")
    return jsonify(services().temp.sweep(force=force))


@metrics_bp.get("/metrics")
def metrics():
    body, content_type = services().metrics.render(request.headers.get("Accept"))
    return Response(body, content_type=content_type)
