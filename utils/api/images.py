"""Image requests behind POST /generate/<model> (families text_to_image, image_edit; Janus with
generation_mode image); the translation
lives in utils/serving/image_requests.py, /v1/images in utils/api/openai.py."""
from __future__ import annotations

from flask import jsonify

from utils.api.context import client_gone_probe, services
from utils.serving.image_requests import image_body, parse_image_job, run_images


def generate_image(model: str, spec, body: dict, uploads: dict):
    """Synchronous: {"images": [base64 PNG, ...], "model", "seed", "width", "height", "timings"}."""
    job = parse_image_job(body, uploads, spec)
    outcome = run_images(services().inference, model, job, is_gone=client_gone_probe())
    return jsonify(image_body(model, outcome))
