"""Tool calling on the chat API: the request's tools checked, the output parsed into `tool_calls`.

`ToolCalling.from_request` validates `tools`, `tool_choice` and `parallel_tool_calls` (a 400 naming
the parameter) and picks the parser: the server's `--tool-call-parser` (or the family detected from
the chat template) for `auto`; for `required` and a named function the output is constrained by a
grammar to Hermes `<tool_call>` markup holding the tools' parameter schemas, so it always parses.
`ToolStream` turns one choice's text deltas into content and OpenAI tool-call deltas; the
non-streaming answer is the same stream run over the whole text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from helix_server.api.errors import bad_request
from helix_server.api.protocol.chat import (
    ChatCompletionRequest,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from helix_server.engine.tokenizer import Tokenizer
from helix_server.engine.tool_parsers import HermesToolParser, ToolParser, resolve_tool_parser
from helix_server.sampling_params import SamplingParams, StructuredOutputSpec

_NAMED = (
    'tool_choice must be \'none\', \'auto\', \'required\' or {"type": "function", "function": {"name": ...}}.'
)


@dataclass
class ToolCalling:
    """A request's tool-calling setup: the tools for the template, the parser, the forced choice."""

    tools: list[dict[str, Any]]
    choice: str  # "auto", "required" or "named"
    parser: type[ToolParser]
    parallel: bool = True
    named: str | None = None

    @classmethod
    def from_request(
        cls, body: ChatCompletionRequest, parser_setting: str, auto_enabled: bool, chat_template: str | None
    ) -> ToolCalling | None:
        """The setup for `body`, or None when it asks for no tool calls (no tools, or `none`)."""
        tools = check_tools(body.tools)
        choice, named = check_tool_choice(body.tool_choice, tools)
        if body.parallel_tool_calls is not None and not isinstance(body.parallel_tool_calls, bool):
            raise bad_request("parallel_tool_calls must be a boolean.", "parallel_tool_calls")
        if not tools or choice == "none":
            return None
        parallel = body.parallel_tool_calls is not False
        if choice != "auto":
            return cls(tools, choice, HermesToolParser, parallel, named)
        parser = resolve_tool_parser(parser_setting, chat_template) if auto_enabled else None
        if parser is None:
            raise bad_request(
                "tool_choice 'auto' needs a tool-call parser: start the server with "
                "--enable-auto-tool-choice and --tool-call-parser (hermes, llama3_json or mistral), "
                "or use tool_choice 'required' or a named function.",
                "tool_choice",
            )
        return cls(tools, choice, parser, parallel)

    def configure(self, params: SamplingParams, tokenizer: Tokenizer) -> None:
        """Adapt the request's sampling: keep the parser's markers in the text when they are
        special tokens, and constrain the output for `required` / named tool choice."""
        special = {str(token) for token in tokenizer.all_special_tokens}
        if any(marker in special for marker in self.parser.markers):
            params.skip_special_tokens = False
        if self.choice != "auto":
            if params.structured_output is not None:
                raise bad_request(
                    f"tool_choice {self.named or self.choice!r} constrains the output to tool calls; it "
                    "can't be combined with response_format or structured_outputs.",
                    "tool_choice",
                )
            constrain_to_grammar(params, forced_call_grammar(self))

    def forced_tools(self) -> list[dict[str, Any]]:
        """The tools the grammar allows: the named one, or all of them."""
        if self.named is None:
            return self.tools
        return [tool for tool in self.tools if tool["function"]["name"] == self.named]


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """The `tools` list, each a function tool with a name and an object of JSON-Schema parameters."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad_request("tools must be a list of function tools.", "tools")
    names = set()
    checked = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad_request("Only tools of type 'function' are supported.", f"{where}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise bad_request("A function tool needs a 'function' object.", f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise bad_request("A function needs a name of 1 to 64 characters.", f"{where}.function.name")
        if name in names:
            raise bad_request(f"Two tools are called {name!r}.", f"{where}.function.name")
        names.add(name)
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise bad_request("parameters must be a JSON Schema object.", f"{where}.function.parameters")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise bad_request("description must be a string.", f"{where}.function.description")
        checked.append({"type": "function", "function": {**function, "parameters": parameters}})
    return checked


def check_tool_choice(choice: Any, tools: list[dict[str, Any]]) -> tuple[str, str | None]:
    """("none" | "auto" | "required" | "named", the named function's name)."""
    if choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request(_NAMED, "tool_choice")
        if choice != "none" and not tools:
            raise bad_request(f"tool_choice {choice!r} needs tools.", "tool_choice")
        return choice, None
    if not isinstance(choice, dict) or choice.get("type") != "function":
        raise bad_request(_NAMED, "tool_choice")
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise bad_request(_NAMED, "tool_choice")
    if name not in {tool["function"]["name"] for tool in tools}:
        raise bad_request(f"tool_choice names the function {name!r}, which is not in tools.", "tool_choice")
    return "named", name


def new_call_id() -> str:
    """A fresh tool-call id (OpenAI's `call_...` form)."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolStream:
    """One choice's output run through the parser: content pieces and OpenAI tool-call deltas.

    With `parallel_tool_calls: false` only the first call is kept.
    """

    setup: ToolCalling
    parser: ToolParser = field(init=False)
    ids: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.parser = self.setup.parser()

    def feed(self, text: str, final: bool = False) -> tuple[str, list[DeltaToolCall]]:
        """The content and tool-call deltas that `text` (and the end, when `final`) released."""
        delta = self.parser.feed(text)
        content, calls = delta.content, list(delta.calls)
        if final:
            last = self.parser.finish()
            content += last.content
            calls += last.calls
        out: list[DeltaToolCall] = []
        for call in calls:
            if call.index > 0 and not self.setup.parallel:
                continue
            if call.name is not None:
                self.ids.append(new_call_id())
                self.names.append(call.name)
                self.arguments.append("")
                function = DeltaFunctionCall(name=call.name, arguments=call.arguments)
                out.append(
                    DeltaToolCall(call.index, id=self.ids[call.index], type="function", function=function)
                )
            else:
                out.append(DeltaToolCall(call.index, function=DeltaFunctionCall(arguments=call.arguments)))
            self.arguments[call.index] += call.arguments
        return content, out

    @property
    def has_calls(self) -> bool:
        return bool(self.ids)

    def tool_calls(self) -> list[ToolCall]:
        """The whole calls read so far."""
        return [
            ToolCall(id=call_id, function=FunctionCall(name=name, arguments=args))
            for call_id, name, args in zip(self.ids, self.names, self.arguments)
        ]

    def finish_reason(self, reason: str | None) -> str | None:
        """`tool_calls` when the model stopped after making calls (a cut-off stays `length`)."""
        return "tool_calls" if reason == "stop" and self.has_calls else reason


# llguidance's JSON options: single spaces after ":" and ",", no free whitespace (a weak model
# would otherwise fill max_tokens with newlines inside the arguments).
_COMPACT_JSON = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def forced_call_grammar(setup: ToolCalling) -> str:
    """A Lark grammar (llguidance's, with `%json`) for `required` / named tool choice: Hermes
    `<tool_call>` blocks (one, or one or more when parallel calls are allowed), each holding an
    allowed function's name and arguments that match its parameter schema."""
    rules = []
    for i, tool in enumerate(setup.forced_tools()):
        function = tool["function"]
        head = json.dumps('{"name": ' + json.dumps(function["name"]) + ', "arguments": ')
        rules.append(f'call_{i}: {head} args_{i} "}}"')
        schema = {**closed_objects(function["parameters"]), "x-guidance": _COMPACT_JSON}
        rules.append(f"args_{i}: %json {json.dumps(schema)}")
    block = '"<tool_call>\\n" call "\\n</tool_call>"'
    start = f'start: {block} ("\\n" {block})*' if setup.parallel else f"start: {block}"
    calls = " | ".join(f"call_{i}" for i in range(len(setup.forced_tools())))
    return "\n".join([start, f"call: {calls}", *rules]) + "\n"


def constrain_to_grammar(params: SamplingParams, grammar: str) -> None:
    """Constrain `params`' output to the Lark `grammar` (the structured-output backend compiles it
    when the request enters the engine; an uncompilable tool schema is a 400 naming `tools`)."""
    params.structured_output = StructuredOutputSpec("grammar", grammar, param="tools")


# Keywords whose values are JSON data, not schemas.
_DATA_KEYWORDS = frozenset(("enum", "const", "default", "examples"))


def closed_objects(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on each object schema that lists `properties` and
    says nothing about other keys (xgrammar's strict mode, vLLM's default): a forced call holds the
    tool's declared arguments, and a weak model can't add keys until `max_tokens`."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: value if key in _DATA_KEYWORDS else closed_objects(value) for key, value in schema.items()}
    if "properties" in closed and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed
