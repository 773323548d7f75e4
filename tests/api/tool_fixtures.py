"""The tools the tool-calling tests offer, defined once, and written in each protocol's wire form.

`WEATHER` and `TIME` are protocol-neutral `ToolSpec`s; `.chat()`, `.anthropic()` and `.responses()`
give the tool objects of OpenAI chat completions, Anthropic Messages and OpenAI Responses.
`template_ids` is transformers' own rendering of a chat, the reference for prompt token counts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ToolSpec:
    """One function tool: its name, description and JSON schema of parameters."""

    name: str
    parameters: dict
    description: str | None = None

    def _described(self) -> dict:
        return {"description": self.description} if self.description else {}

    def chat(self) -> dict:
        """The tool in OpenAI chat completions' form."""
        function = {"name": self.name, **self._described(), "parameters": self.parameters}
        return {"type": "function", "function": function}

    def anthropic(self) -> dict:
        """The tool in Anthropic Messages' form."""
        return {"name": self.name, **self._described(), "input_schema": self.parameters}

    def responses(self) -> dict:
        """The tool in OpenAI Responses' form."""
        return {"type": "function", "name": self.name, **self._described(), "parameters": self.parameters}


WEATHER = ToolSpec(
    "get_weather",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    },
    "The weather in a city.",
)
TIME = ToolSpec(
    "get_time",
    {
        "type": "object",
        "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
        "required": ["zone"],
        "additionalProperties": False,
    },
    "The time in a zone.",
)
TOOL_SPECS = (WEATHER, TIME)
CHAT_TOOLS = [spec.chat() for spec in TOOL_SPECS]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def schema_of(name: str) -> dict:
    """The parameter schema of the tool called `name`."""
    return next(spec.parameters for spec in TOOL_SPECS if spec.name == name)


def template_ids(
    hf_tokenizer, messages: list[dict], tools: list[dict] | None = None, prefill: bool = False
) -> list[int]:
    """transformers' own rendering of chat `messages` with chat-form `tools`, tokenized; with `prefill`,
    the last (assistant) message is continued instead of a new turn begun."""
    text = hf_tokenizer.apply_chat_template(
        messages,
        tools=tools,
        add_generation_prompt=not prefill,
        continue_final_message=prefill,
        tokenize=False,
    )
    return hf_tokenizer.encode(text, add_special_tokens=False)
