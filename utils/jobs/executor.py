"""What a job is: the body /generate takes, checked when it is submitted and run later through the
same code as a synchronous request (utils/serving/inference.py for text, utils/serving/image_requests.py for images),
without the synchronous size limit and under the job's own deadline. No Flask here."""
from __future__ import annotations

import base64
import json
from typing import Any, Mapping

from utils.errors import InvalidInput
from utils.serving.image_requests import makes_images, parse_image_job, plan_images, run_images
from utils.serving.inference import MEDIA_FIELDS, URL_SCHEME, parse_job, result_body
from utils.jobs.runner import JobControl, JobOutcome
from utils.jobs.store import JobRecord


class ReadFields(Mapping):
    """A body (or its uploads) that notes which fields its parser looked at. A job keeps only those:
    what /generate would ignore (a field no parser of the family reads, an upload in a field no model
    reads) is not stored for hours until the job runs."""

    def __init__(self, data: Mapping) -> None:
        self._data, self._read = data, set()

    def __getitem__(self, name: str) -> Any:
        self._read.add(name)
        return self._data[name]

    def __contains__(self, name: object) -> bool:
        self._read.add(name)
        return name in self._data

    def get(self, name: str, default: Any = None) -> Any:
        self._read.add(name)
        return self._data.get(name, default)

    def __iter__(self):  # a parser that walks every field reads every field
        self._read.update(self._data)
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def kept(self) -> dict:
        return {name: value for name, value in self._data.items() if name in self._read}


class JobExecutor:
    def __init__(self, inference: Any, job_timeout: float) -> None:
        self.inference = inference
        self.job_timeout = job_timeout  # jobs.timeout: a job's deadline unless its body sets one

    def check(self, key: str, body: Mapping, uploads: Mapping[str, list[bytes]]
              ) -> tuple[str, Mapping, Mapping[str, list[bytes]]]:
        """Everything a job can be refused for without weights, before it is accepted (types, ranges,
        media decoded, sizes). Returns what the job makes ("image" or "text") and the body and
        uploads to keep: media URLs fetched now, once, into uploads (a job that runs later, or again
        after a restart, must not depend on a URL that may have expired or changed), and an image
        job's random seed drawn now, so a job run again makes the same images."""
        body, uploads = self._fetch_urls(body, uploads)
        spec = self.inference.spec(key)
        body, uploads = ReadFields(body), ReadFields(uploads)
        if makes_images(spec, body):
            job = parse_image_job(body, uploads, spec)
            plan_images(self.inference, key, job)
            return "image", {**body.kept(), "seed": job.params.seed}, uploads.kept()
        job = parse_job(body, uploads, spec)
        if job.stream:
            raise InvalidInput("a job's result is fetched whole from GET /jobs/<id>/result; send 'stream' only "
                               "to POST /generate", field="stream", error="unsupported parameter")
        self.inference.decode_media(job, spec)
        return "text", body.kept(), uploads.kept()

    def _fetch_urls(self, body: Mapping, uploads: Mapping[str, list[bytes]]
                    ) -> tuple[dict, dict[str, list[bytes]]]:
        """A media field that names a URL moves, whole and in order, from the body to the uploads
        (its other items decoded from base64 on the way). Fields of video frames stay as they are."""
        body, uploads = dict(body), {name: list(files) for name, files in uploads.items()}
        for name in MEDIA_FIELDS:
            value = body.get(name)
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(item, str) for item in items) \
                    or not any(URL_SCHEME.match(item) for item in items):
                continue
            single = isinstance(value, str) and not name.endswith("s")
            fetched = [self.inference.media_bytes(item, name if single else f"{name}[{i}]")
                       for i, item in enumerate(items)]
            uploads[name] = fetched + uploads.get(name, [])
            del body[name]
        return body, uploads

    def __call__(self, record: JobRecord, control: JobControl) -> JobOutcome:
        key = record.model
        spec = self.inference.spec(key)  # a model removed from the config since: 404, the job fails
        body = record.request["body"]
        uploads = {name: [base64.b64decode(data) for data in files]
                   for name, files in record.request["uploads"].items()}
        if makes_images(spec, body):
            job = parse_image_job(body, uploads, spec)
            job.timeout = job.timeout or self.job_timeout
            outcome = run_images(self.inference, key, job, is_gone=control.cancelled, synchronous=False,
                                 track=control.track)
            params = outcome.params
            return JobOutcome(files={f"{i}.png": png for i, png in enumerate(outcome.images)},
                              media_type="image/png", cancelled=outcome.finish_reason == "cancelled",
                              summary={"images": len(outcome.images), "seed": params.seed, "width": params.width,
                                       "height": params.height, "num_inference_steps": params.num_inference_steps,
                                       "timings": outcome.timings})
        job = parse_job(body, uploads, spec)
        job.timeout = job.timeout or self.job_timeout
        result = self.inference.generate(key, job, is_gone=control.cancelled, track=control.track)
        answer = result_body(key, result)
        return JobOutcome(files={"result.json": json.dumps(answer).encode()}, media_type="application/json",
                          cancelled=result.finish_reason == "cancelled",
                          summary={"usage": answer["usage"], "finish_reason": result.finish_reason})
