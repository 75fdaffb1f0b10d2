"""Image requests (families text_to_image and image_edit): validated before any load, run on the
model's engine like every other request, answered as PNGs. No Flask here: POST /generate/<model> and
/v1/images/* translate to and from these.

Request -> parse_image_job (types, ranges, sizes, counts: everything that needs no weights) ->
run_images: the input image decoded (edits), the output size resolved, the synchronous limit checked,
then the lease, the family's prepare, and the engine.
"""
from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from utils.config.settings import IMAGE_FAMILIES, ModelSpec
from utils.errors import InvalidInput, RequestTimeout
from utils.families import family_class
from utils.families.diffusion import ImageParams
from utils.serving.inference import (SEED_MAX, GenerateJob, MediaItem, check_media_items, flag_field, media_items,
                                     number_field, parse_timeout, text_field)

MAX_SCALE = 100.0  # guidance and true CFG scales; real use is 0..10
TEXT_ONLY_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "repetition_penalty", "system",
                    "frequency_penalty", "presence_penalty", "logit_bias", "min_p", "logprobs", "top_logprobs")


def is_image_model(spec: ModelSpec) -> bool:
    return spec.family in IMAGE_FAMILIES


GENERATION_MODES = ("text", "image")


def makes_images(spec: ModelSpec, body: Mapping) -> bool:
    """Whether a /generate or job body asks for images: always for the image families; for a family
    that also draws (Janus), when `generation_mode` is "image". Checked before any load."""
    mode = body.get("generation_mode")
    if mode in (None, ""):
        return is_image_model(spec)
    if mode not in GENERATION_MODES:
        raise InvalidInput(f"'generation_mode' is text or image; got {mode!r}", field="generation_mode")
    if mode == "image" and not (is_image_model(spec) or family_class(spec.family).draws):
        raise InvalidInput(f"'{spec.key}' ({spec.family}) does not make images", field="generation_mode",
                           error="unsupported parameter")
    if mode == "text" and is_image_model(spec):
        raise InvalidInput(f"'{spec.key}' ({spec.family}) makes images only", field="generation_mode",
                           error="unsupported parameter")
    return mode == "image"


@dataclass
class ImageJob:
    prompt: str
    params: ImageParams
    negative_prompt: str | None = None
    media: list[MediaItem] = field(default_factory=list)
    keep_alive: float | None = None
    timeout: float | None = None


@dataclass
class ImageOutcome:
    images: list[bytes]          # PNG bytes, one per image asked for
    params: ImageParams          # as run: the seed and size included
    timings: dict[str, float]
    finish_reason: str = "stop"


# ------------------------------------------------------------------ validation

def parse_image_job(body: Mapping, uploads: Mapping[str, list[bytes]], spec: ModelSpec) -> ImageJob:
    """Validates a /generate body for an image model against its limits; a bad value is a 400 naming
    its field. The output size of an edit without width/height follows its input image (run_images)."""
    defaults, limits = spec.generation, spec.limits
    family = family_class(spec.family)
    if not is_image_model(spec):  # a model that also draws (Janus): its own, fixed-size drawing
        return _parse_drawing_job(body, uploads, spec)
    for name in TEXT_ONLY_FIELDS:
        if body.get(name) not in (None, ""):
            raise InvalidInput(f"'{name}' is a text generation parameter; '{spec.key}' makes images "
                               f"(num_inference_steps, guidance_scale, width, height, num_images, seed)", field=name,
                               error="unsupported parameter")
    if flag_field(body, "stream", False):
        raise InvalidInput(f"'{spec.key}' returns whole images; streaming is for text models", field="stream",
                           error="unsupported parameter")
    media = media_items(body, uploads)
    check_media_items(media, spec)
    if "image" in family.accepts and not media:
        raise InvalidInput(f"'{spec.key}' edits an image: send it in 'image' (base64, a data URL or an upload)",
                           field="image", error="missing image")
    prompt = text_field(body, "prompt", required=True, max_chars=limits.max_prompt_chars)
    negative = text_field(body, "negative_prompt", required=False, max_chars=limits.max_prompt_chars)
    if negative is None:
        negative = defaults.negative_prompt
    width, height = (_size(body, name, getattr(defaults, name), spec, family.size_multiple)
                     for name in ("width", "height"))
    if width and height and width * height > limits.max_image_pixels:
        raise InvalidInput(f"{width}x{height} is {width * height} pixels; '{spec.key}' makes images of at most "
                           f"{limits.max_image_pixels} pixels (limits.max_image_pixels)", field="width",
                           error="image too large")
    true_cfg = number_field(body, "true_cfg_scale", integer=False, low=0.0, high=MAX_SCALE,
                            default=defaults.true_cfg_scale)
    seed = number_field(body, "seed", integer=True, low=0, high=SEED_MAX, default=defaults.seed)
    params = ImageParams(
        num_inference_steps=number_field(body, "num_inference_steps", integer=True, low=1, high=limits.max_steps,
                                    default=defaults.num_inference_steps),
        guidance_scale=number_field(body, "guidance_scale", integer=False, low=0.0, high=MAX_SCALE,
                               default=defaults.guidance_scale),
        true_cfg_scale=true_cfg,
        width=width, height=height,
        num_images=number_field(body, "num_images", integer=True, low=1, high=limits.max_images_out, default=1),
        seed=secrets.randbelow(SEED_MAX + 1) if seed is None else seed,
        cfg=true_cfg > 1 and bool(negative and negative.strip()),
    )
    return ImageJob(prompt=prompt, params=params, negative_prompt=negative if params.cfg else None, media=media,
                    keep_alive=_keep_alive(body), timeout=parse_timeout(body))


def _keep_alive(body: Mapping) -> float | None:
    keep_alive = number_field(body, "keep_alive", integer=False, low=-1, high=10 * 365 * 86400, default=None)
    if keep_alive is not None and -1 < keep_alive < 0:
        raise InvalidInput("'keep_alive' is -1 (keep loaded), 0 (unload after this request) or seconds",
                           field="keep_alive")
    return keep_alive


# What a drawing by an autoregressive model (Janus) takes: its size and steps are the checkpoint's.
DRAWING_FIELDS = "prompt, num_images, guidance_scale (or cfg_weight), seed"
NOT_FOR_DRAWING = TEXT_ONLY_FIELDS + ("negative_prompt", "num_inference_steps", "true_cfg_scale")


def _parse_drawing_job(body: Mapping, uploads: Mapping[str, list[bytes]], spec: ModelSpec) -> ImageJob:
    """Janus's parameters as seed 002's Janus-Pro takes them: the CFG weight (`cfg_weight`, or
    `guidance_scale` as for the other image models), `seed` and the number of images; the size is
    the model's own (width/height may be sent only at that size)."""
    family = family_class(spec.family)
    for name in NOT_FOR_DRAWING:
        if body.get(name) not in (None, ""):
            raise InvalidInput(f"'{name}' does not apply to '{spec.key}' drawing images (it takes {DRAWING_FIELDS})",
                               field=name, error="unsupported parameter")
    if flag_field(body, "stream", False):
        raise InvalidInput(f"'{spec.key}' returns whole images; streaming is for text", field="stream",
                           error="unsupported parameter")
    media = media_items(body, uploads)
    if media:
        raise InvalidInput(f"'{spec.key}' draws from a prompt alone; send no media with generation_mode image",
                           field=media[0].field, error="unsupported input")
    prompt = text_field(body, "prompt", required=True, max_chars=spec.limits.max_prompt_chars)
    drawing = family.drawing(spec)
    for name, size in (("width", drawing.width), ("height", drawing.height)):
        given = number_field(body, name, integer=True, low=1, high=1 << 20, default=size)
        if given != size:
            raise InvalidInput(f"'{spec.key}' draws {drawing.width}x{drawing.height} images only; got {name} {given}",
                               field=name, error="unsupported image size")
    named = [name for name in ("cfg_weight", "guidance_scale") if body.get(name) not in (None, "")]
    if len(named) == 2 and body["cfg_weight"] != body["guidance_scale"]:
        raise InvalidInput("'cfg_weight' and 'guidance_scale' name the same weight; send one", field="cfg_weight")
    weight = number_field(body, named[0] if named else "cfg_weight", integer=False, low=0.0, high=MAX_SCALE,
                          default=spec.generation.guidance_scale)
    seed = number_field(body, "seed", integer=True, low=0, high=SEED_MAX, default=None)
    params = ImageParams(num_inference_steps=drawing.tokens, guidance_scale=weight, true_cfg_scale=1.0,
                         width=drawing.width, height=drawing.height,
                         num_images=number_field(body, "num_images", integer=True, low=1,
                                                 high=spec.limits.max_images_out, default=1),
                         seed=secrets.randbelow(SEED_MAX + 1) if seed is None else seed)
    return ImageJob(prompt=prompt, params=params, keep_alive=_keep_alive(body), timeout=parse_timeout(body))


def _size(body: Mapping, name: str, default: int | None, spec: ModelSpec, multiple: int) -> int | None:
    value = number_field(body, name, integer=True, low=multiple, high=spec.limits.max_image_pixels // multiple,
                    default=default)
    if value is not None and value % multiple:
        raise InvalidInput(f"'{name}' must be a multiple of {multiple} for '{spec.key}'; got {value}", field=name,
                           error="unsupported image size")
    return value


def check_pixels(key: str, spec: ModelSpec, params: ImageParams) -> None:
    pixels = params.width * params.height
    if pixels > spec.limits.max_image_pixels:  # one side given, the other the family's default
        raise InvalidInput(f"{params.width}x{params.height} is {pixels} pixels; '{key}' makes images of at most "
                           f"{spec.limits.max_image_pixels} pixels (limits.max_image_pixels)", field="width",
                           error="image too large")


def check_sync_limit(key: str, spec: ModelSpec, params: ImageParams) -> None:
    """A request bigger than a synchronous answer should wait for (steps x pixels x images over
    limits.max_sync_step_pixels) is refused before any load, pointing to the job API."""
    limit = spec.limits.max_sync_step_pixels
    if params.work > limit:
        raise InvalidInput(
            f"{params.num_inference_steps} steps x {params.width}x{params.height} x {params.num_images} image(s) = "
            f"{params.work} step-pixels is over '{key}''s limit for a synchronous request "
            f"(limits.max_sync_step_pixels = {limit}); use POST /jobs/{key}, or fewer steps, pixels or images",
            error="too large for a synchronous request")


# ------------------------------------------------------------------ execution

def plan_images(inference: Any, key: str, job: ImageJob) -> tuple[Any, ImageParams]:
    """The input image decoded (edits) and the output size resolved and checked: everything before
    the lease. Returns the family's request and the parameters as they will run."""
    spec = inference.spec(key)
    family = family_class(spec.family)
    texts = [("prompt", job.prompt)] + ([("negative_prompt", job.negative_prompt)] if job.negative_prompt else [])
    request = inference.decode_media(GenerateJob(prompt=job.prompt, params=job.params, media=job.media, texts=texts),
                                     spec)  # bad media fails before any model loads
    request.negative_prompt = job.negative_prompt
    params = family.resolve_size(job.params, request, spec.limits.max_image_pixels)
    check_pixels(key, spec, params)
    return request, params


def run_images(inference: Any, key: str, job: ImageJob, is_gone: Callable[[], bool] | None = None, *,
               synchronous: bool = True, track: Callable[[Any], None] | None = None) -> ImageOutcome:
    """Plans the job, checks the synchronous limit (not for jobs), then runs it on the model's engine
    (batched there with compatible requests). `track` gets the engine job (its progress)."""
    began = time.monotonic()
    spec = inference.spec(key)
    request, params = plan_images(inference, key, job)
    if synchronous:
        check_sync_limit(key, spec, params)
    deadline = job.timeout or spec.timeout or inference.manager.settings.request_timeout
    checked = time.monotonic()
    run = inference.execute_images(key, request, params, deadline, job.keep_alive, is_gone, track)
    result = run["result"]
    if result.finish_reason == "timeout":
        raise RequestTimeout(f"the request's deadline ({deadline:g}s) passed after {run['steps_done']} of "
                             f"{params.num_inference_steps} steps; no image was finished")
    timings = {"load_seconds": round(checked - began + run["load_seconds"], 4), "queue_seconds": round(run["queue_seconds"], 4),
               "generate_seconds": round(run["generate_seconds"], 4),
               "total_seconds": round(time.monotonic() - began, 4)}
    return ImageOutcome(images=list(result.images or []), params=params, timings=timings,
                        finish_reason=result.finish_reason)


def image_body(key: str, outcome: ImageOutcome) -> dict:
    """The /generate answer: base64 PNGs and what they were made with."""
    params = outcome.params
    return {"images": [base64.b64encode(png).decode("ascii") for png in outcome.images], "model": key,
            "seed": params.seed, "width": params.width, "height": params.height,
            "num_inference_steps": params.num_inference_steps, "timings": outcome.timings}
