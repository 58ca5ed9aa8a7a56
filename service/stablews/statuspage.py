"""The status page at `/` and the browser client at `/client/stablews.js` (docs/browser.md).

The page is plain HTML and JS with no build step. It reads the same HTTP API as
everyone else; what it needs from the configuration (the socket path, the trace
view address, the demo channel) is written into its `<meta>` tags when served.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from .demo import DEMO_CHANNEL

if TYPE_CHECKING:
    from .app import StableServer

WEB = Path(__file__).resolve().parent / "web"
# The page's scripts and styles may come only from this server; nothing inline runs.
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


def page_config(server: StableServer) -> dict[str, str]:
    settings = server.settings
    return {
        "ws-path": settings.ws_path,
        "trace-url": settings.trace_url,
        "demo-channel": DEMO_CHANNEL if settings.demo_feed else "",
    }


def render_page(server: StableServer) -> str:
    template = (WEB / "index.html").read_text(encoding="utf-8")
    tags = "\n".join(
        f'    <meta name="stablews-{name}" content="{html.escape(value, quote=True)}">'
        for name, value in page_config(server).items()
    )
    return template.replace("    <!-- stablews-config -->", tags)


def status_page_routes(server: StableServer) -> list[BaseRoute]:
    if not server.settings.status_page:
        return []
    page = render_page(server).encode("utf-8")  # the settings do not change while serving
    headers = {"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"}

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page, headers=headers)

    return [
        Route("/", index),
        # The client is a link to clients/js/stablews.js: one file, served and shipped.
        Mount("/client", StaticFiles(directory=WEB / "client", follow_symlink=True), name="client"),
        Mount("/status", StaticFiles(directory=WEB / "status"), name="status"),
    ]
