"""Anthropic's endpoints: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

Their errors leave in Anthropic's envelope (`serving.messages_errors`); the auth guard accepts
`x-api-key` as well as `Authorization: Bearer`.
"""

from __future__ import annotations

from litestar import Controller, Request, Response, post

from helix_server.api.body import read_json
from helix_server.api.openapi import documented_body
from helix_server.api.protocol.anthropic import CountTokensRequest, MessagesRequest
from helix_server.api.protocol.anthropic_events import TokenCount
from helix_server.api.serving.messages import MessagesService, count_message_tokens
from helix_server.api.serving.messages_errors import anthropic_exception_handlers
from helix_server.api.state import get_state


class MessagesController(Controller):
    """Anthropic's Messages API on the served model."""

    path = "/v1/messages"
    tags = ("Anthropic",)
    exception_handlers = anthropic_exception_handlers()

    @post("/", status_code=200, operation_class=documented_body(MessagesRequest))
    async def create_message(self, request: Request) -> Response:
        """Answer a conversation (Anthropic's stream events as SSE when `stream` is true)."""
        body = await read_json(request, MessagesRequest)
        return await MessagesService(get_state(request), body).create(request)

    @post("/count_tokens", status_code=200, operation_class=documented_body(CountTokensRequest))
    async def count_tokens(self, request: Request) -> TokenCount:
        """The prompt tokens `POST /v1/messages` would send to the model."""
        body = await read_json(request, CountTokensRequest)
        return await count_message_tokens(get_state(request), body)
