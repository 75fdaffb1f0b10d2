"""Runs inside the exporter's own environment (utils/runtimes/exporter.py), never in the server's:
exports one checkpoint to OpenVINO IR with optimum-intel, weights compressed by nncf, tokenizers
converted by openvino-tokenizers.

    <exporter python> export_worker.py --model SRC --out DIR --weight-format int4 --task text-generation-with-past

It imports nothing from the server (the server's packages are older or newer than the exporter's).
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--weight-format", required=True, choices=("int4", "int8", "fp16", "fp32"))
    parser.add_argument("--task", default="text-generation-with-past")
    args = parser.parse_args(argv)
    # The server's site-packages are on this environment's path (for torch and openvino). Its diffusers
    # wants a newer huggingface_hub than optimum-intel allows, and optimum imports diffusers whenever it
    # finds it; a text export never needs it, so it is hidden.
    sys.modules["diffusers"] = None  # type: ignore[assignment]
    from optimum.commands.optimum_cli import main as optimum_cli  # deferred: optimum (after hiding diffusers)

    sys.argv = ["optimum-cli", "export", "openvino", "--model", args.model, "--task", args.task,
                "--weight-format", args.weight_format, args.out]
    optimum_cli()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
