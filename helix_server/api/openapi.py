"""Interactive API docs that work offline: Swagger UI 5 (renders OpenAPI 3.1) from packaged files.

Litestar's default doc pages load their JavaScript, CSS and favicon from a CDN; here every asset
comes from this server (`/docs/assets/...`, vendored from npm's `swagger-ui-dist`, see
`static/swagger-ui/VERSION.txt`). Handlers that read their body themselves declare its schema with
`documented_body(Struct)`, so the docs still show the request formats; `document_responses` adds the
error, stream and security documentation to both the page and `/docs/openapi.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from litestar import Request, Router
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody
from litestar.static_files import create_static_files_router

from helix_server import __version__
from helix_server.api.openapi_responses import document_responses

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"
SWAGGER_DIR = Path(__file__).parent / "static" / "swagger-ui"


class DocumentedJsonPlugin(JsonRenderPlugin):
    """`/docs/openapi.json`: Litestar's schema with `document_responses` applied."""

    def render(self, request: Request, openapi_schema: dict[str, Any]) -> bytes:
        return super().render(request, document_responses(request.app, openapi_schema))


class OfflineSwaggerPlugin(SwaggerRenderPlugin):
    """`/docs`: Swagger UI's bundle and CSS from `ASSETS_PATH`, the schema inlined in the page."""

    def __init__(self) -> None:
        super().__init__(
            path="/",
            js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            css_url=f"{ASSETS_PATH}/swagger-ui.css",
            favicon=f"<link rel='icon' type='image/png' href='{ASSETS_PATH}/favicon-32x32.png'>",
        )

    def render(self, request: Request, openapi_schema: dict[str, Any]) -> bytes:
        schema = document_responses(request.app, openapi_schema)
        # `</` could close the script element; JSON allows the escape `<\/`.
        spec = self.render_json(request, schema).replace(b"</", b"<\\/").decode("utf-8")
        title = schema["info"]["title"]
        return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} API docs</title>
{self.favicon}
<link rel="stylesheet" href="{self.css_url}">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{self.js_url}"></script>
<script>
SwaggerUIBundle({{
  spec: {spec},
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
}});
</script>
</body>
</html>
""".encode()


def documented_body(struct: type[msgspec.Struct]) -> type[Operation]:
    """An `Operation` class documenting a JSON body of type `struct` (for `operation_class=`). The
    schema is made when the OpenAPI document is (a server never asked for its docs keeps none)."""

    @dataclass
    class _Operation(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(
                content={"application/json": OpenAPIMediaType(schema=inline_schema(struct))},
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
    assets = create_static_files_router(
        path=ASSETS_PATH, directories=[SWAGGER_DIR], name="swagger-assets", include_in_schema=False
    )
    config = OpenAPIConfig(
        title="helix_server",
        version=__version__,
        description="OpenAI-compatible LLM inference server.",
        path=DOCS_PATH,
        render_plugins=[OfflineSwaggerPlugin(), DocumentedJsonPlugin(path="/openapi.json")],
    )
    return config, [assets]
