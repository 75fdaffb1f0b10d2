"""Shared fixtures: tiny real checkpoints built once per session, settings, the app and live servers."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from utils.hub.demo_models import build_demo_models  # noqa: E402
from utils.config.settings import load_settings  # noqa: E402


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A models/ folder whose demo/ holds the tiny checkpoints of all five families."""
    root = tmp_path_factory.mktemp("models")
    build_demo_models(root / "demo")
    return root


def test_env(models_dir: Path, tmp: Path, **extra: str) -> dict:
    env = {"MODELS_DIR": str(models_dir), "TMP_DIR": str(tmp / "tmp"), "LOG_DIR": str(tmp / "logs"),
           "JOBS_DIR": str(tmp / "jobs"),
           "DEMO_MODE": "1", "RAM_HEADROOM_GB": "0",
           # the OpenVINO exporter's venv (a minute of pip): built once, kept between sessions (gitignored)
           "OPENVINO_EXPORTER_DIR": str(ROOT / "models" / ".openvino-exporter")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="session")
def make_settings(models_dir, tmp_path_factory):
    """make_settings(**ENV) -> demo ServerSettings with those environment overrides."""
    def factory(**env):
        tmp = tmp_path_factory.mktemp("run")
        return load_settings(env=test_env(models_dir, tmp, **env))
    return factory


def make_app(settings, background: bool = False):
    """An app on the real stack; background=False leaves the sweeper and preload to the test."""
    from app import create_app
    return create_app(settings, background=background)


@pytest.fixture(scope="module")
def app(make_settings):
    from app import create_app
    application = create_app(make_settings(MAX_LOADED_MODELS="5"), background=False)
    yield application
    application.extensions["model_server"].manager.shutdown()


@pytest.fixture(scope="module")
def client(app):
    return app.test_client()


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.02) -> bool:
    """Polls `predicate` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """`python main.py --demo` (gunicorn, one worker, threads) on a loopback port."""

    def __init__(self, env: dict, args: list[str] | None = None, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **env)
        self.process = subprocess.Popen([sys.executable, "main.py", "--demo", "--port", str(self.port),
                                         *(args or [])], cwd=ROOT, env=full_env, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60) -> None:
        import requests
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early ({self.process.returncode}); log: {self.log_text()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.2)
        raise RuntimeError(f"server not ready in {timeout}s; log: {self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path else ""

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        if self._log is not subprocess.DEVNULL:
            self._log.close()


@pytest.fixture(scope="module")
def start_server(models_dir, tmp_path_factory):
    """start_server(**ENV) -> LiveServer; every server started is stopped at the end of the module."""
    servers = []

    def factory(args=None, **env):
        tmp = tmp_path_factory.mktemp("live")
        server = LiveServer(test_env(models_dir, tmp, **env), args, log_path=tmp / "server.log")
        server.tmp = tmp
        servers.append(server)
        return server
    yield factory
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def caller_server(models_dir, tmp_path_factory):
    """One live server with the `caller` model (it really writes a tool call: tests/tool_caller.py) beside
    the demo models, shared by every module that drives tools through a client (openai, langchain)."""
    from tests.tool_caller import CALLER_YAML, build_caller
    build_caller(models_dir / "demo")
    config = models_dir / "tools-models.yaml"
    config.write_text((ROOT / "models.yaml").read_text() + CALLER_YAML)
    tmp = tmp_path_factory.mktemp("caller")
    server = LiveServer(test_env(models_dir, tmp, MODELS_CONFIG=config, MAX_LOADED_MODELS=3), log_path=tmp / "server.log")
    yield server
    server.stop()


EXTRA_MODELS_YAML = """
  broken:        # a checkpoint whose weights are corrupt
    repo_id: test/broken
    family: text
    path: demo/broken
    generation: {max_new_tokens: 4}
  missing:       # configured but never downloaded
    repo_id: test/missing
    family: text
    path: demo/missing
  big:           # ~350 MB of random Qwen3 weights: slow enough to load that timing and RSS show
    repo_id: test/big
    family: text
    path: demo/big
    dtype: float32
    generation: {max_new_tokens: 4}
  big8:          # the same weights quantized to 8-bit on load: seconds of loading on a CPU
    repo_id: test/big
    family: text
    path: demo/big
    dtype: float32
    quantization: 8bit
    generation: {max_new_tokens: 4}
"""


def _build_big_checkpoint(target: Path, tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=4096, num_hidden_layers=6,
                         num_attention_heads=16, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config)
    staging = target.with_name(target.name + ".building")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)


@pytest.fixture(scope="session")
def extra_config(models_dir: Path) -> Path:
    """models.yaml + broken / missing / big models, with their demo-mode folders prepared."""
    import shutil
    demo = models_dir / "demo"
    broken = demo / "broken"
    if not broken.exists():
        shutil.copytree(demo / "deepseek", broken)
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:200] + b"\x00garbage" * 64)
    if not (demo / "big").exists():
        _build_big_checkpoint(demo / "big", demo / "deepseek")
    config = models_dir / "test-models.yaml"
    config.write_text((ROOT / "models.yaml").read_text() + EXTRA_MODELS_YAML)
    return config
