"""Schemathesis over our own description (GET /openapi.json) against a live demo server (gunicorn on
loopback, tokens set, the real tiny checkpoints): every operation, cases drawn from the schemas
(examples, boundary values, random fuzzing), each response checked: no 5xx, a documented status,
the documented content type and headers, a body that conforms to its schema.

Bounded for CI: a few cases per operation, and a config whose limits keep every drawn request cheap
(tokens, steps, image sizes are bounded by the limits the description declares, so the fuzzer draws
within them). FUZZ_EXAMPLES / FUZZ_SEED widen or replay a run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import ROOT

TOKENS = {"apiToken": ("API_TOKEN", "fuzz-api-token"), "adminToken": ("ADMIN_TOKEN", "fuzz-admin-token"),
          "metricsToken": ("METRICS_TOKEN", "fuzz-metrics-token")}  # security scheme -> env, value
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "6"))
SEED = int(os.environ.get("FUZZ_SEED", "20261202"))
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance")
TEXT_LIMITS = {"max_new_tokens": 8, "max_prompt_chars": 400}
IMAGE_LIMITS = {"max_steps": 2, "max_image_pixels": 128 * 128, "max_images_out": 2, "max_prompt_chars": 400}


def fuzz_config(path) -> None:
    """models.yaml with every limit small: what the description declares, the fuzzer stays within."""
    document = yaml.safe_load((ROOT / "models.yaml").read_text())
    # An openvino model's first load exports it (a minute in a subprocess): tests/test_openvino.py covers it.
    document["models"] = {k: v for k, v in document["models"].items() if v.get("runtime") != "openvino"}
    for spec in document["models"].values():
        image = spec["family"] in ("text_to_image", "image_edit")
        spec["limits"] = {**spec.get("limits", {}), **(IMAGE_LIMITS if image else TEXT_LIMITS)}
        generation = spec.setdefault("generation", {})
        if image:
            generation.update(num_inference_steps=2, width=64, height=64)
        else:
            generation["max_new_tokens"] = min(generation.get("max_new_tokens", 8), 8)
    path.write_text(yaml.safe_dump(document))


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    config = tmp_path_factory.mktemp("fuzz") / "models.yaml"
    fuzz_config(config)
    # PROFILE_MAX_SECONDS: the description bounds /admin/profile's seconds by it, so each drawn profile is short
    return start_server(MODELS_CONFIG=str(config), MAX_LOADED_MODELS="7", JOB_WORKERS="1", PROFILE_MAX_SECONDS="0.3",
                        **{env: value for env, value in TOKENS.values()})


def test_schemathesis_finds_nothing(server, tmp_path):
    """The description is fetched with the API token (so it names the models), then each operation
    gets the token of its own security scheme, as a client holding all three would send them."""
    import requests
    schema = requests.get(f"{server.url}/openapi.json", timeout=10,
                          headers={"Authorization": f"Bearer {TOKENS['apiToken'][1]}"}).json()
    (tmp_path / "openapi.json").write_text(json.dumps(schema))
    (tmp_path / "schemathesis.toml").write_text("".join(f'[auth.openapi.{scheme}]\nbearer = "{value}"\n'
                                                        for scheme, (_, value) in TOKENS.items()))
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(tmp_path / "schemathesis.toml"),
               "run", str(tmp_path / "openapi.json"), "--url", server.url,
               "--checks", ",".join(CHECKS), "--max-examples", str(EXAMPLES), "--seed", str(SEED),
               "--phases", "examples,coverage,fuzzing,stateful", "--workers", "1", "--request-timeout", "60",
               "--generation-database", "none", "--no-color", "--suppress-health-check", "all",
               "--report", "json", "--report-json-path", str(report)]
    began = time.monotonic()
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - began
    print(run.stdout[-6000:], run.stderr[-3000:], f"schemathesis ran {seconds:.0f} s", sep="\n")
    assert run.returncode == 0, f"schemathesis failed:\n{run.stdout[-12000:]}\n{run.stderr[-2000:]}"
