"""The OpenAI endpoints: `/v1/models`, `/v1/completions`, `/v1/chat/completions`."""

from __future__ import annotations

from litestar import Controller, Request, Response, get, post, route

from helix_server.api.body import read_json
from helix_server.api.errors import model_not_found
from helix_server.api.openapi import documented_body
from helix_server.api.protocol.chat import ChatCompletionRequest
from helix_server.api.protocol.common import ModelCard, ModelList
from helix_server.api.protocol.completions import CompletionRequest
from helix_server.api.routes.methods import GET_AND_HEAD
from helix_server.api.serving.chat import ChatService
from helix_server.api.serving.completions import CompletionService
from helix_server.api.state import ServerState, get_state


def model_card(state: ServerState) -> ModelCard:
    """The served model as `/v1/models` lists it."""
    runtime = state.engine.runtime
    return ModelCard(
        id=state.model_name,
        created=state.created,
        root=str(runtime.model_dir),
        max_model_len=state.engine.seq_num_tokens_limit,
    )


class ModelsController(Controller):
    """`GET /v1/models` and `GET /v1/models/{id}`."""

    path = "/v1/models"
    tags = ("OpenAI",)

    @route("/", http_method=GET_AND_HEAD, sync_to_thread=False)
    def list_models(self, request: Request) -> ModelList:
        """The models this server serves (one)."""
        return ModelList(data=[model_card(get_state(request))])

    @get("/{model_id:path}", sync_to_thread=False)
    def get_model(self, request: Request) -> ModelCard:
        """One model, or 404 `model_not_found`."""
        state = get_state(request)
        model_id = str(request.path_params["model_id"]).lstrip("/")
        if model_id != state.model_name:
            raise model_not_found(model_id)
        return model_card(state)


class CompletionsController(Controller):
    """`POST /v1/completions` and `POST /v1/chat/completions`."""

    path = "/v1"
    tags = ("OpenAI",)

    @post("/completions", status_code=200, operation_class=documented_body(CompletionRequest))
    async def create_completion(self, request: Request) -> Response:
        """Complete one or more prompts (streamed as SSE when `stream` is true)."""
        body = await read_json(request, CompletionRequest)
        return await CompletionService(get_state(request), body).create(request)

    @post("/chat/completions", status_code=200, operation_class=documented_body(ChatCompletionRequest))
    async def create_chat_completion(self, request: Request) -> Response:
        """Answer a conversation with the model's chat template (streamed as SSE when `stream` is true)."""
        body = await read_json(request, ChatCompletionRequest)
        return await ChatService(get_state(request), body).create(request)
