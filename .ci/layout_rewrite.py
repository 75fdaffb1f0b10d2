"""Rewrites references to the old utils/ layout (issue 25) into the new one: imports (also inside
functions), `from utils import X`, dotted strings ("utils.model_manager.X" in mock.patch, `-m utils.x`)
and path mentions (utils/settings.py). Idempotent: run it on a branch after merging the layout.

    .venv/bin/python .ci/layout_rewrite.py            # every tracked text file
    .venv/bin/python .ci/layout_rewrite.py FILE ...   # just these
The old -> new table is docs/architecture.md "Layout"."""
import pathlib
import re
import subprocess
import sys

MAP = {  # old module under utils/ -> new dotted path under utils/
    "settings": "config.settings", "config_file": "config.yaml_file", "config_reload": "config.reload",
    "runtime_settings": "config.runtime",
    "model_manager": "serving.manager", "model_entries": "serving.entries", "ram_tier": "serving.ram_tier",
    "memory": "serving.memory", "status": "serving.status", "device_status": "serving.device_status",
    "checkpoints": "serving.quantized_cache", "bnb_cpu_layout": "serving.bnb_cpu_layout",
    "inference": "serving.inference", "images": "serving.image_requests",
    "media": "media.decode", "media_options": "media.options", "remote_media": "media.remote",
    "tmp_manage": "media.temp_files",
    "jobs": "jobs.runner", "job_executor": "jobs.executor",
    "openai_api": "api.openai_translation", "openai_tools": "api.openai_tools",
    "tool_parsers": "api.tool_parsers", "transcription": "api.transcription",
    "gunicorn_worker": "ops.gunicorn_worker", "lifecycle": "ops.lifecycle", "healthcheck": "ops.healthcheck",
    "logging_setup": "ops.logging_setup", "metrics": "ops.metrics",
    "download_model": "hub.download", "demo_models": "hub.demo_models", "demo_speech_janus": "hub.demo_speech_janus",
}
NEW_LEAVES = {v.split(".", 1)[1] for v in MAP.values() if v.split(".")[0] in MAP}  # media.decode, jobs.runner...
names = "|".join(sorted(MAP, key=len, reverse=True))
leaves = "|".join(sorted(NEW_LEAVES, key=len, reverse=True))
# `utils.media` / `utils.jobs` are packages now: a following new leaf means the text is already rewritten.
DOTTED = re.compile(rf"\butils\.({names})\b(?![/])(?!\.(?:{leaves})\b)(?! import (?:{leaves})\b)")
PATH = re.compile(rf"\butils/({names})(?=\.py\b|\.[A-Za-z_]|\))")
FROM_UTILS = re.compile(rf"^(\s*)from utils import ({names})\b(?: as (\w+))?(.*)$", re.S)
IMPORT_LINE = re.compile(r"^\s*(from|import)\s")


def rewrite_line(line: str) -> str:
    m = FROM_UTILS.match(line)
    if m and "," not in m.group(4).split("#")[0]:
        pkg, _, leaf = MAP[m.group(2)].rpartition(".")
        local = m.group(3) or m.group(2)
        return f"{m.group(1)}from utils.{pkg} import {leaf}" + ("" if local == leaf else f" as {local}") + m.group(4)

    def dotted(d):
        if d.group(1) == "download_model" and not IMPORT_LINE.match(line):
            return d.group(0)   # `python -m utils.download_model` stays true (the shim)
        return "utils." + MAP[d.group(1)]

    def path(d):
        if d.group(1) == "download_model":
            return d.group(0)   # seed 001's `python utils/download_model.py` stays true (the shim)
        return "utils/" + MAP[d.group(1)].replace(".", "/")
    return PATH.sub(path, DOTTED.sub(dotted, line))


def main(argv: list[str]) -> int:
    files = argv or subprocess.run(["git", "ls-files"], capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        p = pathlib.Path(name)
        if name == "docs/architecture.md":
            continue  # holds the old -> new table itself
        if p.suffix not in {".py", ".md", ".sh", ".yml", ".yaml", ".toml", ".cfg", ".txt", ""} or not p.is_file():
            continue
        try:
            text = p.read_text()
        except UnicodeDecodeError:
            continue
        new = "".join(rewrite_line(line) for line in text.splitlines(keepends=True))
        if new != text:
            p.write_text(new)
            print("rewrote", name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
