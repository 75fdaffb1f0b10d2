"""Downloads model checkpoints from the Hugging Face Hub into each model's local folder.

CLI:     python -m utils.download_model --model KEY [KEY ...] | --all
                [--path DIR] [--revision REV] [--config models.yaml] [--token TOKEN]
                [--reserve-bytes N] [--max-workers N] [--no-progress] [--json]
Library: download_models(settings, keys) -> list[DownloadResult]   (main.py --download)
         what a folder holds (checkpoint_state, checkpoint_bytes, read_manifest): utils/hub/model_folder.py

Per model: ask the Hub for the file list with sizes (one `model_info` call, resolving the revision to a
commit sha), keep only the files a load needs (safetensors weights, JSON configs, tokenizer and
processor files, chat templates, Qwen2.5-Omni's spk_dict.pt; *.bin only when the repo has no
safetensors at all), check free disk space for what is still missing BEFORE writing anything, then
`huggingface_hub.snapshot_download(local_dir=<model folder>)` pinned to that sha, verify sizes, and
write `.download.json` (repo, revision, sha, files and sizes, finished_at).

What huggingface_hub 2.4 does underneath (checked against tests/hub_server.py):
- A dropped connection is resumed within the run with a `Range` request (http_get retries up to 5
  times without progress). Across runs the unit of resume is the file: finished files are skipped
  (per-file metadata in <folder>/.cache/huggingface/download/), and a file cut off by a killed run is
  fetched again from its start; the killed run's `*.incomplete` temp file is never reused, so this
  module deletes such leftovers (while holding the folder's download lock).
- hf_xet, when installed, is used automatically for files the Hub serves from Xet storage (the HEAD
  answer carries X-Xet-Hash); HF_HUB_DISABLE_XET=1 turns it off. hf_transfer is NOT used by
  huggingface_hub 2.x (HF_HUB_ENABLE_HF_TRANSFER only prints a deprecation warning).
- Progress: snapshot_download shows one "Fetching N files" bar and one aggregated bytes bar (2.4 folds
  the per-file bars into these); the per-file plan is logged before the transfer starts. Bars are off
  when stderr is not a terminal or HF_HUB_DISABLE_PROGRESS_BARS=1.
- HF_TOKEN (or a saved `hf auth login` token) is read by huggingface_hub; `--token` / token= overrides.
- HF_HUB_OFFLINE=1: nothing touches the network; complete folders are reported ok, others failed.
- HF_ENDPOINT / HF_HUB_OFFLINE are read by huggingface_hub when it is imported.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import glob
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Sequence

import filelock

from utils.config.settings import ServerSettings, load_settings
from utils.errors import ConfigError, UnknownModel
# (checkpoint_state, select_files, ... are imported from here by older code: kept importable)
from utils.hub.model_folder import (HF_DIR as _HF_DIR, MANIFEST_NAME, STATES, FileSelection,  # noqa: F401
                                    checkpoint_bytes, checkpoint_state, download_leftovers as _leftovers, read_manifest,
                                    select_files, size_or_none as _size_or_none)

log = logging.getLogger(__name__)

LOCAL_REPO = "(local)"  # the repo shown for a model configured with a local path and no repo_id
_LOCK_NAME = ".download.lock"
DEFAULT_RESERVE_BYTES = 1 << 30  # keep 1 GiB free after a download (logs, temp files)
RESERVE_ENV = "DOWNLOAD_RESERVE_BYTES"


@dataclass
class DownloadResult:
    key: str
    repo_id: str
    revision: str
    path: Path
    status: str = "failed"  # ok | failed | skipped
    reason: str = ""
    sha: str | None = None
    bytes: int = 0  # size of the selected files (the checkpoint as downloaded)
    fetched_bytes: int = 0  # bytes that were missing before this run
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "skipped")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["path"] = str(self.path)
        out["seconds"] = round(self.seconds, 3)
        return out


# ------------------------------------------------------------------------------------ helpers

def parse_bytes(text: str | int) -> int:
    """'1073741824', '500M', '1.5GB', '2GiB' -> bytes (K/M/G/T are powers of 1000, KiB/MiB... of 1024)."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?)b?\s*", str(text), re.IGNORECASE)
        if not m:
            raise ValueError(f"not a size: {text!r} (examples: 0, 500M, 2GB, 1GiB)")
        base = 1024 if m.group(3) else 1000
        value = int(float(m.group(1)) * base ** " kmgt".index(m.group(2).lower() or " "))
    if value < 0:
        raise ValueError(f"size must be >= 0, got {text!r}")
    return value


def reserve_bytes_from_env(env: Mapping[str, str] | None = None) -> int:
    """DOWNLOAD_RESERVE_BYTES (bytes to leave free after a download), default 1 GiB."""
    env = os.environ if env is None else env
    raw = env.get(RESERVE_ENV)
    if raw in (None, ""):
        return DEFAULT_RESERVE_BYTES
    try:
        return parse_bytes(raw)
    except ValueError as exc:
        raise ConfigError(f"{RESERVE_ENV}: {exc}") from None


def format_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _free_bytes(target: Path) -> tuple[int, Path]:
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free, probe


def _offline() -> bool:
    from huggingface_hub import constants  # deferred: huggingface_hub

    return bool(constants.HF_HUB_OFFLINE)


def _xet_note() -> str:
    from huggingface_hub import constants  # deferred: huggingface_hub

    if importlib.util.find_spec("hf_xet") is None:
        return "plain HTTP (hf_xet not installed)"
    if constants.HF_HUB_DISABLE_XET:
        return "plain HTTP (HF_HUB_DISABLE_XET=1)"
    return "hf_xet for Xet-backed files, HTTP otherwise"


def _silent_tqdm():
    from huggingface_hub.utils import tqdm as hf_tqdm  # deferred: huggingface_hub

    class _Silent(hf_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return _Silent


def _first_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def explain_error(exc: BaseException, repo_id: str, revision: str, endpoint: str | None = None) -> str:
    """One clear sentence for a failed download."""
    import httpx2  # deferred: httpx2
    from huggingface_hub import constants  # deferred: huggingface_hub
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError,  # deferred: huggingface_hub
                                        LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    hub = endpoint or constants.ENDPOINT
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError):
        return (f"gated repo (HTTP {status}): accept the model's terms at {hub}/{repo_id} with the account "
                "whose token you use (HF_TOKEN or --token)")
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {revision!r} not found in {repo_id}"
    if isinstance(exc, RepositoryNotFoundError):
        if status == 401:
            return ("authentication required (HTTP 401): the repo is private or gated, or does not exist; "
                    "set HF_TOKEN or pass --token with a token that can read it")
        return f"repository not found (HTTP {status or 404}): check repo_id {repo_id!r} in the config"
    if isinstance(exc, HfHubHTTPError) and status in (401, 403):
        detail = (getattr(exc, "server_message", None) or "").strip().splitlines()
        return (f"the token was rejected (HTTP {status}{': ' + detail[0][:200] if detail else ''}); "
                "check HF_TOKEN / --token")
    if isinstance(exc, OfflineModeIsEnabled):
        return "offline mode (HF_HUB_OFFLINE=1): network access is disabled"
    if isinstance(exc, (httpx2.TransportError, LocalEntryNotFoundError)):
        return f"cannot reach the hub at {hub}: {_first_line(exc)[:300]}"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"disk full while writing: {exc}"
    return _first_line(exc)[:500]


# ------------------------------------------------------------------------------------ downloading

def _write_manifest(target: Path, *, repo_id: str, revision: str, sha: str, files: dict[str, int | None],
                    weights_format: str) -> None:
    manifest = {
        "repo_id": repo_id,
        "revision": revision,
        "sha": sha,
        "weights_format": weights_format,
        "files": files,
        "total_bytes": sum(v or 0 for v in files.values()),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    tmp = target / f"{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, target / MANIFEST_NAME)


def _local_result(result: DownloadResult) -> DownloadResult:
    """A model with no repo_id is a local folder: nothing is fetched; it is ok when complete."""
    state = checkpoint_state(result.path)
    if state == "downloaded":
        result.status, result.reason = "skipped", "local folder (no repo_id)"
        result.bytes = checkpoint_bytes(result.path)
    else:
        result.status = "failed"
        result.reason = f"local folder (no repo_id) holds no complete checkpoint ({state}); put the checkpoint there"
    return result


def _offline_result(result: DownloadResult) -> DownloadResult:
    state = checkpoint_state(result.path)
    manifest = read_manifest(result.path) or {}
    if state != "downloaded":
        result.reason = (f"offline mode (HF_HUB_OFFLINE=1) and the checkpoint is {state.replace('_', ' ')} "
                         f"at {result.path}; unset HF_HUB_OFFLINE to download it")
        return result
    on_disk = {manifest.get("revision"), manifest.get("sha")} - {None}
    if on_disk and result.revision not in on_disk and not str(manifest.get("sha", "")).startswith(result.revision):
        result.reason = (f"offline mode (HF_HUB_OFFLINE=1): {result.path} holds revision "
                         f"{manifest.get('revision')} ({str(manifest.get('sha'))[:12]}), not {result.revision!r}")
        return result
    result.status = "ok"
    result.sha = manifest.get("sha")
    result.bytes = int(manifest.get("total_bytes") or checkpoint_bytes(result.path))
    result.files = sorted(manifest.get("files", {}))
    result.reason = "offline mode: complete on disk, not checked for updates"
    return result


def _download_one(result: DownloadResult, *, token: str | None, reserve_bytes: int, endpoint: str | None,
                  progress: bool, max_workers: int, code: bool = False) -> DownloadResult:
    from huggingface_hub import HfApi, snapshot_download  # deferred: huggingface_hub

    target = result.path
    info = HfApi(endpoint=endpoint, token=token).model_info(
        result.repo_id, revision=result.revision, files_metadata=True, token=token)
    sha = info.sha
    sizes_remote = {s.rfilename: s.size for s in info.siblings or []}
    selection = select_files(sizes_remote, code=code)
    result.sha = sha
    if selection.weights_format == "none":
        result.reason = (f"no loadable weights in {result.repo_id}@{result.revision}: "
                         "no *.safetensors and no *.bin files")
        return result
    if selection.weights_format == "bin":
        result.notes.append("the repo has no *.safetensors; downloaded the *.bin weights instead")
    files = {name: sizes_remote[name] for name in selection.files}
    result.files = list(files)
    result.bytes = sum(v or 0 for v in files.values())

    def complete(name: str) -> bool:
        on_disk = _size_or_none(target / name)
        return on_disk is not None and (on_disk == files[name] if files[name] is not None else on_disk > 0)

    missing = [name for name in files if not complete(name)]
    remaining = sum(files[name] or 0 for name in missing)
    manifest = read_manifest(target)
    if (not missing and manifest and manifest.get("sha") == sha and not _leftovers(target)
            and set(files) <= set(manifest["files"])):
        result.status, result.reason = "skipped", f"already downloaded at {sha[:12]}"
        return result

    free, probe = _free_bytes(target)
    if free < remaining + reserve_bytes:
        result.reason = (f"not enough disk space on {probe}: {format_bytes(remaining)} to download "
                         f"({len(missing)} files) + {format_bytes(reserve_bytes)} reserve > "
                         f"{format_bytes(free)} free; free up space, use --path on a larger disk, "
                         f"or lower {RESERVE_ENV} / --reserve-bytes")
        return result

    log.info("%s: %s@%s (%s) -> %s", result.key, result.repo_id, result.revision, sha[:12], target)
    log.info("%s: %d files, %s; to fetch: %d files, %s; free: %s; transfer: %s", result.key, len(files),
             format_bytes(result.bytes), len(missing), format_bytes(remaining), format_bytes(free), _xet_note())
    for name in files:
        log.info("  %s %10s  %s", "fetch" if name in missing else "have ", format_bytes(files[name]), name)

    hf_dir = target / _HF_DIR
    hf_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = filelock.FileLock(str(hf_dir / _LOCK_NAME), timeout=0)
        with lock:
            for leftover in _leftovers(target):  # temp files of killed runs: never reused by huggingface_hub
                log.info("%s: removing leftover %s", result.key, leftover.name)
                leftover.unlink(missing_ok=True)
            if missing:
                (target / MANIFEST_NAME).unlink(missing_ok=True)
            snapshot_download(
                result.repo_id, revision=sha, local_dir=target, token=token, endpoint=endpoint,
                allow_patterns=[glob.escape(name) for name in files], max_workers=max_workers,
                tqdm_class=None if progress else _silent_tqdm(),
            )
            wrong = [f"{name} ({_size_or_none(target / name)} bytes, expected {files[name]})"
                     for name in files if not complete(name)]
            if wrong:
                result.reason = "incomplete after download: " + ", ".join(wrong[:5])
                return result
            for leftover in _leftovers(target):
                leftover.unlink(missing_ok=True)
            _write_manifest(target, repo_id=result.repo_id, revision=result.revision, sha=sha, files=files,
                            weights_format=selection.weights_format)
    except filelock.Timeout:
        result.reason = f"another download into {target} is running (lock {hf_dir / _LOCK_NAME})"
        return result
    result.status = "ok"
    result.fetched_bytes = remaining
    return result


def download_models(settings: ServerSettings, keys: Sequence[str], *, path: Path | None = None,
                    revision: str | None = None, progress: bool = True, token: str | None = None,
                    reserve_bytes: int = DEFAULT_RESERVE_BYTES, endpoint: str | None = None,
                    max_workers: int = 8) -> list[DownloadResult]:
    """Downloads each model into spec.path (or <path>/<key>); one DownloadResult per key, in order.

    Raises UnknownModel for keys not in settings (naming the valid ones). Per-model failures never raise:
    they come back as status "failed" with a reason. `revision` overrides every spec's revision; `token`
    overrides HF_TOKEN; `endpoint` overrides HF_ENDPOINT. Offline mode (HF_HUB_OFFLINE=1 when
    huggingface_hub was imported) makes no network call.
    """
    unknown = [k for k in keys if k not in settings.models]
    if unknown:
        raise UnknownModel(f"unknown model key(s): {', '.join(unknown)}; valid keys: "
                           f"{', '.join(settings.models)}")
    offline = _offline()
    results = []
    for key in dict.fromkeys(keys):
        spec = settings.models[key]
        target = (Path(path).expanduser().resolve() / key) if path is not None else Path(spec.path)
        result = DownloadResult(key=key, repo_id=spec.repo_id or LOCAL_REPO, revision=revision or spec.revision,
                                path=target)
        started = time.monotonic()
        try:
            if not spec.repo_id:
                _local_result(result)
            elif offline:
                _offline_result(result)
            else:
                _download_one(result, token=token, reserve_bytes=reserve_bytes, endpoint=endpoint,
                              progress=progress, max_workers=max_workers, code=spec.trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the others
            log.debug("%s: download failed", key, exc_info=True)
            result.status = "failed"
            result.reason = explain_error(exc, spec.repo_id, result.revision, endpoint)
        result.seconds = time.monotonic() - started
        log.info("%s: %s%s", key, result.status, f" ({result.reason})" if result.reason else "")
        results.append(result)
    return results


def format_summary(results: Sequence[DownloadResult]) -> str:
    """A table: key, repo, status, size, fetched, seconds, reason (notes appended to the reason)."""
    header = ("KEY", "REPO", "STATUS", "SIZE", "FETCHED", "SECONDS", "REASON")
    rows = [header]
    for r in results:
        reason = "; ".join([r.reason] * bool(r.reason) + r.notes)
        rows.append((r.key, r.repo_id, r.status, format_bytes(r.bytes) if r.bytes else "-",
                     format_bytes(r.fetched_bytes) if r.fetched_bytes else "-", f"{r.seconds:.1f}", reason))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    failed = sum(1 for r in results if not r.ok)
    lines.append(f"{len(results) - failed} of {len(results)} ok" + (f", {failed} failed" if failed else ""))
    return "\n".join(line.rstrip() for line in lines)


# ------------------------------------------------------------------------------------ CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m utils.download_model",
        description="Download model checkpoints from the Hugging Face Hub into their local folders.",
        epilog="Environment: HF_TOKEN (token), HF_ENDPOINT (hub URL), HF_HUB_OFFLINE=1 (no network), "
               "HF_HUB_DISABLE_XET=1 (plain HTTP), HF_HUB_DISABLE_PROGRESS_BARS=1, "
               f"{RESERVE_ENV} (default 1GiB). Exit status 0 when every model is ok or skipped, "
               "1 when any failed, 2 on usage or config errors.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", nargs="+", metavar="KEY", help="model key(s) from the config")
    which.add_argument("--all", action="store_true", help="every model in the config")
    p.add_argument("--path", type=Path, metavar="DIR", help="download into DIR/<key> instead of each model's configured path")
    p.add_argument("--revision", help="branch, tag or commit to download (default: the model's revision)")
    p.add_argument("--config", help="models.yaml to read (default: MODELS_CONFIG or ./models.yaml)")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    p.add_argument("--reserve-bytes", metavar="N",
                   help=f"bytes to leave free after the download, e.g. 0, 500M, 2GiB (default: {RESERVE_ENV} or 1GiB)")
    p.add_argument("--max-workers", type=int, default=8, metavar="N", help="files downloaded in parallel (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not log.handlers and not logging.getLogger().handlers:  # the plan and per-model lines, to stderr
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO)
    try:
        settings = load_settings(args.config)
        reserve = parse_bytes(args.reserve_bytes) if args.reserve_bytes is not None else reserve_bytes_from_env()
        keys = list(settings.models) if args.all else args.model
        if args.max_workers < 1:
            raise ValueError("--max-workers must be >= 1")
        results = download_models(settings, keys, path=args.path, revision=args.revision,
                                  progress=not args.no_progress, token=args.token, reserve_bytes=reserve,
                                  max_workers=args.max_workers)
    except (ConfigError, UnknownModel, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume (finished files are kept)", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        print(format_summary(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
