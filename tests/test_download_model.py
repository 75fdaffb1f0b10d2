"""utils/download_model.py against tests/hub_server.py: the real huggingface_hub client, no mocks.

huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HUB_DISABLE_XET when it is imported, so every
scenario runs `python -m utils.download_model` in a subprocess (which also tests the CLI and its exit
status). `start_hub` / `HubServer` are re-exported here for other test modules.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    from tests.hub_server import HubServer, start_hub
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from hub_server import HubServer, start_hub

from utils.hub.download import (MANIFEST_NAME, checkpoint_bytes, checkpoint_state, parse_bytes, read_manifest,
                                  select_files)

__all__ = ["HubServer", "start_hub", "build_tiny_checkpoint", "run_download"]

ROOT = Path(__file__).resolve().parent.parent
REPO = "test-org/tiny-model"
BIG_REPO = "test-org/tiny-model-big-shard"
BIN_REPO = "test-org/bin-only"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
WANTED = {"config.json", "generation_config.json", "model.safetensors.index.json", *SHARDS, "tokenizer.json",
          "tokenizer_config.json", "chat_template.jinja"}
NOT_WANTED = {"pytorch_model.bin", "model.onnx", "onnx/model.onnx", "onnx/config.json", "flax_model.msgpack",
              "README.md", ".gitattributes"}


# ------------------------------------------------------------------------------------ checkpoints

def build_tiny_checkpoint(folder: Path, *, vocab_size: int = 128, hidden_size: int = 32,
                          max_shard_size: str | None = None) -> Path:
    """A random-weight Qwen3ForCausalLM (1 layer) with a WordLevel tokenizer and a chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    words = {f"w{i}": i for i in range(120)}
    words.update({"<unk>": 120, "<|endoftext|>": 121, "<|im_start|>": 122, "<|im_end|>": 123})
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=64, eos_token_id=123, pad_token_id=121, bos_token_id=None,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, Path]:
    import torch

    base = tmp_path_factory.mktemp("hub_repos")
    tiny = build_tiny_checkpoint(base / "tiny", max_shard_size="40KB")
    assert {p.name for p in tiny.glob("*.safetensors")} == set(SHARDS)
    # Copies of the weights in formats a load does not need: must never be fetched.
    torch.save({"w": torch.zeros(4)}, tiny / "pytorch_model.bin")
    (tiny / "model.onnx").write_bytes(os.urandom(4000))
    (tiny / "onnx").mkdir()
    (tiny / "onnx" / "model.onnx").write_bytes(os.urandom(100))
    (tiny / "onnx" / "config.json").write_text("{}")
    (tiny / "flax_model.msgpack").write_bytes(os.urandom(2000))
    (tiny / "README.md").write_text("# tiny\n")
    (tiny / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    # One safetensors file of ~16 MiB: huggingface_hub resumes from whole 10 MiB chunks.
    big = build_tiny_checkpoint(base / "big", vocab_size=16384, hidden_size=128)
    assert (big / "model.safetensors").stat().st_size > 13 * 2**20
    binonly = base / "binonly"
    binonly.mkdir()
    shutil.copy(tiny / "config.json", binonly / "config.json")
    torch.save({"w": torch.ones(8)}, binonly / "pytorch_model.bin")
    (binonly / "tf_model.h5").write_bytes(os.urandom(500))
    return {REPO: tiny, BIG_REPO: big, BIN_REPO: binonly}


@pytest.fixture
def hub(repos, tmp_path):
    server = start_hub(tmp_path, repos)
    yield server
    server.stop()


# ------------------------------------------------------------------------------------ helpers

def write_config(folder: Path, models: dict[str, str]) -> Path:
    lines = ["server: {models_dir: models}", "models:"]
    lines += [f"  {key}: {{repo_id: {repo}, family: text}}" for key, repo in models.items()]
    path = folder / "models.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_download(hub_url: str, home: Path, config: Path, *args: str, env: dict | None = None,
                 popen: bool = False, timeout: float = 60, script: bool = False):
    """`python -m utils.download_model --config CONFIG --no-progress ARGS` against the hub look-alike."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                             "MODELS_CONFIG", "MODELS_DIR", "DOWNLOAD_RESERVE_BYTES")}
    full_env.update(HF_ENDPOINT=hub_url, HF_HUB_DISABLE_XET="1", HF_HOME=str(home / "hf_home"),
                    HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DOWNLOAD_TIMEOUT="10", HF_HUB_ETAG_TIMEOUT="10",
                    NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    entry = ["utils/download_model.py"] if script else ["-m", "utils.download_model"]  # seed 001 ran the file
    cmd = [sys.executable, *entry, "--config", str(config), "--no-progress", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def row(output: str, key: str) -> str:
    """The summary-table line of `key`."""
    lines = [line for line in output.splitlines() if line.split(maxsplit=1)[:1] == [key]]
    assert len(lines) == 1, output
    return lines[0]


def fetched(server: HubServer, method: str = "GET") -> list[str]:
    """Repo paths of the files requested with `method` from /resolve/."""
    out = []
    for req in server.requests:
        parts = req.path.split("/")
        if req.method == method and len(parts) > 5 and parts[3] == "resolve":
            out.append("/".join(parts[5:]))
    return out


# ------------------------------------------------------------------------------------ pure parts

def test_select_files_keeps_what_a_load_needs():
    omni = ["config.json", "generation_config.json", "model-00001-of-00003.safetensors",
            "model.safetensors.index.json", "spk_dict.pt", "chat_template.json", "merges.txt", "vocab.json",
            "tokenizer_config.json", "preprocessor_config.json", "README.md", ".gitattributes", "pytorch_model.bin",
            "pytorch_model.bin.index.json", "onnx/model.onnx", "onnx/config.json", "flax_model.msgpack",
            "tf_model.h5", "model.gguf", "tokenizer.model", "qwen.tiktoken", "chat_template.jinja", "figures/x.png"]
    sel = select_files(omni)
    assert sel.weights_format == "safetensors"
    assert set(sel.files) == {"config.json", "generation_config.json", "model-00001-of-00003.safetensors",
                              "model.safetensors.index.json", "spk_dict.pt", "chat_template.json", "merges.txt",
                              "vocab.json", "tokenizer_config.json", "preprocessor_config.json",
                              "tokenizer.model", "qwen.tiktoken", "chat_template.jinja"}
    blip = ["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "vocab.txt",
            "tokenizer.json", "special_tokens_map.json"]
    assert set(select_files(blip).files) == {"config.json", "model.safetensors", "vocab.txt", "tokenizer.json",
                                             "special_tokens_map.json"}
    old = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
           "pytorch_model.bin.index.json", "training_args.bin", "tf_model.h5", "vocab.txt"]
    sel = select_files(old)
    assert sel.weights_format == "bin"
    assert set(sel.files) == {"config.json", "pytorch_model-00001-of-00002.bin",
                              "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "vocab.txt"}
    assert select_files(["config.json", "model.onnx"]).weights_format == "none"


def test_parse_bytes():
    assert parse_bytes("0") == 0
    assert parse_bytes("1536") == 1536
    assert parse_bytes("2GB") == 2_000_000_000
    assert parse_bytes("1GiB") == 2**30
    assert parse_bytes("1.5M") == 1_500_000
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_checkpoint_state_reads_the_files_not_just_config(tmp_path):
    ckpt = tmp_path / "m"
    assert checkpoint_state(ckpt) == "not_downloaded"
    ckpt.mkdir()
    assert checkpoint_state(ckpt) == "not_downloaded"
    (ckpt / "config.json").write_text("{}")
    assert checkpoint_state(ckpt) == "partial"  # config alone is not a checkpoint
    index = {"metadata": {}, "weight_map": {"a": SHARDS[0], "b": SHARDS[1], "c": SHARDS[1]}}
    (ckpt / "model.safetensors.index.json").write_text("{not json")
    assert checkpoint_state(ckpt) == "partial"  # unreadable index
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    (ckpt / SHARDS[0]).write_bytes(b"x" * 10)
    assert checkpoint_state(ckpt) == "partial"  # second shard missing
    (ckpt / SHARDS[1]).write_bytes(b"")
    assert checkpoint_state(ckpt) == "partial"  # empty shard
    (ckpt / SHARDS[1]).write_bytes(b"y" * 5)
    assert checkpoint_state(ckpt) == "downloaded"
    assert checkpoint_bytes(ckpt) == 15
    leftover = ckpt / ".cache" / "huggingface" / "download" / "abc.etag.1234.incomplete"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"z")
    assert checkpoint_state(ckpt) == "partial"  # an interrupted download left a temp file
    leftover.unlink()
    manifest = {"repo_id": REPO, "revision": "main", "sha": "0" * 40,
                "files": {"config.json": 2, SHARDS[0]: 10, SHARDS[1]: 5, "tokenizer.json": 7}}
    (ckpt / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert checkpoint_state(ckpt) == "partial"  # the manifest lists a file that is not there
    (ckpt / "tokenizer.json").write_text("x" * 6)
    assert checkpoint_state(ckpt) == "partial"  # ... or not with the listed size
    (ckpt / "tokenizer.json").write_text("x" * 7)
    assert checkpoint_state(ckpt) == "downloaded"
    assert read_manifest(ckpt)["sha"] == "0" * 40

    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text("{}")
    (single / "model.safetensors").write_bytes(b"w" * 3)
    assert checkpoint_state(single) == "downloaded" and checkpoint_bytes(single) == 3


# ------------------------------------------------------------------------------------ real downloads

def test_seed_001_command_python_utils_download_model_py_works(hub, repos, tmp_path):
    config = write_config(tmp_path, {"tiny": REPO})
    proc = run_download(hub.url, tmp_path, config, "--model", "tiny", script=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert checkpoint_state(tmp_path / "models" / "tiny") == "downloaded"


def test_full_download_fetches_only_load_files(hub, repos, tmp_path):
    config = write_config(tmp_path, {"tiny": REPO})
    proc = run_download(hub.url, tmp_path, config, "--model", "tiny")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert " ok " in row(proc.stdout, "tiny")
    target = tmp_path / "models" / "tiny"
    on_disk = {p.relative_to(target).as_posix() for p in target.rglob("*")
               if p.is_file() and ".cache" not in p.parts} - {MANIFEST_NAME}
    assert on_disk == WANTED
    for name in WANTED:
        assert (target / name).read_bytes() == (repos[REPO] / name).read_bytes(), name
    assert set(fetched(hub)) == WANTED
    assert not set(fetched(hub, "HEAD")) & NOT_WANTED
    assert checkpoint_state(target) == "downloaded"
    assert checkpoint_bytes(target) == sum((repos[REPO] / s).stat().st_size for s in SHARDS)
    manifest = read_manifest(target)
    assert manifest["repo_id"] == REPO and manifest["revision"] == "main" and manifest["sha"] == hub.sha(REPO)
    assert manifest["files"] == {n: (repos[REPO] / n).stat().st_size for n in WANTED}
    assert manifest["finished_at"]

    hub.clear_requests()  # a second run finds everything in place and fetches nothing
    again = run_download(hub.url, tmp_path, config, "--model", "tiny", "--json")
    assert again.returncode == 0, again.stderr
    [result] = json.loads(again.stdout)
    assert result["status"] == "skipped" and result["fetched_bytes"] == 0
    assert fetched(hub) == [] and fetched(hub, "HEAD") == []


def test_downloaded_folder_loads_and_generates(hub, tmp_path):
    config = write_config(tmp_path, {"tiny": REPO})
    proc = run_download(hub.url, tmp_path, config, "--model", "tiny", "--path", str(tmp_path / "elsewhere"))
    assert proc.returncode == 0, proc.stderr
    target = tmp_path / "elsewhere" / "tiny"  # --path DIR puts the model in DIR/<key>
    assert checkpoint_state(target) == "downloaded"
    assert not (tmp_path / "models").exists()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "w1 w2 w3"}], tokenize=False)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_cut_connection_is_resumed_with_a_range_request(hub, repos, tmp_path):
    config = write_config(tmp_path, {"big": BIG_REPO})
    hub.cut_next("model.safetensors", at=12 * 2**20)
    proc = run_download(hub.url, tmp_path, config, "--model", "big")
    assert proc.returncode == 0, proc.stderr
    gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith("/model.safetensors")]
    assert [r.range for r in gets] == [None, f"bytes={10 * 2**20}-"], gets  # resumed after the first 10 MiB
    target = tmp_path / "models" / "big"
    assert (target / "model.safetensors").read_bytes() == (repos[BIG_REPO] / "model.safetensors").read_bytes()
    assert checkpoint_state(target) == "downloaded"


def test_killed_run_leaves_partial_state_and_rerun_completes(hub, repos, tmp_path):
    config = write_config(tmp_path, {"tiny": REPO})
    target = tmp_path / "models" / "tiny"
    hub.cut_next(SHARDS[1], hold=True)  # half the shard arrives, then the connection hangs
    proc = run_download(hub.url, tmp_path, config, "--model", "tiny", "--max-workers", "1", popen=True)
    try:
        assert hub.wait_cut(30), "the downloader never reached the shard"
    finally:
        proc.kill()
        proc.communicate(timeout=30)
        hub.release()
    assert proc.returncode != 0
    assert checkpoint_state(target) == "partial"
    assert list((target / ".cache" / "huggingface").rglob("*.incomplete"))  # the killed run's temp file
    assert not (target / MANIFEST_NAME).exists()
    finished = {p.name[: -len(".metadata")] for p in (target / ".cache/huggingface/download").glob("*.metadata")}
    assert SHARDS[0] in finished and SHARDS[1] not in finished  # --max-workers 1: files go in name order

    hub.clear_requests()
    again = run_download(hub.url, tmp_path, config, "--model", "tiny")
    assert again.returncode == 0, again.stderr
    assert set(fetched(hub)) == WANTED - finished  # finished files are not fetched again
    assert SHARDS[1] in fetched(hub)
    assert checkpoint_state(target) == "downloaded"
    assert not list(target.rglob("*.incomplete"))
    for name in WANTED:
        assert (target / name).read_bytes() == (repos[REPO] / name).read_bytes(), name


def test_repo_without_safetensors_falls_back_to_bin(hub, repos, tmp_path):
    config = write_config(tmp_path, {"legacy": BIN_REPO})
    proc = run_download(hub.url, tmp_path, config, "--model", "legacy")
    assert proc.returncode == 0, proc.stderr
    assert "no *.safetensors" in row(proc.stdout, "legacy")
    target = tmp_path / "models" / "legacy"
    assert set(fetched(hub)) == {"config.json", "pytorch_model.bin"}  # not tf_model.h5
    assert checkpoint_state(target) == "downloaded"
    assert read_manifest(target)["weights_format"] == "bin"


def test_not_enough_disk_space_refuses_before_writing(hub, tmp_path):
    config = write_config(tmp_path, {"tiny": REPO})
    proc = run_download(hub.url, tmp_path, config, "--model", "tiny", "--json",
                        env={"DOWNLOAD_RESERVE_BYTES": str(10**18)})
    assert proc.returncode == 1
    [result] = json.loads(proc.stdout)
    assert result["status"] == "failed" and "not enough disk space" in result["reason"], result
    assert result["bytes"] > 0
    assert not (tmp_path / "models").exists()  # nothing written, not even the folder
    assert fetched(hub) == [] and fetched(hub, "HEAD") == []
    flag = run_download(hub.url, tmp_path, config, "--model", "tiny", "--reserve-bytes", "1000000TB")
    assert flag.returncode == 1 and "not enough disk space" in row(flag.stdout, "tiny")


def test_missing_repo_is_reported(hub, tmp_path):
    config = write_config(tmp_path, {"ghost": "test-org/no-such-model"})
    proc = run_download(hub.url, tmp_path, config, "--model", "ghost")
    assert proc.returncode == 1
    line = row(proc.stdout, "ghost")
    assert "test-org/no-such-model" in line and "failed" in line and "repository not found (HTTP 404)" in line


def test_token_required(repos, tmp_path):
    server = start_hub(tmp_path, {REPO: repos[REPO]}, token="hf_s3cret")
    try:
        config = write_config(tmp_path, {"tiny": REPO})
        none = run_download(server.url, tmp_path, config, "--model", "tiny")
        assert none.returncode == 1
        assert "authentication required (HTTP 401)" in row(none.stdout, "tiny")
        wrong = run_download(server.url, tmp_path, config, "--model", "tiny", env={"HF_TOKEN": "hf_wrong"})
        assert wrong.returncode == 1 and "token was rejected (HTTP 401" in row(wrong.stdout, "tiny")
        assert not (tmp_path / "models").exists()
        good = run_download(server.url, tmp_path, config, "--model", "tiny", env={"HF_TOKEN": "hf_s3cret"})
        assert good.returncode == 0, good.stderr
        assert checkpoint_state(tmp_path / "models" / "tiny") == "downloaded"
        flag = run_download(server.url, tmp_path, config, "--model", "tiny", "--token", "hf_s3cret",
                            "--path", str(tmp_path / "viaflag"))
        assert flag.returncode == 0, flag.stderr
        assert checkpoint_state(tmp_path / "viaflag" / "tiny") == "downloaded"
    finally:
        server.stop()


def test_one_failure_among_several_models(hub, tmp_path):
    config = write_config(tmp_path, {"tiny": REPO, "ghost": "test-org/no-such-model", "legacy": BIN_REPO})
    proc = run_download(hub.url, tmp_path, config, "--all")
    assert proc.returncode == 1
    assert " ok " in row(proc.stdout, "tiny") and " ok " in row(proc.stdout, "legacy")
    assert "failed" in row(proc.stdout, "ghost")
    assert "2 of 3 ok, 1 failed" in proc.stdout
    assert checkpoint_state(tmp_path / "models" / "tiny") == "downloaded"


def test_offline_mode_touches_no_network(hub, tmp_path):
    config = write_config(tmp_path, {"tiny": REPO, "other": BIG_REPO})
    assert run_download(hub.url, tmp_path, config, "--model", "tiny").returncode == 0
    hub.clear_requests()
    proc = run_download(hub.url, tmp_path, config, "--all", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    assert " ok " in row(proc.stdout, "tiny") and "offline" in row(proc.stdout, "tiny")
    assert "offline mode (HF_HUB_OFFLINE=1)" in row(proc.stdout, "other")
    assert "not downloaded" in row(proc.stdout, "other")
    assert hub.requests == []
    assert not (tmp_path / "models" / "other").exists()


def test_unknown_key_lists_the_valid_ones(hub, tmp_path):
    config = write_config(tmp_path, {"tiny": REPO, "legacy": BIN_REPO})
    proc = run_download(hub.url, tmp_path, config, "--model", "tiny", "nope")
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "tiny, legacy" in proc.stderr
    assert hub.requests == []


def test_revision_flag(hub, tmp_path):
    config = write_config(tmp_path, {"tiny": REPO})
    proc = run_download(hub.url, tmp_path, config, "--model", "tiny", "--revision", hub.sha(REPO))
    assert proc.returncode == 0, proc.stderr
    assert read_manifest(tmp_path / "models" / "tiny")["sha"] == hub.sha(REPO)
    bad = run_download(hub.url, tmp_path, config, "--model", "tiny", "--revision", "v9",
                       "--path", str(tmp_path / "other"))
    assert bad.returncode == 1 and "revision 'v9' not found" in row(bad.stdout, "tiny")


def test_downloaded_model_is_served_after_restart(tmp_path, repos):
    """main.py --download-only fetches from the hub; a server started afterwards serves that checkpoint."""
    import os
    import subprocess
    import sys

    import requests

    from tests.conftest import ROOT, free_port
    from tests.hub_server import start_hub

    hub = start_hub(tmp_path / "hub-root", {REPO: repos[REPO]})
    try:
        config = tmp_path / "models.yaml"
        config.write_text(
            "server: {max_loaded_models: 1}\n"
            "models:\n"
            "  tiny:\n"
            "    repo_id: " + REPO + "\n"
            "    family: text\n"
            "    path: tiny\n"
            "    dtype: float32\n"
            "    device: cpu\n"
            "    generation: {max_new_tokens: 3}\n")
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", MODELS_DIR=str(tmp_path / "models"),
                   TMP_DIR=str(tmp_path / "tmp"), LOG_DIR=str(tmp_path / "logs"), DOWNLOAD_RESERVE_BYTES="0",
                   HF_HOME=str(tmp_path / "hf-home"))
        done = subprocess.run([sys.executable, "main.py", "--config", str(config), "--download-only"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "tiny" in done.stdout
    finally:
        hub.stop()  # the hub is gone: serving must not need it
    port = free_port()
    server = subprocess.Popen([sys.executable, "main.py", "--config", str(config), "--port", str(port)], cwd=ROOT,
                              env=dict(env, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(url + "/health", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        status = requests.get(url + "/admin/model_status", timeout=10).json()["models"]["tiny"]
        assert status["state"] == "downloaded"
        response = requests.post(url + "/generate/tiny", json={"prompt": "w1 w2 w3"}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] >= 1
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_main_py_fetches_missing_models_before_serving_and_serves_despite_a_failed_one(tmp_path, repos):
    """Seed 001's `python main.py`: download what is missing, then serve; a model whose download
    failed is reported and answers 503, the others serve."""
    import os
    import subprocess
    import sys

    import requests

    from tests.conftest import ROOT, free_port, wait_for
    from tests.hub_server import start_hub

    hub = start_hub(tmp_path / "hub-root", {REPO: repos[REPO]})
    config = tmp_path / "models.yaml"
    model = "    family: text\n    dtype: float32\n    device: cpu\n    generation: {max_new_tokens: 3}\n"
    config.write_text("server: {max_loaded_models: 2}\nmodels:\n"
                      f"  tiny:\n    repo_id: {REPO}\n    path: tiny\n{model}"
                      f"  gone:\n    repo_id: test/not-on-the-hub\n    path: gone\n{model}")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", MODELS_DIR=str(tmp_path / "models"),
               TMP_DIR=str(tmp_path / "tmp"), LOG_DIR=str(tmp_path / "logs"), DOWNLOAD_RESERVE_BYTES="0",
               HF_HOME=str(tmp_path / "hf-home"), NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    port = free_port()
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "main.py", "--config", str(config), "--port", str(port)], cwd=ROOT,
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return requests.get(url + "/health", timeout=1).ok
            except requests.RequestException:
                return False
        assert wait_for(up, timeout=90), (tmp_path / "server.log").read_text()[-3000:]
        assert checkpoint_state(tmp_path / "models" / "tiny") == "downloaded"
        assert requests.post(url + "/generate/tiny", json={"prompt": "w1 w2"}, timeout=60).status_code == 200
        assert requests.post(url + "/generate/gone", json={"prompt": "w1"}, timeout=60).status_code == 503
        output = (tmp_path / "server.log").read_text()
        assert "gone" in output and "tiny" in output  # the summary names both
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        hub.stop()
