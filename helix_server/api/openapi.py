"""Interactive API docs that work offline: Swagger UI served from the `swagger-ui-bundle` package.

Litestar's default doc pages load their JavaScript, CSS and favicon from a CDN; here every asset
comes from this server (`/docs/assets/...`). Handlers that read their body themselves declare its
schema with `documented_body(Struct)`, so the docs still show the request formats.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from litestar import Router
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody
from litestar.static_files import create_static_files_router

from helix_server import __version__

logger = logging.getLogger("helix_server.api")

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"


def swagger_assets_dir() -> Path | None:
    """The directory of Swagger UI's files from `swagger-ui-bundle`, or None if it isn't installed."""
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    return Path(swagger_ui_bundle.swagger_ui_path)


def documented_body(struct: type[msgspec.Struct]) -> type[Operation]:
    """An `Operation` class documenting a JSON body of type `struct` (for `operation_class=`)."""
    schema = inline_schema(struct)

    @dataclass
    class _Operation(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(
                content={"application/json": OpenAPIMediaType(schema=schema)},
                required=True,  # type: ignore[arg-type]
            )

    return _Operation


def inline_schema(struct: type[msgspec.Struct]) -> dict[str, Any]:
    """The JSON schema of `struct` with every `$ref` expanded in place (Litestar owns the
    `components` section, so the docs can't refer to schemas of their own there)."""
    schema = msgspec.json.schema(struct)
    definitions = schema.pop("$defs", {})

    def expand(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return expand(definitions[ref.removeprefix("#/$defs/")])
            return {key: expand(value) for key, value in node.items()}
        if isinstance(node, list):
            return [expand(item) for item in node]
        return node

    return expand(schema)


def openapi_config() -> tuple[OpenAPIConfig, list[Router]]:
    """The OpenAPI config (Swagger UI at /docs, schema at /docs/openapi.json) and the asset routes."""
    assets = swagger_assets_dir()
    plugins: list[Any] = [JsonRenderPlugin(path="/openapi.json")]
    routers: list[Router] = []
    if assets is not None:
        favicon = f"<link rel='icon' type='image/png' href='{ASSETS_PATH}/favicon-32x32.png'>"
        plugins.insert(
            0,
            SwaggerRenderPlugin(
                path="/",
                js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
                css_url=f"{ASSETS_PATH}/swagger-ui.css",
                standalone_preset_js_url=f"{ASSETS_PATH}/swagger-ui-standalone-preset.js",
                favicon=favicon,
            ),
        )
        routers.append(
            create_static_files_router(
                path=ASSETS_PATH, directories=[assets], name="swagger-assets", include_in_schema=False
            )
        )
    else:
        logger.warning("swagger-ui-bundle is not installed: /docs serves only the OpenAPI schema")
    config = OpenAPIConfig(
        title="helix_server",
        version=__version__,
        description="OpenAI-compatible LLM inference server.",
        path=DOCS_PATH,
        render_plugins=plugins,
    )
    return config, routers
