"""The original Helix endpoints, kept for its users."""

from __future__ import annotations

from litestar import Controller, Request, Response, get, post

from helix_server.api.body import read_json
from helix_server.api.openapi import documented_body
from helix_server.api.protocol.helix import BatchGenerateRequest, GenerateRequest
from helix_server.api.serving.helix import HelixService, parse_stream_query
from helix_server.api.state import get_state


class HelixController(Controller):
    """`/generate`, `/generate/batch`, `/generate/stream` (GET with query parameters, or POST)."""

    path = "/generate"
    tags = ("Helix",)

    @post("/", status_code=200, operation_class=documented_body(GenerateRequest))
    async def generate(self, request: Request) -> Response:
        """`{prompt, max_tokens, temperature, speculation_depth}` -> `{text, num_tokens, metrics}`."""
        body = await read_json(request, GenerateRequest)
        return await HelixService(get_state(request), body).create(request)

    @post("/batch", status_code=200, operation_class=documented_body(BatchGenerateRequest))
    async def generate_batch(self, request: Request) -> Response:
        """`{prompts, ...}` -> `{results: [...]}`; all prompts run concurrently."""
        body = await read_json(request, BatchGenerateRequest)
        return await HelixService(get_state(request), body).create(request)

    @get("/stream")
    async def stream_get(self, request: Request) -> Response:
        """SSE `data: {"token": ..., "is_final": false}` events, then one with `is_final: true`."""
        body = parse_stream_query(dict(request.query_params))
        return await HelixService(get_state(request), body).create(request, stream=True)

    @post("/stream", status_code=200, operation_class=documented_body(GenerateRequest))
    async def stream_post(self, request: Request) -> Response:
        """The same stream, with the parameters in a JSON body."""
        body = await read_json(request, GenerateRequest)
        return await HelixService(get_state(request), body).create(request, stream=True)
