"""Cold start of the demo: `main.py --demo` (the default set) against `main.py --demo all` (the
architecture matrix too, utils/demo_matrix.py), each from an empty models dir: seconds until /health
answers (every checkpoint built offline, then the server up), then the first chat request to each
model (its load + a 4-token greedy answer). Target: `--demo all` cold start under 60 s on 2 cores.

    python -m bench.demo_matrix_start        # JSON lines on stdout, progress on stderr
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import requests

from bench.common import emit, git_commit, install_cleanup, log, start_ours

TARGET_SECONDS = 60.0


def measure(mode: str, work: Path) -> dict:
    models = work / f"models-{mode}"
    started = time.perf_counter()
    server = start_ours(f"demo-{mode}", models, work,
                        env={"DEMO_MODE": "all" if mode == "all" else "1", "MAX_LOADED_MODELS": "40"})
    ready = time.perf_counter() - started
    try:
        cards = requests.get(server.url + "/v1/models", timeout=30).json()["data"]
        first = {}
        for card in cards:
            caps = card.get("capabilities") or {}
            if card["family"] in ("text_to_image", "image_edit", "speech_to_text") or caps.get("images") and \
                    card["family"] == "vqa":
                continue  # no plain chat: drawn, edited, transcribed, or a question about an image
            t = time.perf_counter()
            reply = requests.post(server.url + "/v1/chat/completions", timeout=120, json={
                "model": card["id"], "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": "hello"}]})
            first[card["id"]] = {"status": reply.status_code, "seconds": round(time.perf_counter() - t, 3)}
    finally:
        server.stop()
    checkpoints = len([p for p in (models / "demo").iterdir() if not p.name.startswith(".")])
    return {"kind": "measurement", "mode": mode, "checkpoints": checkpoints, "ready_seconds": round(ready, 2),
            "models": len(cards), "first_chat": first}


def main() -> int:
    install_cleanup()
    emit({"kind": "meta", "bench": "demo_matrix_start", "commit": git_commit(), "time": time.time()})
    with tempfile.TemporaryDirectory(prefix="demo-start-") as tmp:
        results = {}
        for mode in ("default", "all"):
            log(f"cold start --demo {mode}")
            results[mode] = measure(mode, Path(tmp))
            emit(results[mode])
    failed = [k for r in results.values() for k, v in r["first_chat"].items() if v["status"] != 200]
    ratio = results["all"]["ready_seconds"] / results["default"]["ready_seconds"]
    emit({"kind": "ratio", "name": "cold start --demo all / --demo", "value": round(ratio, 2)})
    emit({"kind": "summary", "all_ready_seconds": results["all"]["ready_seconds"], "target_seconds": TARGET_SECONDS,
          "met": results["all"]["ready_seconds"] < TARGET_SECONDS and not failed, "failed_requests": failed})
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
