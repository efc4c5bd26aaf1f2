"""The status page: one HTML document, a script and a style sheet shipped in the package.

No build step and nothing from another origin: the page polls ``GET /v1/overview`` (same auth as
the API) and draws with the DOM and SVG only. The page itself holds no data, so it is served
without a token; the strict Content-Security-Policy lets it load only this service's files and
talk only to it, and no page may frame it. With a token configured the page asks for it and
sends it as ``Authorization: Bearer`` (kept in sessionStorage, never in a URL).
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

ASSETS = "page"
"""The directory of the page's files inside ``engine.service`` (package data)."""
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
                               " img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def install(app: FastAPI) -> None:
    """``/`` the page, ``/page/*`` its script and style sheet; neither in the OpenAPI schema."""
    document = resources.files("engine.service").joinpath(ASSETS, "index.html").read_bytes()

    @app.get("/", include_in_schema=False)
    def status_page() -> Response:
        return Response(document, media_type="text/html; charset=utf-8", headers=HEADERS)

    app.mount("/page", StaticFiles(packages=[("engine.service", ASSETS)]), name="page")
