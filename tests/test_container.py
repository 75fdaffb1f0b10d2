"""The container files: docker-compose.yml, .dockerignore and the Dockerfile's own HEALTHCHECK.

The HEALTHCHECK and ENTRYPOINT are parsed out of the Dockerfile and run here as they run in the
image (same argv, from the project root, which is the image's WORKDIR): healthy for a server on a
non-default port, unhealthy once it is stopped or when its record is stale. No image is built;
bench/container_smoke.sh does that where docker or podman is installed.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import ROOT, free_port
from tests.conftest import test_env as server_env

SERVICE = "model-server"
# The ENTRYPOINT listens on 0.0.0.0, where the server refuses to start without both tokens (main.py), and
# compose requires both: the servers started here get them, as a real deployment does.
TOKENS = {"ADMIN_TOKEN": "admin-test-token", "API_TOKEN": "api-test-token"}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        name, _, rest = current.partition(" ")
        instructions.append((name.upper(), rest.strip()))
        current = ""
    return instructions


def instruction(name: str) -> str:
    found = [rest for key, rest in dockerfile_instructions() if key == name]
    assert found, f"Dockerfile has no {name}"
    return found[-1]  # as Docker does: the last one wins


def command_argv(text: str) -> list[str]:
    """Exec form (JSON array) as is; shell form through /bin/sh -c, as Docker runs it."""
    text = text.strip()
    if text.startswith("["):
        return json.loads(text)
    return ["/bin/sh", "-c", text]


def healthcheck_spec() -> tuple[dict[str, str], list[str]]:
    """The HEALTHCHECK's --options and the argv of its CMD."""
    rest = instruction("HEALTHCHECK")
    options, _, command = rest.partition("CMD ")
    opts = dict(re.findall(r"--([a-z-]+)=(\S+)", options))
    return opts, command_argv(command)


def seconds(duration: str) -> float:
    return sum(float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
               for n, unit in re.findall(r"([\d.]+)(ms|s|m|h)", duration))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


# ---- docker-compose.yml --------------------------------------------------------------------------------------

def test_compose_service_builds_this_directory_and_maps_the_exposed_port(compose):
    service = compose["services"][SERVICE]
    build = service["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (ROOT / context).resolve() == ROOT
    assert (ROOT / context / dockerfile).is_file()
    exposed = instruction("EXPOSE").split()
    container_ports = [str(p).rsplit(":", 1)[-1].split("/")[0] for p in service["ports"]]
    assert container_ports == ["5000"] and exposed == ["5000"]
    assert service["ports"] == ["5000:5000"]


def test_compose_requires_admin_and_api_tokens(compose):
    env = compose["services"][SERVICE]["environment"]
    for required in ("ADMIN_TOKEN", "API_TOKEN"):
        assert re.fullmatch(rf"\$\{{{required}:\?[^}}]+\}}", env[required]), env[required]
    for optional in ("METRICS_TOKEN", "HF_TOKEN"):  # passed through, empty when unset
        assert env[optional] == f"${{{optional}:-}}"


def test_compose_checks_readiness_and_outlasts_the_drain(compose):
    service = compose["services"][SERVICE]
    assert service["healthcheck"]["test"] == ["CMD"] + healthcheck_spec()[1]
    grace = float(str(service["environment"]["SHUTDOWN_GRACE"]).split(":-")[-1].rstrip("}"))
    from utils.ops.gunicorn_worker import SHUTDOWN_MARGIN
    assert seconds(service["stop_grace_period"]) > grace + SHUTDOWN_MARGIN


def test_compose_volumes_cover_the_image_volumes(compose):
    service = compose["services"][SERVICE]
    mounts = {}
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = source
    workdir = instruction("WORKDIR")
    image_volumes = json.loads(instruction("VOLUME"))
    for target in image_volumes + [f"{workdir}/.cache"]:
        assert target in mounts, f"{target} is not a compose volume"
    for target in image_volumes:
        assert mounts[target] in compose["volumes"], f"named volume {mounts[target]} is not declared"


def test_compose_reserves_the_gpus(compose):
    devices = compose["services"][SERVICE]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d.get("count") == "all"
               for d in devices)


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(_compose_cli() is None, reason="docker compose is not installed")
def test_compose_cli_refuses_to_start_without_both_tokens():
    cli = _compose_cli()
    env = {k: v for k, v in os.environ.items() if k not in ("ADMIN_TOKEN", "API_TOKEN")}
    for given, missing in (({"API_TOKEN": "y"}, "ADMIN_TOKEN"), ({"ADMIN_TOKEN": "x"}, "API_TOKEN")):
        refused = subprocess.run([*cli, "config", "--quiet"], cwd=ROOT, env=dict(env, **given), capture_output=True,
                                 text=True)
        assert refused.returncode != 0 and f"set {missing}" in refused.stderr
    accepted = subprocess.run([*cli, "config", "--quiet"], cwd=ROOT, env=dict(env, ADMIN_TOKEN="x", API_TOKEN="y"),
                              capture_output=True, text=True)
    assert accepted.returncode == 0, accepted.stderr


# ---- .dockerignore -------------------------------------------------------------------------------------------

def test_dockerignore_keeps_state_and_caches_out_but_not_what_the_image_copies():
    patterns = [line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for needed in (".git", "models", "logs", "tmp", ".venv", "**/__pycache__", ".pytest_cache"):
        assert needed in patterns, f".dockerignore misses {needed}"

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatch(prefix, pat) or fnmatch.fnmatch(prefix, pat.removeprefix("**/"))
                   for pat in patterns if not pat.startswith("!") for prefix in prefixes)

    copied = []
    for rest in (rest for key, rest in dockerfile_instructions() if key == "COPY"):
        copied += [s for s in rest.split()[:-1] if not s.startswith("--")]
    assert copied and not [s for s in copied if ignored(s)]
    assert (ROOT / "start.sh").stat().st_mode & 0o111


# ---- HEALTHCHECK against a server started as the ENTRYPOINT starts it ---------------------------------------

def run_healthcheck(env: dict) -> subprocess.CompletedProcess:
    options, argv = healthcheck_spec()
    limit = seconds(options.get("timeout", "30s"))
    started = time.monotonic()
    result = subprocess.run(argv, cwd=ROOT, env=dict(os.environ, **env), capture_output=True, text=True,
                            timeout=limit)
    result.elapsed = time.monotonic() - started
    return result


class EntrypointServer:
    """The Dockerfile's ENTRYPOINT (start.sh --host 0.0.0.0) plus extra args, in its own session."""

    def __init__(self, env: dict, args: list[str], port: int, log_path) -> None:
        self.env, self.port = env, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log_path, "wb")
        self.log_path = log_path
        self.process = subprocess.Popen(command_argv(instruction("ENTRYPOINT")) + args, cwd=ROOT,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1", **env), stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready: {self.log_path.read_text()[-3000:]}")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)  # master and worker: the session start_new_session made
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


@pytest.fixture
def entrypoint_server(models_dir, tmp_path):
    servers = []

    def start(port: int, args=(), **extra_env):
        """port: where this server will listen (passed in args or PORT by the test)."""
        env = server_env(models_dir, tmp_path, **TOKENS, **extra_env)
        server = EntrypointServer(env, list(args), port, tmp_path / f"server-{len(servers)}.log")
        servers.append(server)  # stopped at teardown even when it never gets ready
        server.wait_ready()
        return server
    yield start
    for server in servers:
        server.stop()


def test_entrypoint_and_healthcheck_run_the_same_script():
    entrypoint = command_argv(instruction("ENTRYPOINT"))
    _, check = healthcheck_spec()
    assert entrypoint[:3] == ["./start.sh", "--host", "0.0.0.0"]
    assert check[0] == entrypoint[0] and "curl" not in " ".join(check)
    runs = " ".join(rest for key, rest in dockerfile_instructions() if key == "RUN")
    assert "curl" not in runs  # the check is stdlib-only; the image needs no curl


def test_healthcheck_follows_port_flag_and_fails_once_stopped(entrypoint_server):
    port = free_port()
    assert port != 5000
    server = entrypoint_server(port, ["--demo", "--port", str(port)])
    record = json.loads((Path(server.env["LOG_DIR"]) / "server.json").read_text())
    assert record == {"host": "0.0.0.0", "port": port, "pid": server.process.pid}

    healthy = run_healthcheck(server.env)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert f":{port}/ready" in healthy.stdout

    server.stop()  # SIGTERM, as `docker stop` sends: a clean exit removes the record
    assert server.process.returncode == 0
    assert not (Path(server.env["LOG_DIR"]) / "server.json").exists()
    down = run_healthcheck(server.env)
    assert down.returncode != 0 and "no server record" in down.stdout


def test_healthcheck_follows_port_env_and_rejects_a_stale_record(entrypoint_server):
    port = free_port()
    server = entrypoint_server(port, ["--demo"], PORT=str(port))  # no --port: PORT decides
    healthy = run_healthcheck(server.env)
    assert healthy.returncode == 0 and f":{port}/ready" in healthy.stdout, healthy.stdout + healthy.stderr

    server.stop(signal.SIGKILL)  # no clean exit: the record stays behind, naming a dead pid
    record_file = Path(server.env["LOG_DIR"]) / "server.json"
    assert json.loads(record_file.read_text())["pid"] == server.process.pid
    stale = run_healthcheck(server.env)
    assert stale.returncode != 0 and "stale" in stale.stdout, stale.stdout + stale.stderr


def test_entrypoint_without_tokens_refuses_to_start_and_says_what_is_open(models_dir, tmp_path):
    port = free_port()
    argv = command_argv(instruction("ENTRYPOINT")) + ["--demo", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k not in TOKENS}
    for given in ({}, {"ADMIN_TOKEN": "admin-only"}):
        result = subprocess.run(argv, cwd=ROOT, env=dict(env, **server_env(models_dir, tmp_path, **given)),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "refusing to listen on 0.0.0.0" in result.stderr and "API_TOKEN is not set" in result.stderr
        assert ("ADMIN_TOKEN is not set" in result.stderr) == (not given) and "--insecure" in result.stderr


def test_healthcheck_fails_when_the_recorded_pid_lives_but_nothing_answers(models_dir, tmp_path):
    env = server_env(models_dir, tmp_path)
    record = tmp_path / "logs" / "server.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"host": "0.0.0.0", "port": free_port(), "pid": os.getpid()}))
    result = run_healthcheck(env)
    assert result.returncode != 0 and "failed" in result.stdout, result.stdout + result.stderr
    record.write_text("{not json")
    assert run_healthcheck(env).returncode != 0


def test_healthcheck_without_any_record_is_unhealthy(models_dir, tmp_path):
    result = run_healthcheck(server_env(models_dir, tmp_path))
    assert result.returncode != 0 and result.elapsed < 5
