"""`POST /v1/responses`: OpenAI's Responses API as a thin translation onto the chat completions path.

The request becomes chat messages (`instructions` as a system message, the stored conversation of
`previous_response_id`, then `input`), rendered with the chat template and the tools; its options
become `SamplingParams` (with `text.format` as the structured-output constraint, and the chat API's
tool calling); the engine's output becomes output items (`responses_output`), whole or streamed
(`responses_stream`). Admission, disconnect-abort and metrics are `respond`'s and `Generation`'s, as
for chat completions.
"""

from __future__ import annotations

import time

from litestar import Request, Response

from helix_server.api.errors import INVALID_REQUEST, APIError, bad_request
from helix_server.api.protocol.chat import ChatMessage
from helix_server.api.protocol.common import UsageInfo
from helix_server.api.protocol.responses import (
    IncompleteDetails,
    InputTokensDetails,
    ResponseError,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from helix_server.api.serving.generation import Generation
from helix_server.api.serving.params import build_sampling_params
from helix_server.api.serving.prompts import chat_prompt
from helix_server.api.serving.response_store import StoredResponse
from helix_server.api.serving.responses_input import input_messages, output_messages
from helix_server.api.serving.responses_options import check_options, text_format_spec
from helix_server.api.serving.responses_output import OutputBuilder
from helix_server.api.serving.responses_stream import response_events
from helix_server.api.serving.responses_tools import tool_calling
from helix_server.api.serving.service import GenerationService
from helix_server.api.state import ServerState
from helix_server.sampling_params import SamplingParams


def response_not_found(response_id: str, param: str) -> APIError:
    """404 for an id (`previous_response_id`, or a GET's path) naming no stored response."""
    return APIError(
        404,
        f"Response with id '{response_id}' not found (never stored, forgotten, or stored on another server).",
        INVALID_REQUEST,
        param,
        "response_not_found",
    )


class ResponsesService(GenerationService):
    """Turns one `ResponsesRequest` into an engine request and a Responses API answer."""

    id_prefix = "resp_"
    body: ResponsesRequest

    def __init__(self, state: ServerState, body: ResponsesRequest) -> None:
        super().__init__(state, body)
        self.store = body.store is not False and state.responses.enabled

    def _check(self) -> SamplingParams:
        body = self.body
        self.state.check_model(body.model)
        check_options(body)
        self.history: list[ChatMessage] = []
        if body.previous_response_id is not None:
            stored = self.state.responses.get(body.previous_response_id)
            if stored is None:
                raise response_not_found(body.previous_response_id, "previous_response_id")
            self.history = stored.conversation
        self.input = input_messages(body.input)
        params = build_sampling_params(
            body, max_tokens=body.max_output_tokens, renames={"max_tokens": "max_output_tokens"}
        )
        spec = text_format_spec(body.text)
        if spec is not None:
            if params.structured_output is not None:
                raise bad_request("Set either text.format or structured_outputs, not both.", "text.format")
            params.structured_output = spec
        server = self.state.config.server
        self.tools = tool_calling(
            body.tools,
            body.tool_choice,
            body.parallel_tool_calls,
            server.tool_call_parser,
            server.enable_auto_tool_choice,
            self.tokenizer.chat_template,
        )
        if self.tools is not None:
            self.tools.configure(params, self.tokenizer)
        return params

    async def create(self, request: Request) -> Response:
        """Validate, render the chat template, queue, and answer (streamed when `stream` is true)."""
        params = self._check()
        system = (
            [ChatMessage(role="system", content=self.body.instructions)] if self.body.instructions else []
        )
        prompt = await chat_prompt(
            [*system, *self.history, *self.input],
            self.tokenizer,
            tools=self.tools.tools if self.tools is not None else None,
        )
        return await self.run(
            request,
            [prompt.token_ids],
            params,
            "input",
            events=lambda generation: response_events(self, generation),
            collect=self._collect,
        )

    async def _collect(self, generation: Generation) -> Response:
        results = await self.results(generation)
        _, _, seq = next(results.choices())
        builder = OutputBuilder(self.tools)
        builder.feed(seq.text, final=True, incomplete=seq.finish_reason == "length")
        response = self.finish(builder, results.usage(), seq.finish_reason)
        return Response(content=response, status_code=200)

    def response(self, status: str, builder: OutputBuilder | None = None) -> ResponseObject:
        """The response object with the request's settings echoed and `builder`'s items."""
        body = self.body
        return ResponseObject(
            id=self.request_id,
            created_at=self.created,
            model=self.state.model_name,
            status=status,
            output=list(builder.items) if builder is not None else [],
            output_text=builder.output_text if builder is not None else "",
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            metadata=dict(body.metadata or {}),
            parallel_tool_calls=body.parallel_tool_calls is not False,
            previous_response_id=body.previous_response_id,
            store=self.store,
            temperature=body.temperature,
            top_p=body.top_p,
            text=body.text if body.text and body.text.get("format") else {"format": {"type": "text"}},
            tool_choice=body.tool_choice if body.tool_choice is not None else "auto",
            tools=list(body.tools or []),
            user=body.user,
        )

    def finish(self, builder: OutputBuilder, usage: UsageInfo, finish_reason: str | None) -> ResponseObject:
        """The finished response (`incomplete` when cut off by the token limit), stored when asked."""
        response = self.response("completed", builder)
        if finish_reason == "length":
            response.status = "incomplete"
            response.incomplete_details = IncompleteDetails("max_output_tokens")
        else:
            response.completed_at = int(time.time())
        response.usage = ResponseUsage(
            input_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            input_tokens_details=InputTokensDetails(usage.prompt_tokens_details.cached_tokens),
        )
        if self.store:
            conversation = [*self.history, *self.input, *output_messages(builder.items)]
            self.state.responses.put(StoredResponse(response, conversation))
        return response

    def failed(self, error: APIError, builder: OutputBuilder) -> ResponseObject:
        """The response of a stream that failed after it began."""
        response = self.response("failed", builder)
        response.error = ResponseError(error.code or error.type, error.message)
        return response
