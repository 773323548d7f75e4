"""`GET /metrics` (and HEAD): Prometheus text format from the app's own registry.

The Content-Type is prometheus_client's own (it names its charset already), set as a header so that
Litestar does not append a second `charset=utf-8`.
"""

from __future__ import annotations

from litestar import Request, Response, route
from prometheus_client import CONTENT_TYPE_LATEST

from helix_server.api.guards import PUBLIC
from helix_server.api.routes.methods import GET_AND_HEAD
from helix_server.api.state import get_state


@route("/metrics", http_method=GET_AND_HEAD, opt=PUBLIC, sync_to_thread=False, tags=["Server"])
def metrics(request: Request) -> Response:
    """Engine gauges and counters (read at scrape time) and request latency histograms."""
    body = get_state(request).metrics.render()
    return Response(content=body, status_code=200, headers={"content-type": CONTENT_TYPE_LATEST})
