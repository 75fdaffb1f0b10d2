"""OpenVINO exports: the exporter's own environment and the cache of exported models.

The exporter, optimum-intel 2.2, requires transformers < 5.6; the server runs a newer one, and pip
would downgrade it if both lived in one environment. So the export runs as a subprocess from a
virtual environment of its own, built here on first use and reused after (`ExporterEnvironment`):
- `python -m venv --without-pip`, then the pinned EXPORTER_REQUIREMENTS installed with the server's
  pip. A `.pth` file puts the server's site-packages on its path AFTER its own: torch (a CUDA wheel of
  gigabytes) and openvino / openvino-tokenizers are reused, not installed twice, while its own
  transformers, optimum and nncf shadow the server's.
- built in a temporary folder and renamed into place once complete; its name carries a hash of the
  requirements and the server's python, so a change of pins builds a new one (the old one goes).
- builders in several processes serialise on an fcntl lock in the folder.

The exported models (`OpenVINOCache`) follow the quantized cache's rules (utils/serving/quantized_cache.py): an
entry `<key>--<weight_format>--<id>/` whose id hashes the source files (names, sizes, mtimes), the
weight format, the exporter's pins and the openvino version; written into a `.tmp-*` folder with
`entry.json` last, then renamed; an entry whose files changed, or that fails to load, is removed and
exported again; least recently used entries go beyond the cap.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import sysconfig
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from utils.config.settings import ModelSpec, ServerSettings
from utils.hub.model_folder import checkpoint_state
from utils.serving.quantized_cache import (FORMAT, META_NAME, TMP_PREFIX, Identity, QuantizedCache, _folder_bytes,
                                          _write_json, source_files)

log = logging.getLogger("model_server.openvino")

# Pinned: the exporter's behaviour is part of every export's id. optimum-intel 2.2 wants
# transformers >= 4.51, < 5.6 and huggingface_hub < 1.22; nncf 3.4 compresses the weights.
EXPORTER_REQUIREMENTS = ("optimum-intel[openvino]==2.2.0", "optimum==2.3.0", "transformers==5.5.4", "nncf==3.4.0",
                         "huggingface_hub==1.21.0", "tokenizers==0.22.2")
WORKER = Path(__file__).with_name("export_worker.py")
IR_NAME = "openvino_model.xml"
_ENTRY_RE = re.compile(r"^(?P<key>[a-z][a-z0-9_]*)--(?P<quant>int4|int8|fp16|fp32)--(?P<id>[0-9a-f]{16})$")


class ExportFailed(RuntimeError):
    """The exporter's environment could not be built, or the export did not produce a model."""


class ExporterEnvironment:
    """The exporter's virtual environment under `root` (built on first use, then reused)."""

    def __init__(self, root: Path, *, install_timeout: float = 1800.0) -> None:
        self.root = Path(root)
        self.install_timeout = install_timeout

    @property
    def name(self) -> str:
        digest = hashlib.sha256(json.dumps([EXPORTER_REQUIREMENTS, sys.version, _server_site_packages()])
                                .encode()).hexdigest()[:12]
        return f"venv-{digest}"

    @property
    def folder(self) -> Path:
        return self.root / self.name

    def ready(self) -> bool:
        return (self.folder / "ready.json").is_file()

    def python(self) -> Path:
        """The exporter's interpreter, built first when missing."""
        if not self.ready():
            self.build()
        return self.folder / "bin" / "python"

    def build(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.root / ".lock"):
            if self.ready():
                return self.folder
            for stale in self.root.iterdir():  # other pins, or a build that died half-way
                if stale.is_dir() and stale.name != self.name:
                    shutil.rmtree(stale, ignore_errors=True)
            started = time.perf_counter()
            tmp = self.root / f"{TMP_PREFIX}{self.name}-{os.getpid()}-{secrets.token_hex(4)}"
            log.info("building the OpenVINO exporter's environment in %s (once; pip installs %s)", self.root,
                     ", ".join(EXPORTER_REQUIREMENTS))
            try:
                _run([sys.executable, "-m", "venv", "--without-pip", str(tmp)], timeout=120)
                purelib = Path(subprocess.run([str(tmp / "bin" / "python"), "-c",
                                               "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                              check=True, capture_output=True, text=True, timeout=60).stdout.strip())
                # After its own site-packages: torch and openvino come from the server, the rest from here.
                (purelib / "_server_site_packages.pth").write_text(_server_site_packages() + "\n")
                _run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                      *EXPORTER_REQUIREMENTS], timeout=self.install_timeout)
                _write_json(tmp / "ready.json", {"requirements": list(EXPORTER_REQUIREMENTS), "built": time.time(),
                                                 "seconds": round(time.perf_counter() - started, 1)})
                os.rename(tmp, self.folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("the OpenVINO exporter's environment is ready (%.0fs)", time.perf_counter() - started)
            return self.folder

    def export(self, source: Path, out: Path, weight_format: str, *, timeout: float) -> None:
        """One export, as a subprocess of the exporter's interpreter; its output goes to the log."""
        # -I: the worker's folder is not put on sys.path (its openvino.py would shadow the openvino package).
        command = [str(self.python()), "-I", str(WORKER), "--model", str(source), "--out", str(out),
                   "--weight-format", weight_format]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise ExportFailed(f"the export of {source.name}/ took more than {timeout:g}s "
                               f"(openvino.export_timeout)") from None
        if done.returncode != 0 or not (out / IR_NAME).is_file():
            lines = (done.stderr or done.stdout or "").strip().splitlines()
            log.error("the OpenVINO export of %s/ failed (exit %s):\n%s", source.name, done.returncode,
                      "\n".join(lines[-40:]))
            raise ExportFailed(f"the OpenVINO export of {source.name}/ failed (exit {done.returncode}): "
                               f"{(lines[-1] if lines else 'no output')[:300]} (the log has the rest)")


class OpenVINOCache(QuantizedCache):
    """Exported models under `root`, one entry per model and weight format (see the module docstring)."""

    ENTRY_RE = _ENTRY_RE
    kind = "openvino cache"

    def __init__(self, root: Path, exporter: ExporterEnvironment, *, max_bytes: int | None = None,
                 export_timeout: float = 3600.0) -> None:
        super().__init__(root, enabled=True, max_bytes=max_bytes)
        self.exporter, self.export_timeout = exporter, export_timeout

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> "OpenVINOCache":
        return cls(settings.openvino_cache_path, ExporterEnvironment(settings.openvino_exporter_path),
                   max_bytes=settings.openvino.cache_max_bytes, export_timeout=settings.openvino.export_timeout)

    def reconfigure(self, settings: ServerSettings) -> None:
        self.max_bytes, self.export_timeout = settings.openvino.cache_max_bytes, settings.openvino.export_timeout

    def identity_of(self, spec: ModelSpec) -> Identity:
        import openvino  # deferred: openvino

        parts = {"format": FORMAT, "source": source_files(spec.path), "weight_format": spec.weight_format,
                 "exporter": list(EXPORTER_REQUIREMENTS), "openvino": openvino.__version__}
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return Identity(key=spec.key, quantization=spec.weight_format, id=digest, parts=parts)

    def state(self, spec: ModelSpec) -> str:
        """For /admin: exported (a valid entry), not_exported, or exporter_missing (none, and the
        exporter's environment is not built yet: the first export builds it)."""
        if (self.root / self.identity_of(spec).name / META_NAME).is_file():
            return "exported"
        return "not_exported" if self.exporter.ready() else "exporter_missing"

    def ensure(self, spec: ModelSpec) -> Path:
        """The entry's folder: found valid, or exported now (a few seconds to minutes)."""
        ident = self.identity_of(spec)
        found = self.find(ident)
        if found is not None:
            self._touch(found)
            return found
        return self.export(spec, ident)

    def discard(self, folder: Path, why: str) -> None:
        """An entry that failed to load: removed, so the next load exports it again."""
        log.warning("%s entry %s is not served (%s); it will be exported again", self.kind, folder.name, why)
        self._remove(folder)

    def export(self, spec: ModelSpec, ident: Identity) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        self.sweep_leftovers()
        started = time.perf_counter()
        with self._new_entry(ident) as tmp:
            self.exporter.export(spec.path, tmp, spec.weight_format, timeout=self.export_timeout)
            final = self._publish(tmp, ident, {"seconds": round(time.perf_counter() - started, 1)})
        if final is None:  # another process exported it first: serve that one
            final = self.root / ident.name
            self._touch(final)
        log.info("%s: exported to OpenVINO %s (%s, %d MiB) in %.1fs", spec.key, spec.weight_format, final.name,
                 _folder_bytes(final) >> 20, time.perf_counter() - started)
        self._remove_superseded(ident)
        self.enforce_cap(keep=final)
        return final


def build_openvino_exports(settings: ServerSettings, keys: list[str]) -> list[dict]:
    """main.py --download / --download-only: exports every openvino model among `keys` that has no
    valid export yet. One row per such key: key, weight_format, status (built / present / failed),
    reason, bytes, seconds; a failure is reported and the others go on."""
    cache = OpenVINOCache.from_settings(settings)
    report = []
    for key in dict.fromkeys(keys):
        spec = settings.models[key]
        if spec.runtime != "openvino":
            continue
        row = {"key": key, "quantization": f"openvino {spec.weight_format}", "status": "failed", "reason": None,
               "bytes": 0, "seconds": 0.0}
        report.append(row)
        started = time.perf_counter()
        if checkpoint_state(spec.path) != "downloaded":
            row["reason"] = f"no complete checkpoint in {spec.path.name}/"
            continue
        try:
            present = cache.find(cache.identity_of(spec)) is not None
            folder = cache.ensure(spec)
            row["status"], row["bytes"] = ("present" if present else "built"), _folder_bytes(folder)
        except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the others
            row["reason"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        row["seconds"] = round(time.perf_counter() - started, 2)
    return report


def _server_site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


def _run(command: list[str], *, timeout: float) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ExportFailed(f"{' '.join(command[:4])} ... took more than {timeout:g}s") from None
    if done.returncode != 0:
        raise ExportFailed(f"{' '.join(command[:4])} ... failed (exit {done.returncode}): "
                           + (done.stderr or done.stdout).strip()[-800:])


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
