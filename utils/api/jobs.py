"""Asynchronous jobs over HTTP (utils/jobs.py does the work):

  POST   /jobs/<model>        the body /generate takes -> 202 {"job_id", "status", "position", ...}
  GET    /jobs/<id>           status: queued (position) | running (progress) | succeeded | failed | cancelled
  GET    /jobs/<id>/result    the PNG (?index=N of several) or the JSON answer of a text model
  DELETE /jobs/<id>           cancels: a queued job at once, a running one at its next step
  GET    /jobs                newest first: ?limit=, ?before=<next of the previous page>, ?status=, ?model=
"""
from __future__ import annotations

import re

from flask import Blueprint, g, jsonify, request, send_file, url_for

from utils.api.generate import request_body, services
from utils.errors import InvalidInput, UnknownJob
from utils.inference import number_field
from utils.jobs import STATES

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
    body, uploads = request_body()
    kind, body, uploads = svc.job_executor.check(model, body, uploads)  # 400 now, not when it runs
    view = svc.jobs.submit(model, kind, body, uploads, request_id=g.get("request_id"))
    response = jsonify(view)
    response.status_code = 202
    response.headers["Location"] = url_for("jobs.status", job_id=view["job_id"])
    return response


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
    if model is not None:
        services().inference.spec(model)  # 404 for a model this server does not know
    jobs = services().jobs.page(limit=limit, before=before, status=state, model=model)
    return jsonify({"jobs": [view for view, _ in jobs],
                    "next": jobs[-1][1] if len(jobs) == limit else None})
