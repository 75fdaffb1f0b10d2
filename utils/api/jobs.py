"""Asynchronous jobs over HTTP (utils/jobs/runner.py does the work):

  POST   /jobs/<model>        the body /generate takes -> 202 {"job_id", "status", "position", ...}
  GET    /jobs/<id>           status: queued (position) | running (progress) | succeeded | failed | cancelled
  GET    /jobs/<id>/result    the PNG (?index=N of several) or the JSON answer of a text model
  DELETE /jobs/<id>           cancels: a queued job at once, a running one at its next step
  GET    /jobs                newest first: ?limit=, ?before=<next of the previous page>, ?status=, ?model=
"""
from __future__ import annotations

import logging
import re

from flask import Blueprint, g, jsonify, request, send_file, url_for

from utils.api.context import request_body, services
from utils.api.wsgi import body_guard
from utils.errors import InvalidInput, PayloadTooLarge, UnknownJob
from utils.jobs.store import STATES
from utils.serving.inference import number_field

log = logging.getLogger("model_server.jobs")
bp = Blueprint("jobs", __name__)
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_PAGE = 200


def _job_id(job_id: str) -> str:
    if not _JOB_ID.match(job_id):
        raise UnknownJob(f"no job '{job_id[:64]}': job ids are 32 hex digits")
    return job_id


@bp.post("/jobs/<model>")
def submit(model: str):
    svc = services()
    svc.inference.spec(model)  # unknown model -> 404 before the body is read
    g.model = model
    body, uploads = job_body(svc.settings.jobs.max_body_bytes, model)
    kind, body, uploads = svc.job_executor.check(model, body, uploads)  # 400 now, not when it runs
    view = svc.jobs.submit(model, kind, body, uploads, request_id=g.get("request_id"))
    response = jsonify(view)
    response.status_code = 202
    response.headers["Location"] = url_for("jobs.status", job_id=view["job_id"])
    return response


def job_body(cap: int, model: str) -> tuple[dict, dict[str, list[bytes]]]:
    """The body, bounded by jobs.max_body_mb as well: a job's body is kept (in the store) until it
    runs, while /generate's lives for one request. Refusals are logged."""
    guard = body_guard(request.environ)
    if guard is not None:
        guard.lower_cap(cap, "jobs.max_body_mb (JOB_MAX_BODY_MB)")
    try:
        if guard is not None and guard.oversized:  # by Content-Length: refused unread
            raise PayloadTooLarge(f"the request body exceeds {guard.cap_name} ({guard.max_bytes / 2**20:g} MB)")
        return request_body()
    except PayloadTooLarge as exc:
        if guard is not None and guard.cap_name.startswith("jobs."):
            log.warning("a job body for '%s' was refused (%s bytes announced): %s; request %s", model,
                        request.content_length if request.content_length is not None else "chunked, more than "
                        f"{guard.max_bytes}", exc.details, g.get("request_id"))
            exc.details += f"; a job's body waits in the store until it runs: larger media go to POST /generate/{model}"
        raise


@bp.get("/jobs/<job_id>")
def status(job_id: str):
    return jsonify(services().jobs.describe(_job_id(job_id)))


@bp.get("/jobs/<job_id>/result")
def result(job_id: str):
    index = number_field(request.args, "index", integer=True, low=0, high=1_000_000, default=0)
    path, media_type = services().jobs.result_file(_job_id(job_id), index)
    return send_file(path, mimetype=media_type, max_age=0,
                     download_name=f"{job_id}-{index}.png" if media_type == "image/png" else f"{job_id}.json")


@bp.delete("/jobs/<job_id>")
def cancel(job_id: str):
    """200 once cancelled (a queued job at once); 202 while a running job stops at its next step."""
    view = services().jobs.cancel(_job_id(job_id))
    response = jsonify(view)
    response.status_code = 202 if view["status"] == "running" else 200
    return response


@bp.get("/jobs")
def listing():
    args = request.args
    limit = number_field(args, "limit", integer=True, low=1, high=MAX_PAGE, default=50)
    before = number_field(args, "before", integer=True, low=1, high=2**62, default=None)
    state = args.get("status") or None
    if state is not None and state not in STATES:
        raise InvalidInput(f"'status' is one of {', '.join(STATES)}; got {state!r}", field="status")
    model = args.get("model") or None
    if model is not None and model not in services().settings.models and not services().jobs.knows_model(model):
        services().inference.spec(model)  # 404: a model neither configured nor with jobs on record
    jobs = services().jobs.page(limit=limit + 1, before=before, status=state, model=model)
    more = len(jobs) > limit  # one more than asked for: a full last page says next null
    jobs = jobs[:limit]
    return jsonify({"jobs": [view for view, _ in jobs], "next": jobs[-1][1] if more else None})
