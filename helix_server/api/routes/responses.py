"""OpenAI's Responses API: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`."""

from __future__ import annotations

from litestar import Controller, Request, Response, delete, get, post

from helix_server.api.body import read_json
from helix_server.api.openapi import documented_body
from helix_server.api.protocol.responses import DeletedResponse, ResponseObject, ResponsesRequest
from helix_server.api.serving.responses import ResponsesService, response_not_found
from helix_server.api.state import get_state


class ResponsesController(Controller):
    """Create a response, and read or forget a stored one."""

    path = "/v1/responses"
    tags = ("OpenAI",)

    @post("/", status_code=200, operation_class=documented_body(ResponsesRequest))
    async def create_response(self, request: Request) -> Response:
        """Answer `input` (a string or items) with output items (streamed as SSE when `stream` is true)."""
        body = await read_json(request, ResponsesRequest)
        return await ResponsesService(get_state(request), body).create(request)

    @get("/{response_id:str}", sync_to_thread=False)
    def get_response(self, request: Request) -> ResponseObject:
        """A stored response (`store` true), or 404 while it is not (or no longer) stored."""
        response_id = request.path_params["response_id"]
        stored = get_state(request).responses.get(response_id)
        if stored is None:
            raise response_not_found(response_id, "response_id")
        return stored.response

    @delete("/{response_id:str}", status_code=200, sync_to_thread=False)
    def delete_response(self, request: Request) -> DeletedResponse:
        """Forget a stored response, or 404."""
        response_id = request.path_params["response_id"]
        if not get_state(request).responses.delete(response_id):
            raise response_not_found(response_id, "response_id")
        return DeletedResponse(response_id)
