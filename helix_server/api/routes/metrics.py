"""`GET /metrics`: Prometheus text format from the app's own registry."""

from __future__ import annotations

from litestar import Request, Response, get
from prometheus_client import CONTENT_TYPE_LATEST

from helix_server.api.guards import PUBLIC
from helix_server.api.state import get_state


@get("/metrics", opt=PUBLIC, sync_to_thread=False, tags=["Server"])
def metrics(request: Request) -> Response:
    """Engine gauges and counters (read at scrape time) and request latency histograms."""
    body = get_state(request).metrics.render()
    return Response(content=body, status_code=200, media_type=CONTENT_TYPE_LATEST)
