"""The browser playground: `/playground` (a chat with live speed metrics), its files, and `/` -> it.

Everything is packaged (`api/static/playground/`): plain HTML, CSS and JavaScript modules, no build
step and no CDN. `/playground` serves `index.html`, `/playground/<file>` the rest. The page and its
files are public (no API key, served while draining): they hold nothing secret, and the page asks
for the key itself, then sends it on every API request.
"""

from __future__ import annotations

from pathlib import Path

from litestar import Router, get
from litestar.handlers import HTTPRouteHandler
from litestar.response import Redirect
from litestar.static_files import create_static_files_router

from helix_server.api.guards import PUBLIC

PLAYGROUND_DIR = Path(__file__).resolve().parent.parent / "static" / "playground"
PLAYGROUND_PATH = "/playground"


@get("/", opt=PUBLIC, include_in_schema=False, sync_to_thread=False)
def root() -> Redirect:
    """`/` sends a browser to the playground."""
    return Redirect(PLAYGROUND_PATH)


def playground_routes() -> list[HTTPRouteHandler | Router]:
    """The `/` redirect and the playground's files, to register on the app."""
    files = create_static_files_router(
        path=PLAYGROUND_PATH, directories=[PLAYGROUND_DIR], html_mode=True, name="playground", opt=PUBLIC
    )
    return [root, files]
