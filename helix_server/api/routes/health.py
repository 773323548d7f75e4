"""`/health` (liveness), `/ready` (readiness) and `/version`; each answers HEAD too (uptime checkers).

HEAD runs the GET handler: the same status and headers, and the server sends no body.
"""

from __future__ import annotations

import time

from litestar import Controller, Request, Response, route

from helix_server import __version__
from helix_server.api.errors import service_unavailable
from helix_server.api.guards import PUBLIC
from helix_server.api.routes.methods import GET_AND_HEAD
from helix_server.api.state import ServerState, get_state


def engine_health(state: ServerState) -> tuple[str, dict]:
    """("ok" | "dead" | "stuck", details): dead = the loop stopped; stuck = work but no progress."""
    engine = state.engine
    stats = engine.stats()
    since_progress = time.monotonic() - engine.last_progress_time
    details = {
        "model": state.model_name,
        "num_requests_running": stats.num_requests_running,
        "num_requests_waiting": stats.num_requests_waiting,
        "num_kv_blocks_total": stats.num_kv_blocks_total,
        "num_kv_blocks_free": stats.num_kv_blocks_free,
        "kv_cache_usage": stats.kv_cache_usage,
        "seconds_since_progress": round(since_progress, 3),
    }
    if not engine.is_alive:
        return "dead", details
    if engine.has_unfinished_requests and since_progress > state.stuck_after_s:
        return "stuck", details
    return "ok", details


def _unavailable(message: str, code: str, extra: dict) -> Response:
    error = service_unavailable(message, code)
    return Response(
        content={
            **extra,
            "error": {"message": error.message, "type": error.type, "param": None, "code": code},
        },
        status_code=503,
        headers=error.headers,
    )


class HealthController(Controller):
    """Probes for orchestrators, and the server version."""

    tags = ("Server",)

    @route("/health", http_method=GET_AND_HEAD, opt=PUBLIC, sync_to_thread=False)
    def health(self, request: Request) -> Response:
        """200 while the engine loop is alive and making progress; 503 when dead or stuck."""
        status, details = engine_health(get_state(request))
        if status == "ok":
            return Response(content={"status": status, **details}, status_code=200)
        message = "The engine loop is not running." if status == "dead" else "The engine is stuck."
        return _unavailable(message, f"engine_{status}", {"status": status, **details})

    @route("/ready", http_method=GET_AND_HEAD, opt=PUBLIC, sync_to_thread=False)
    def ready(self, request: Request) -> Response:
        """200 once the model is loaded and warmed up, and until shutdown begins."""
        state = get_state(request)
        if state.draining:
            return _unavailable("The server is shutting down.", "server_draining", {"status": "draining"})
        if not state.engine.is_alive:
            return _unavailable("The engine loop is not running.", "engine_dead", {"status": "dead"})
        if not state.ready:
            return _unavailable("The model is warming up.", "warming_up", {"status": "starting"})
        return Response(content={"status": "ready"}, status_code=200)

    @route("/version", http_method=GET_AND_HEAD, sync_to_thread=False)
    def version(self) -> dict:
        """The helix_server version."""
        return {"version": __version__}
