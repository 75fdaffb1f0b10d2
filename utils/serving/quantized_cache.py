"""The quantized cache: a 4-bit / 8-bit model quantized once, then read back on every later load.

bitsandbytes quantizes the full-precision weights on every quantized load: seconds on a GPU, tens of
seconds to minutes on a CPU, each time the model comes back after an eviction or a restart. The first
quantized load of a model saves the quantized model (transformers' `save_pretrained` of the
bitsandbytes model) into `<models_dir>/.quantized/<key>--<quantization>--<id>/`; later loads read that
folder instead (a plain `from_pretrained` of already quantized weights).

An entry is served only when all of these hold, and is removed and rebuilt from the source otherwise:
- its id is the load's id: a hash of the source checkpoint's files (names, sizes, mtimes), what the
  load asks for (model class and kwargs, dtype, bitsandbytes config, skip modules), the device type,
  and the torch / transformers / bitsandbytes versions. A changed source or setting is a new id; the
  old entry of that model and quantization goes when the new one is written;
- it is complete: written into a `.tmp-*` folder, `entry.json` last, then renamed into place. A crash
  mid-write leaves a `.tmp-*` folder that is never served and is removed later;
- its files are as written: each file's size and mtime as recorded in `entry.json` (a truncated or
  rewritten file is caught; bit rot that keeps both is not: the source checkpoint is trusted the
  same way);
- the model read back is the model written: the same parameter and buffer names, shapes, dtypes and
  tensor types (quantized or not), and the same tied weights. A checkpoint that stores both tied
  tensors can come back with them untied after a save: they are tied again when their values are
  equal, else the entry is not served. The families' post-load check (loading.check_loaded_weights)
  runs on top.
The cache never fails a load: a write that fails is logged and the freshly quantized model serves.
Entries beyond `quant_cache_max_gb` go least recently used first (last use: the entry folder's mtime).

Loads are serialized in the process (families/loading.py), so one process never writes one entry twice
at once; two processes that race both write their own temporary folder and the second rename loses.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from utils.config.settings import ModelSpec, ServerSettings
from utils.families import family_class, load_family
from utils.families.loading import check_loaded_weights
from utils.hub.model_folder import checkpoint_state
from utils.serving import bnb_cpu_layout
from utils.serving.manager import default_device_resolver
from utils.serving.memory import is_out_of_memory, release_cached_memory

log = logging.getLogger("model_server.quant_cache")

FORMAT = 1
META_NAME = "entry.json"
TMP_PREFIX = ".tmp-"
# A temporary folder of another process is left alone while that process lives, up to this age.
STALE_TMP_SECONDS = 6 * 3600
# Free disk kept after a write (logs, temp files, downloads).
DISK_RESERVE_BYTES = 1 << 30
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
_ENTRY_RE = re.compile(r"^(?P<key>[a-z][a-z0-9_]*)--(?P<quant>4bit|8bit)--(?P<id>[0-9a-f]{16})$")


@dataclass(frozen=True)
class Identity:
    """What an entry must have been built from: `id` hashes `parts`."""
    key: str
    quantization: str
    id: str
    parts: dict = field(compare=False)

    @property
    def name(self) -> str:
        return f"{self.key}--{self.quantization}--{self.id}"


def source_files(path: Path) -> list[list]:
    """[name, size, mtime_ns] of the files in a checkpoint folder (top level, hidden ones excluded)."""
    out = []
    for item in sorted(Path(path).iterdir()):
        if item.name.startswith(".") or not item.is_file():
            continue
        stat = item.stat()
        out.append([item.name, stat.st_size, stat.st_mtime_ns])
    return out


def _versions() -> dict:
    import bitsandbytes  # deferred: bitsandbytes
    import torch  # deferred: torch
    import transformers  # deferred: transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "bitsandbytes": bitsandbytes.__version__}


def _is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES)


def model_signature(model: Any) -> dict:
    """What makes two loaded models the same model, cheaply: every parameter and buffer (name, shape,
    dtype, tensor type) and which names share one tensor (tied weights)."""
    tensors: list[str] = []
    first_name: dict[int, str] = {}
    tied: dict[str, str] = {}
    for kind, named in (("p", model.named_parameters(remove_duplicate=False)),
                        ("b", model.named_buffers(remove_duplicate=False))):
        for name, tensor in named:
            tensors.append(f"{kind}:{name}:{tuple(tensor.shape)}:{tensor.dtype}:{type(tensor).__name__}")
            if id(tensor) in first_name:
                tied[name] = first_name[id(tensor)]
            else:
                first_name[id(tensor)] = name
    digest = hashlib.sha256("\n".join(sorted(tensors)).encode()).hexdigest()
    return {"tensors": digest, "count": len(tensors), "tied": dict(sorted(tied.items()))}


class CacheMismatch(RuntimeError):
    """A cache entry read back as a different model than the one written."""


class QuantizedCache:
    """Entries under `root`: find, load, store, evict. Thread-safe; cheap to ask (a few stats)."""

    ENTRY_RE = _ENTRY_RE  # an entry folder's name; the OpenVINO export cache (utils/runtimes/) has its own
    kind = "quantized cache"

    def __init__(self, root: Path, *, enabled: bool = True, max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.enabled, self.max_bytes = enabled, max_bytes
        self._lock = threading.Lock()
        self._writing: set[str] = set()  # our own temporary folders being written
        self._swept = False

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> "QuantizedCache":
        return cls(settings.quant_cache_path, enabled=settings.quant_cache, max_bytes=settings.quant_cache_max_bytes)

    def reconfigure(self, settings: ServerSettings) -> None:
        """A config reload: the switch and the cap apply to the next load (the folder is restart-only)."""
        self.enabled, self.max_bytes = settings.quant_cache, settings.quant_cache_max_bytes

    # ------------------------------------------------------------------ identity and lookup

    def identity(self, spec: ModelSpec, device: str, model_class: Any, kwargs: dict) -> Identity:
        """The id a load of `spec` on `device` with these from_pretrained kwargs must find."""
        config = kwargs.get("quantization_config")
        parts = {
            "format": FORMAT,
            "source": source_files(spec.path),
            "model_class": getattr(model_class, "__name__", str(model_class)),
            "kwargs": {k: v for k, v in kwargs.items()
                       if k not in ("quantization_config", "device_map", "max_memory", "attn_implementation")},
            "quantization": spec.quantization,
            "quantization_config": config.to_dict() if config is not None else None,
            "device_type": device.split(":")[0],
            "versions": _versions(),
        }
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return Identity(key=spec.key, quantization=spec.quantization, id=digest, parts=parts)

    def find(self, ident: Identity) -> Path | None:
        """The entry's folder when it is complete and unchanged; an invalid one is removed."""
        found = self._valid(ident)
        return found[0] if found else None

    def _valid(self, ident: Identity) -> tuple[Path, dict] | None:
        folder = self.root / ident.name
        if not folder.is_dir():
            return None
        meta, problem = self._read(folder, ident)
        if problem:
            log.warning("%s: quantized cache entry %s is not served (%s); it will be rebuilt", ident.key,
                        folder.name, problem)
            self._remove(folder)
            return None
        return folder, meta

    @staticmethod
    def _read(folder: Path, ident: Identity) -> tuple[dict, str | None]:
        """entry.json, and what makes the entry unservable (None when nothing does)."""
        try:
            meta = json.loads((folder / META_NAME).read_text())
        except FileNotFoundError:
            return {}, "incomplete: no entry.json"
        except (OSError, ValueError) as exc:
            return {}, f"unreadable entry.json: {exc}"
        if meta.get("id") != ident.id or meta.get("format") != FORMAT:
            return meta, "written for another source, setting or version"
        files = meta.get("files")
        if not isinstance(files, dict) or not files:
            return meta, "entry.json lists no files"
        for name, (size, mtime_ns) in files.items():
            try:
                stat = (folder / name).stat()
            except OSError:
                return meta, f"{name} is missing"
            if stat.st_size != size or stat.st_mtime_ns != mtime_ns:
                return meta, f"{name} changed since it was written ({stat.st_size} bytes, {size} written)"
        return meta, None

    # ------------------------------------------------------------------ the load

    def load(self, spec: ModelSpec, device: str, model_class: Any, kwargs: dict) -> Any:
        """`model_class.from_pretrained` for a quantized load: from the cache when a valid entry
        exists, else from the source (and the result is written to the cache)."""
        if not self.enabled or kwargs.get("quantization_config") is None:
            return model_class.from_pretrained(spec.path, **kwargs)
        ident = self.identity(spec, device, model_class, kwargs)
        found = self._valid(ident)
        if found is not None:
            folder, meta = found
            started = time.perf_counter()
            try:
                cached = {k: v for k, v in kwargs.items() if k != "quantization_config"}
                model = model_class.from_pretrained(folder, **cached)
                self._check_same(model, meta)
                check_loaded_weights(model)
                if meta.get("cpu_layout"):
                    bnb_cpu_layout.apply(model, folder, meta["cpu_layout"])
            except Exception as exc:
                model = None
                if is_out_of_memory(exc):  # the entry is fine; the device is full
                    raise
                log.warning("%s: quantized cache entry %s could not be served (%s: %s); rebuilding it from the "
                            "source", spec.key, folder.name, type(exc).__name__, str(exc)[:300])
                self._remove(folder)
            else:
                self._touch(folder)
                log.info("%s: read %s weights from the quantized cache in %.2fs", spec.key, spec.quantization,
                         time.perf_counter() - started)
                return model
            release_cached_memory()  # what the failed read held, before the source load takes its room
        model = model_class.from_pretrained(spec.path, **kwargs)
        check_loaded_weights(model)  # a broken model is never cached
        try:
            self.store(model, spec, ident)
        except Exception as exc:  # the cache never fails a load
            log.warning("%s: could not write the quantized cache (%s: %s); the model serves as loaded", spec.key,
                        type(exc).__name__, str(exc)[:300])
        return model

    @staticmethod
    def _check_same(model: Any, meta: dict) -> None:
        """Raises CacheMismatch unless `model` is the model the entry was written from (ties that a save
        undid are tied again first when both tensors hold the same values)."""
        expected = meta.get("signature") or {}
        found = model_signature(model)
        missing = {t: s for t, s in (expected.get("tied") or {}).items() if found["tied"].get(t) != s}
        if missing:
            _retie(model, missing)
            found = model_signature(model)
        if found["tied"] != expected.get("tied"):
            raise CacheMismatch(f"tied weights differ: written {expected.get('tied')}, read {found['tied']}")
        if (found["tensors"], found["count"]) != (expected.get("tensors"), expected.get("count")):
            raise CacheMismatch("parameters or buffers differ from those written (names, shapes, dtypes or types)")

    # ------------------------------------------------------------------ writing

    def store(self, model: Any, spec: ModelSpec, ident: Identity) -> Path | None:
        """Writes `model` (just quantized from spec.path) as the entry of `ident`; returns its folder,
        or None when it was not written (too big for the cap or the disk)."""
        size = int(model.get_memory_footprint())
        if self.max_bytes is not None and size > self.max_bytes:
            log.info("%s: not cached: ~%d MiB quantized is over quant_cache_max_gb", spec.key, size >> 20)
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        self.sweep_leftovers()
        free = shutil.disk_usage(self.root).free
        if free < size + DISK_RESERVE_BYTES:
            log.warning("%s: not cached: ~%d MiB quantized, %d MiB free on the cache's disk", spec.key, size >> 20,
                        free >> 20)
            return None
        started = time.perf_counter()
        with self._new_entry(ident) as tmp:
            model.save_pretrained(tmp)  # before any forward pass: bitsandbytes' CPU repack would alter it
            layout = None
            if spec.quantization == "4bit":
                try:
                    layout = bnb_cpu_layout.save(model, tmp)
                except Exception as exc:  # the entry serves without it (repacked at the first request)
                    log.warning("%s: CPU layout not cached (%s: %s)", spec.key, type(exc).__name__, str(exc)[:200])
            for item in Path(spec.path).iterdir():  # e.g. Omni's spk_dict.pt, which from_pretrained wants
                target = tmp / item.name
                if item.is_file() and not item.name.startswith(".") and not _is_weight_file(item.name) \
                        and not target.exists():
                    shutil.copy2(item, target)
            final = self._publish(tmp, ident, {"signature": model_signature(model), "cpu_layout": layout})
        if final is None:  # another process wrote it first (find() removed any invalid one): keep that
            other = self.root / ident.name
            return other if other.is_dir() else None
        log.info("%s: wrote the %s model to the quantized cache (%s, %d MiB) in %.1fs", spec.key, spec.quantization,
                 final.name, _folder_bytes(final) >> 20, time.perf_counter() - started)
        self._remove_superseded(ident)
        self.enforce_cap(keep=final)
        return final

    @contextmanager
    def _new_entry(self, ident: Identity) -> Iterator[Path]:
        """A folder to write ident's entry in, which sweeps leave alone while it is written; gone on
        the way out unless _publish renamed it."""
        tmp = self.root / f"{TMP_PREFIX}{ident.name}-{os.getpid()}-{secrets.token_hex(4)}"
        with self._lock:
            self._writing.add(tmp.name)
        try:
            yield tmp
        finally:
            with self._lock:
                self._writing.discard(tmp.name)
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _publish(self, tmp: Path, ident: Identity, extra: dict) -> Path | None:
        """Completes the entry written in `tmp`: its meta (file list, sizes, what it was built from,
        `extra`) goes last, since an entry without it is incomplete, then one rename makes it visible.
        Returns its folder, or None when another process renamed its copy first."""
        files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {"format": FORMAT, "id": ident.id, "key": ident.key, "quantization": ident.quantization,
                "created": time.time(), "built_from": ident.parts, "files": files,
                "bytes": sum(size for size, _ in files.values())} | extra
        _write_json(tmp / META_NAME, meta)
        final = self.root / ident.name
        try:
            os.rename(tmp, final)
        except OSError:
            log.info("%s: another process wrote %s first", ident.key, final.name)
            return None
        self._touch(final)
        return final

    def _remove_superseded(self, ident: Identity) -> None:
        """Other entries of the same model and quantization: built from an older source or setting."""
        for folder, key, quant, entry_id in self._entries():
            if key == ident.key and quant == ident.quantization and entry_id != ident.id:
                log.info("%s: removing the superseded quantized cache entry %s", key, folder.name)
                self._remove(folder)

    def enforce_cap(self, keep: Path | None = None) -> list[str]:
        """Removes least recently used entries (never `keep`) until the cache fits its cap."""
        if self.max_bytes is None:
            return []
        entries = sorted(((self._last_used(folder), folder) for folder, *_ in self._entries()),
                         key=lambda item: item[0])
        sizes = {folder: _folder_bytes(folder) for _, folder in entries}
        total = sum(sizes.values())
        removed = []
        for _, folder in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and folder == keep:
                continue
            log.info("quantized cache over its cap (%d MiB > %d MiB): removing %s, least recently used",
                     total >> 20, self.max_bytes >> 20, folder.name)
            self._remove(folder)
            total -= sizes[folder]
            removed.append(folder.name)
        return removed

    def sweep_leftovers(self) -> list[str]:
        """Removes temporary folders of writes that died (a crash mid-write): ours not being written
        any more, another process's once it is gone or older than STALE_TMP_SECONDS."""
        removed = []
        if not self.root.is_dir():
            return removed
        for folder in self.root.iterdir():
            if not folder.name.startswith(TMP_PREFIX):
                continue
            with self._lock:
                if folder.name in self._writing:
                    continue
            match = re.search(r"-(\d+)-[0-9a-f]{8}$", folder.name)
            pid = int(match.group(1)) if match else None
            try:
                age = time.time() - folder.stat().st_mtime
            except OSError:
                continue
            if pid is not None and pid != os.getpid() and _alive(pid) and age < STALE_TMP_SECONDS:
                continue
            log.info("removing %s, left by an interrupted quantized cache write", folder.name)
            self._remove(folder)
            removed.append(folder.name)
        return removed

    # ------------------------------------------------------------------ status

    def usage(self) -> dict[str, int]:
        """Bytes on disk per model key (every complete entry of that key)."""
        out: dict[str, int] = {}
        for folder, key, _, _ in self._entries():
            out[key] = out.get(key, 0) + _folder_bytes(folder)
        return out

    def status(self) -> dict:
        """For /admin: the switch, the cap, the total and each entry (no absolute paths)."""
        entries = []
        for folder, key, quant, entry_id in self._entries():
            entries.append({"key": key, "quantization": quant, "id": entry_id, "bytes": _folder_bytes(folder),
                            "last_used": self._last_used(folder)})
        return {"enabled": self.enabled, "max_bytes": self.max_bytes, "bytes": sum(e["bytes"] for e in entries),
                "entries": entries}

    # ------------------------------------------------------------------ helpers

    def _entries(self) -> Iterator[tuple[Path, str, str, str]]:
        try:
            folders = sorted(self.root.iterdir()) if self.root.is_dir() else []
        except OSError:
            folders = []
        for folder in folders:
            match = self.ENTRY_RE.match(folder.name)
            if match and folder.is_dir():
                yield folder, match["key"], match["quant"], match["id"]

    @staticmethod
    def _last_used(folder: Path) -> float:
        try:
            return folder.stat().st_mtime
        except OSError:
            return 0.0

    @staticmethod
    def _touch(folder: Path) -> None:
        try:
            os.utime(folder)
        except OSError:
            pass

    @staticmethod
    def _remove(folder: Path) -> None:
        """Renames the folder out of the way first, so nobody finds half of it while it is deleted."""
        if not folder.exists():
            return
        doomed = folder.with_name(f"{TMP_PREFIX}removing-{folder.name}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.rename(folder, doomed)
        except OSError:
            doomed = folder
        shutil.rmtree(doomed, ignore_errors=True)


def _retie(model: Any, pairs: dict[str, str]) -> None:
    """Ties target -> source again for each pair whose two tensors hold equal values."""
    import torch  # deferred: torch

    for target, source in pairs.items():
        try:
            target_param, source_param = model.get_parameter(target), model.get_parameter(source)
        except AttributeError:
            continue
        if target_param.shape != source_param.shape or not torch.equal(target_param, source_param):
            continue
        parent_name, _, name = target.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, name, source_param)


def _folder_bytes(folder: Path) -> int:
    total = 0
    try:
        for item in folder.iterdir():
            try:
                total += item.stat().st_size if item.is_file() else 0
            except OSError:
                pass
    except OSError:
        pass
    return total


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------- building ahead of time

def build_quantized_cache(settings: ServerSettings, keys: Sequence[str]) -> list[dict]:
    """Writes the cache entry of every quantized model among `keys` that has none yet (main.py
    --download / --download-only). One model at a time, each released before the next; a failure is
    reported and the others go on. Returns one row per key: key, status (built / present / skipped /
    failed), reason, bytes, seconds."""
    cache = QuantizedCache.from_settings(settings)
    report = []
    for key in dict.fromkeys(keys):
        spec = settings.models[key]
        if spec.runtime != "pytorch":  # exported instead (utils/runtimes/exporter.build_openvino_exports)
            continue
        row: dict[str, Any] = {"key": key, "quantization": spec.quantization, "status": "skipped", "reason": None,
                               "bytes": 0, "seconds": 0.0}
        report.append(row)
        started = time.perf_counter()
        if spec.quantization == "none":
            row["reason"] = "not quantized"
            continue
        if not cache.enabled:
            row["reason"] = "quant_cache is off"
            continue
        if checkpoint_state(spec.path) != "downloaded":
            row["status"], row["reason"] = "failed", f"no complete checkpoint in {spec.path.name}/"
            continue
        try:
            device = default_device_resolver(spec)
            family = family_class(spec.family)
            model_class, kwargs = family.weights(spec, device)
            ident = cache.identity(spec, device, model_class, kwargs)
            folder = cache.find(ident)
            if folder is None:
                adapter = load_family(spec, device, cache=cache)
                adapter.release()
                del adapter
                release_cached_memory()
                folder = cache.find(ident)
                row["status"] = "built" if folder is not None else "failed"
                if folder is None:
                    row["reason"] = "not written (over the cap or the free disk; see the log)"
            else:
                row["status"] = "present"
            row["device"] = device
            row["bytes"] = _folder_bytes(folder) if folder is not None else 0
        except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the others
            log.debug("%s: building the quantized cache failed", key, exc_info=True)
            row["status"], row["reason"] = "failed", f"{type(exc).__name__}: {str(exc)[:300]}"
        row["seconds"] = round(time.perf_counter() - started, 2)
    return report


def format_cache_report(report: Sequence[dict]) -> str:
    """A table: key, quantization, status, size, seconds, reason."""
    rows = [("KEY", "QUANT", "CACHE", "SIZE", "SECONDS", "REASON")]
    for r in report:
        rows.append((r["key"], r["quantization"], r["status"], f"{r['bytes'] / 2**20:.0f} MiB" if r["bytes"] else "-",
                     f"{r['seconds']:.1f}", r["reason"] or ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1]).rstrip()
                     for row in rows)
