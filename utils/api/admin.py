"""/admin: what operators read and do. Reads snapshots; changes go through the model manager.

Also GET /metrics (Prometheus), open like /health; the dashboard page lives in dashboard.py."""
from __future__ import annotations

import re

from flask import Blueprint, Response, current_app, jsonify, request

from utils.config import reload as config_reload
from utils.errors import ConfigError, InvalidInput
from utils.serving import status
from utils.serving.inference import number_field
from utils.serving.manager import _mps_available, release_cached_memory

bp = Blueprint("admin", __name__, url_prefix="/admin")
metrics_bp = Blueprint("metrics", __name__)
DEVICE_RE = re.compile(r"^(cpu|mps|cuda:[0-9]{1,3})$")  # ASCII digits: re's \d takes "cuda:٣" too


def services():
    return current_app.extensions["model_server"]


def memory_report() -> dict:
    svc = services()
    report = status.memory_report(svc)
    if svc.cluster is not None:  # backend ray: every replica's own report, and their sum
        report["replicas"] = svc.cluster.memory_status()
    return report


@bp.get("/memory_status")
def memory_status():
    return jsonify(memory_report())


@bp.get("/model_status")
def model_status():
    svc = services()
    report = status.model_report(svc)
    if svc.cluster is not None:  # which replica holds which model, each one's pid, node and loads
        report["replicas"] = svc.cluster.replicas_status()
    return jsonify(report)


def wait_seconds() -> float:
    wait = request.args.get("wait", "0")
    try:
        seconds = float(wait)
    except ValueError:
        raise InvalidInput(f"'wait' must be a number of seconds; got {wait!r}", field="wait") from None
    if not 0 <= seconds <= 600:
        raise InvalidInput("'wait' must be between 0 and 600 seconds", field="wait")
    return seconds


def present_device(device: str) -> str:
    """A device this machine has (cuda:01 read as cuda:1): asking for one it lacks is the client's
    mistake (400), not a memory shortage or a failed load (503)."""
    if device.startswith("cuda:"):
        device = f"cuda:{int(device[5:])}"
    present = ["cpu", *(f"cuda:{gpu.index}" for gpu in services().probe.read().gpus),
               *(["mps"] if device == "mps" and _mps_available() else [])]
    if device not in present:
        raise InvalidInput(f"there is no {device} here; devices: {', '.join(present)}", field="device",
                           error="unknown device")
    return device


@bp.post("/models/<key>/load")
def load_model(key: str):
    """?device=cpu|cuda:N|mps moves the model there (e.g. back to a GPU after a CPU fallback)."""
    device = request.args.get("device")
    if device is not None and not DEVICE_RE.match(device):
        raise InvalidInput(f"'device' must be cpu, cuda:N or mps; got {device!r}", field="device")
    if device is not None and services().cluster is None:  # (Ray: the replicas' devices are theirs)
        device = present_device(device)
    status = services().manager.load(key, force_retry=True, device=device, wait=wait_seconds())
    return jsonify({"loaded": True, "model": status})


@bp.post("/models/<key>/unload")
def unload_model(key: str):
    unloaded = services().manager.unload(key, wait=wait_seconds())
    return jsonify({"unloaded": unloaded, "model": services().manager.snapshot_one(key)})


@bp.post("/reload_config")
def reload_config():
    """Re-reads models.yaml and the environment; an invalid file changes nothing (400 naming the key)."""
    try:
        diff = config_reload.reload_config(services(), current_app.config)
    except ConfigError as exc:
        raise InvalidInput(f"nothing changed: {exc}", error="invalid config") from None
    return jsonify(dict(diff, reloaded=True))


@bp.post("/emergency_cleanup")
def emergency_cleanup():
    """Unloads every idle model, releases caches (gc, CUDA cache, malloc trim) and purges expired temp
    files. Leased models and live temp scopes are left alone."""
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
