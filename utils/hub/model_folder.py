"""What a model folder holds: the one module that answers it for the downloader, the settings (which
folder to serve from), the quantized cache and the admin reports. Which files of a Hub repo a load
needs (select_files), which weight files a folder's load reads, whether the checkpoint is complete
(checkpoint_state), its size, and the `.download.json` manifest a finished download wrote."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

MANIFEST_NAME = ".download.json"
HF_DIR = Path(".cache") / "huggingface"  # huggingface_hub's per-folder metadata (local_dir downloads)

# What a load reads. `*.json` covers config, generation_config, tokenizer(_config), special_tokens_map,
# added_tokens, preprocessor/processor config, chat_template.json and the safetensors index.
ALLOW_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer.model", "*.tiktoken",
                  "merges.txt", "vocab.*", "*.jinja", "spk_dict.pt")
# Copies of the weights in other formats, and their indexes: never needed next to safetensors.
IGNORE_PATTERNS = ("*.bin.index.json", "*.pt.index.json", "*.msgpack.index.json", "*.h5.index.json",
                   "onnx/*", "openvino/*", "coreml/*", "tflite/*", "mlx/*", "gguf/*", "original/*")
# A diffusers pipeline (model_index.json at the top): each component in its subfolder (transformer/,
# vae/, text_encoder/, tokenizer/, scheduler/, processor/). Files at the top other than model_index.json
# are single-file copies of the same weights (FLUX.1's flux1-schnell.safetensors, 24 GB): never needed.
PIPELINE_ALLOW_PATTERNS = ("model_index.json", "*/*.safetensors", "*/*.safetensors.index.json", "*/*.json",
                           "*/tokenizer.model", "*/spiece.model", "*/*.tiktoken", "*/merges.txt", "*/vocab.*",
                           "*/*.jinja")
PIPELINE_INDEX = "model_index.json"
# trust_remote_code models: the configuration_*.py / modeling_*.py / processing_*.py that auto_map names.
REMOTE_CODE_PATTERNS = ("*.py",)
# Used only when the repo has no *.safetensors at all.
BIN_PATTERNS = ("*.bin", "*.bin.index.json")
_BIN_EXCLUDE = ("training_args.bin", "optimizer.bin", "scheduler.bin", "rng_state*.bin")

STATES = ("not_downloaded", "partial", "downloaded")


@dataclass(frozen=True)
class FileSelection:
    files: tuple[str, ...]
    allow_patterns: tuple[str, ...]
    ignore_patterns: tuple[str, ...]
    weights_format: str  # "safetensors" | "bin" | "none"


# ------------------------------------------------------------------------------------ file selection

def select_files(repo_files: Iterable[str], *, code: bool = False) -> FileSelection:
    """The files of a repo that a load needs; *.bin weights only when there is no *.safetensors; the
    repo's Python files only for a model with trust_remote_code (`code`)."""
    from huggingface_hub.utils import filter_repo_objects  # deferred: huggingface_hub (reads HF_* when imported)

    names = sorted(set(repo_files))
    if PIPELINE_INDEX in names:
        allow, ignore, fmt = PIPELINE_ALLOW_PATTERNS, IGNORE_PATTERNS, "safetensors"
    elif any(name.endswith(".safetensors") for name in names):
        allow, ignore, fmt = ALLOW_PATTERNS, IGNORE_PATTERNS, "safetensors"
    else:
        allow = ALLOW_PATTERNS + BIN_PATTERNS
        ignore = tuple(p for p in IGNORE_PATTERNS if p != "*.bin.index.json") + _BIN_EXCLUDE
        fmt = "bin" if any(name.endswith(".bin") and "/" not in name for name in names) else "none"
    if code:
        allow = allow + REMOTE_CODE_PATTERNS
    files = tuple(filter_repo_objects(names, allow_patterns=list(allow), ignore_patterns=list(ignore)))
    return FileSelection(files, allow, ignore, fmt)


# ------------------------------------------------------------------------------------ state on disk

def read_manifest(path: Path) -> dict | None:
    """The `.download.json` a finished download wrote, or None (absent or unreadable)."""
    try:
        data = json.loads((Path(path) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return None
    return data


def download_leftovers(path: Path) -> list[Path]:
    """`*.incomplete` temp files of interrupted downloads under <path>/.cache/huggingface."""
    hf_dir = Path(path) / HF_DIR
    return sorted(hf_dir.rglob("*.incomplete")) if hf_dir.is_dir() else []


def weight_files(path: Path) -> list[Path]:
    """The weight files a load of `path` reads: the shards an index names, else the single files.

    Safetensors first; *.bin only when the folder has no safetensors weights. A diffusers pipeline:
    those of every component its model_index.json lists that has a config (a model, not a tokenizer).
    """
    if (path / PIPELINE_INDEX).is_file():
        return pipeline_weight_files(path)
    for suffix in (".safetensors", ".bin"):
        indexes = sorted(path.glob(f"*{suffix}.index.json"))
        if indexes:
            shards: set[str] = set()
            for index in indexes:
                try:
                    weight_map = json.loads(index.read_text()).get("weight_map") or {}
                    shards.update(str(v) for v in weight_map.values())
                except (OSError, ValueError, AttributeError):
                    weight_map = {}
                if not weight_map:  # unreadable or empty index: name a file that cannot exist
                    shards.add(f"<no weight_map in {index.name}>")
            return [path / shard for shard in sorted(shards)]
        singles = sorted(p for p in path.glob(f"*{suffix}") if p.is_file()
                         and not any(p.match(x) for x in _BIN_EXCLUDE))
        if singles:
            return singles
    return []


def pipeline_weight_files(path: Path) -> list[Path]:
    try:
        index = json.loads((path / PIPELINE_INDEX).read_text())
    except (OSError, ValueError):
        return [path / f"<unreadable {PIPELINE_INDEX}>"]
    files: list[Path] = []
    for name, value in sorted(index.items()):
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        folder = path / name
        if (folder / "config.json").is_file() or not folder.is_dir():  # a model (tokenizers have no config)
            found = weight_files(folder) if folder.is_dir() else []
            files += found or [folder / "<no weights>"]
    return files


def size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def checkpoint_state(path: Path) -> str:
    """"not_downloaded" | "partial" | "downloaded", from the files on disk.

    downloaded: config.json and every weight file present and non-empty (the shards named by
    model.safetensors.index.json, or model.safetensors; *.bin only in a folder without safetensors),
    no `*.incomplete` leftovers under .cache/huggingface, and, when `.download.json` exists, every file
    it lists present with the listed size. partial: anything else that is not an empty folder.
    """
    path = Path(path)
    if not path.is_dir():
        return "not_downloaded"
    leftovers = download_leftovers(path)
    content = [p for p in path.iterdir() if p.name != ".cache"]
    if not content and not leftovers:
        return "not_downloaded"
    if leftovers or not ((path / "config.json").is_file() or (path / PIPELINE_INDEX).is_file()):
        return "partial"
    weights = weight_files(path)
    if not weights or any(not size_or_none(w) for w in weights):
        return "partial"
    manifest = read_manifest(path)
    if manifest is not None:
        for name, size in manifest["files"].items():
            on_disk = size_or_none(path / name)
            if on_disk is None or (size is not None and on_disk != size):
                return "partial"
    return "downloaded"


def checkpoint_bytes(path: Path) -> int:
    """Bytes of the weight files present in `path` (what `weight_files` names); 0 when none."""
    return sum(size_or_none(w) or 0 for w in weight_files(Path(path)))
