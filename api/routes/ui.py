"""The dashboard: ``/`` serves its page and ``/ui/...`` its static files (``api/static``: plain ES modules,
no build step), shipped in the Python package. The pages call the same REST API and event streams as the
CLI; nothing here needs a key (the files hold no data), and the content security policy lets the page
load and connect to this origin only (nothing from a CDN)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parents[1] / "static"
_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml",
          ".png": "image/png"}
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "style-src 'self' 'unsafe-inline'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated (ETag): a new release's files are picked up at once
}

router = APIRouter(tags=["dashboard"], include_in_schema=False)


def _file(relative: str) -> FileResponse:
    path = (STATIC / relative).resolve()
    if not path.is_relative_to(STATIC) or not path.is_file() or path.suffix not in _TYPES:
        raise HTTPException(404, f"no dashboard file {relative!r}")
    return FileResponse(path, media_type=_TYPES[path.suffix], headers=_HEADERS)


@router.get("/")
def index() -> FileResponse:
    """The dashboard's page (its routes are after the ``#``: ``/#/jobs``, ``/#/models/<id>``...)."""
    return _file("index.html")


@router.get("/ui/{relative:path}")
def static_file(relative: str) -> FileResponse:
    return _file(relative)
