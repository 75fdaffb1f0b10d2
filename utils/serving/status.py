"""What /admin reports about one process's models and memory, without Flask: the admin routes
serve it, and each Ray replica (utils/cluster/) answers it about itself."""
from __future__ import annotations

import time

from utils.families import capability_fields
from utils.hub.model_folder import checkpoint_state
from utils.serving.memory import estimate_model_bytes, gpu_budget, ram_budget

WARNING_FRACTION = 0.9


def memory_report(svc) -> dict:
    """/admin/memory_status of one process (the server, or one Ray replica)."""
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


def _disk_state(spec) -> str:
    return checkpoint_state(spec.path)


def model_report(svc) -> dict:
    """/admin/model_status of one process (the server, or one Ray replica)."""
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
                           path=spec.path.name, bytes_estimated=estimated, quant_cache_bytes=cache_usage.get(key, 0),
                           **capability_fields(spec))
    return {"timestamp": time.time(), "available_models": list(snapshot),
            "loaded_models": [k for k, v in snapshot.items() if v["loaded"]],
            "parked_models": [k for k, v in snapshot.items() if v.get("tier") == "ram"],
            "max_loaded_models": svc.settings.max_loaded_models, "models": models,
            "quant_cache": cache.status() if cache else None, "settings": svc.settings.public_dict()}
