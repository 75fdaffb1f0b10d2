"""GET /device and POST /device?device=... (seed 004): the devices this server sees, their memory and
the models on each, built from the memory report and the manager's snapshot (never from torch here).

Names follow seed 004 (OpenVINO's): "CPU", and "GPU" when there is one GPU, "GPU.0", "GPU.1"... when
there are several; each entry also carries our own id ("cpu", "cuda:0"). A lookup takes either form,
case-insensitively, plus "GPU" and "cuda" for the first GPU.
"""
from __future__ import annotations

import functools
import os
import platform
from typing import Any, Mapping

from utils.errors import InvalidInput
from utils.serving.status import memory_report


def device_report(svc: Any) -> dict:
    """{"devices": [names], "details": [one dict per device]}; with the Ray backend, each replica's
    devices too (the front holds no model)."""
    details = devices_from(memory_report(svc), svc.manager.snapshot() if svc.cluster is None else {})
    report: dict[str, Any] = {"devices": [d["device"] for d in details], "details": details}
    if svc.cluster is not None:
        report["replicas"] = {rid: devices_from(status["memory"], status.get("models", {}))
                              for rid, status in svc.cluster.statuses().items() if isinstance(status.get("memory"), dict)}
    return report


def devices_from(memory: Mapping, models: Mapping[str, Mapping]) -> list[dict]:
    """Device entries from one process's memory report (utils/serving/status.memory_report) and model snapshot."""
    ram = memory.get("ram", {})
    cpu = {"device": "CPU", "id": "cpu", "type": "cpu", "name": _cpu_name(), "cores": os.cpu_count(),
           "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "memory": {name: ram.get(name) for name in ("total", "available", "budget", "models_bytes")},
           "models": _models_on("cpu", models)}
    gpus = memory.get("gpus", [])
    entries = [cpu]
    for gpu in gpus:
        index = gpu["device"].split(":")[1]
        entries.append({"device": "GPU" if len(gpus) == 1 else f"GPU.{index}", "id": gpu["device"], "type": "gpu",
                        "name": gpu.get("name"),
                        "memory": {name: gpu.get(name) for name in ("total", "free", "allocated", "reserved",
                                                                   "budget", "models_bytes")},
                        "models": _models_on(gpu["device"], models)})
    known = {entry["id"] for entry in entries}
    for device in sorted({d for info in models.values() for d in (info.get("placement") or {})} - known):
        entries.append({"device": device.upper(), "id": device, "type": device.split(":")[0], "name": None,
                        "memory": None, "models": _models_on(device, models)})  # e.g. mps: no reading of its own
    return entries


def find_device(report: Mapping, name: Any) -> dict:
    """The entry `name` designates (400 naming the known devices when none does)."""
    details = report["details"]
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput(f"give ?device=: one of {', '.join(report['devices'])}", field="device",
                           error="missing field")
    wanted = name.strip().lower()
    gpus = [d for d in details if d["type"] == "gpu"]
    aliases = {"gpu": gpus[0] if gpus else None, "cuda": gpus[0] if gpus else None}
    for entry in details:
        names = {entry["device"].lower(), entry["id"].lower()}
        if entry["type"] == "gpu":
            names.add(f"gpu.{entry['id'].split(':')[1]}")
        if wanted in names:
            return entry
    if aliases.get(wanted) is not None:
        return aliases[wanted]
    raise InvalidInput(f"no device {name!r} on this server; devices: {', '.join(report['devices'])}", field="device",
                       error="unknown device")


def _models_on(device: str, models: Mapping[str, Mapping]) -> list[dict]:
    out = []
    for key, info in models.items():
        held = (info.get("placement") or {}).get(device)
        if held is None and info.get("device") == device and info.get("state") in ("loaded", "loading"):
            held = 0  # loading: placed, not measured yet
        if held is not None and info.get("state") in ("loaded", "loading"):
            out.append({"model": key, "state": info["state"], "bytes": held, "in_flight": info.get("in_flight", 0)})
        elif device == "cpu" and info.get("tier") == "ram":  # parked in RAM by the RAM tier
            out.append({"model": key, "state": "parked", "bytes": info.get("parked_bytes"), "in_flight": 0})
    return out


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
