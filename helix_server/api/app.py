"""`create_app(engine, config)`: the Litestar app around an already-built `AsyncEngine`.

The app owns everything it needs (`ServerState` on `app.state`, its own Prometheus registry); there
is no module-level state, so tests can run several apps in one process. The engine thread starts in
the app's start-up hook (inside the serving event loop) and stops in its shutdown hook.
"""

from __future__ import annotations

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.datastructures import State

from helix_server.api.exception_handlers import exception_handlers
from helix_server.api.guards import refuse_while_draining, require_api_key
from helix_server.api.lifecycle import start_engine, stop_engine
from helix_server.api.metrics import MetricsLabels, ServerMetrics
from helix_server.api.openapi import openapi_config
from helix_server.api.routes.health import HealthController
from helix_server.api.routes.helix import HelixController
from helix_server.api.routes.messages import MessagesController
from helix_server.api.routes.metrics import metrics
from helix_server.api.routes.openai import CompletionsController, ModelsController
from helix_server.api.routes.playground import playground_routes
from helix_server.api.routes.responses import ResponsesController
from helix_server.api.routes.tokenize import TokenizeController
from helix_server.api.state import STATE_KEY, ServerState
from helix_server.config import HelixConfig
from helix_server.engine.async_engine import AsyncEngine


class MsgspecLitestar(Litestar):
    """Litestar with only its msgspec plugin: helix's request and response types are msgspec Structs.

    Litestar adds its pydantic and attrs plugins whenever those packages are installed (the openai
    and anthropic SDKs install pydantic), and importing them keeps ~8 MiB resident in a server that
    never uses them. (`_get_default_plugins` is Litestar's own hook for this choice; tests/api/
    test_server_imports.py fails if a Litestar release stops calling it.)
    """

    @staticmethod
    def _get_default_plugins(plugins: list) -> list:
        from litestar.plugins.core import MsgspecDIPlugin

        return [*plugins, MsgspecDIPlugin()]


def create_app(
    engine: AsyncEngine,
    config: HelixConfig,
    *,
    stuck_after_s: float = 30.0,
) -> MsgspecLitestar:
    """The HTTP app serving `engine` (not yet started: the app starts it when it starts)."""
    state = ServerState(
        engine=engine,
        config=config,
        metrics=ServerMetrics(
            engine.stats,
            name_prefix=config.server.metrics_name_prefix,
            labels=MetricsLabels(
                model_name=engine.runtime.model_name,
                block_size=config.engine.cache.block_size,
                enable_prefix_caching=config.engine.cache.enable_prefix_caching,
            ),
        ),
        model_name=engine.runtime.model_name,
        stuck_after_s=stuck_after_s,
    )
    docs, doc_routers = openapi_config()
    origins = list(config.server.allowed_origins)
    return MsgspecLitestar(
        route_handlers=[
            ModelsController,
            CompletionsController,
            ResponsesController,
            MessagesController,
            HealthController,
            TokenizeController,
            HelixController,
            metrics,
            *doc_routers,
            *playground_routes(),
        ],
        state=State({STATE_KEY: state}),
        guards=[require_api_key, refuse_while_draining],
        exception_handlers=exception_handlers(),
        on_startup=[start_engine],
        on_shutdown=[stop_engine],
        openapi_config=docs,
        cors_config=CORSConfig(allow_origins=origins) if origins else None,
        request_max_body_size=config.server.max_request_body_bytes,
        logging_config=None,
        debug=False,
    )
