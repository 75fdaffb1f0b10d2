"""Seed 004's device routes: GET /device lists the devices this server sees, POST /device?device=...
answers one of them (GET takes ?device= too). Read from the memory report and the manager's snapshot
(utils/serving/device_status.py); guarded by API_TOKEN like the inference routes."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from utils.serving.device_status import device_report, find_device

bp = Blueprint("devices", __name__)


@bp.route("/device", methods=["GET", "POST"])
def device():
    report = device_report(current_app.extensions["model_server"])
    if request.method == "GET" and "device" not in request.args:
        return jsonify(report)
    return jsonify(find_device(report, request.args.get("device")))
