"""`/docs` without internet access: Swagger UI's files are served by the gateway.

FastAPI's own docs page loads Swagger UI from a CDN, which leaves a blank page on a gateway
without internet access. The app is built with `docs_url=None` and this mounts the vendored
`swagger-ui-dist` files (`gateway/api/static/swagger/`, version and licence in VENDORED.md) at
`/docs/assets/` and the page at `/docs`. ReDoc (also CDN-only) is switched off.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

__all__ = ["DOCS_ASSETS", "mount_offline_docs"]

STATIC = Path(__file__).resolve().parents[1] / "static"
DOCS_ASSETS = "/docs/assets"


def mount_offline_docs(app: FastAPI) -> None:
    app.mount(DOCS_ASSETS, StaticFiles(directory=STATIC / "swagger"), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{app.title} API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
            # No validator badge: Swagger UI would fetch it from validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None})
