"""GET /admin/: one page for operators (models, live memory chart, temp usage, load/unload/cleanup).

The page is static HTML + JS and holds no data: the script fetches the same JSON routes as any other
client (/admin/model_status, /admin/memory_status, /admin/temp_status, /admin/jobs, POST .../load, .../unload,
/admin/cleanup_temp, /admin/emergency_cleanup), sending the admin token from sessionStorage as a
Bearer header. So the page and its two assets are public even when ADMIN_TOKEN is set (app.py's auth
skips views marked `public`); every number on it still needs the token. No CDN: the chart is drawn
on a plain <canvas>.
"""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, abort, redirect, url_for

ASSETS = Path(__file__).with_name("dashboard")
FILES = {"index.html": "text/html; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8",
         "dashboard.css": "text/css; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

bp = Blueprint("dashboard", __name__, url_prefix="/admin")


def public(view):
    """Marks a view as served without the admin token (it must hold no data)."""
    view.public = True
    return view


def _serve(name: str) -> Response:
    if name not in FILES:
        abort(404)
    response = Response((ASSETS / name).read_bytes(), content_type=FILES[name])
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    return response


@bp.get("")
@public
def bare():
    return redirect(url_for("dashboard.page"))  # the page fetches relative URLs: it must end in "/"


@bp.get("/")
@public
def page():
    return _serve("index.html")


@bp.get("/assets/<name>")
@public
def asset(name: str):
    if name == "index.html":
        abort(404)
    return _serve(name)
