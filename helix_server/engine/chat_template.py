"""Render a model's Jinja chat template the way transformers' `apply_chat_template` does.

The environment is the one transformers gives templates (and that templates on the Hub are written
for): a sandbox that cannot change its inputs, `trim_blocks` and `lstrip_blocks`, `break`/`continue`,
the `{% generation %}` block (rendered as its body), `raise_exception`, `strftime_now`, a `tojson`
that does not escape HTML and takes `indent`/`separators`/`sort_keys`, and `dict`/`namespace` that
refuse underscore names. Messages lose their None-valued keys, reasoning is offered under the
names templates read, and `continue_final_message` cuts the prompt after the final message's text.
`tests/engine/test_chat_template.py` checks the output against transformers' on many templates.

helix renders here, not through transformers, so that a server never imports transformers (see
`helix_server.platform.child_process`): the tokenizer comes from `tokenizer.json`'s Rust backend.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The names a message's reasoning may come under; templates read the first (gpt-oss's: "thinking").
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Appended to the text to continue, then found in the rendered prompt, which is cut there.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks the assistant's tokens for training masks):
    rendered as its body."""

    tags = frozenset({"generation"})

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` without underscore-prefixed attributes (no reaching CPython's internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick: `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
            )


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)`, without the type's other attributes."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template (cached by its source); raises jinja2's TemplateSyntaxError."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def select_template(chat_template: str | Mapping[str, str], has_tools: bool) -> str:
    """The template to use: the only one, or from a set of named ones "tool_use" when there are
    tools and it exists, else "default" (transformers' choice). ValueError if there is none."""
    if isinstance(chat_template, str):
        return chat_template
    if has_tools and "tool_use" in chat_template:
        return chat_template["tool_use"]
    if "default" in chat_template:
        return chat_template["default"]
    raise ValueError(f"the model has several chat templates and none is the default: {sorted(chat_template)}")


def render_chat(
    source: str,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    **variables: Any,
) -> str:
    """The prompt `source` makes of `messages` (dicts). `variables` reach the template as globals
    (the tokenizer's special tokens, `enable_thinking`, ...). Raises ValueError for inputs the
    template cannot take and jinja2's TemplateError for what the template itself refuses."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
    if documents is not None and not all(isinstance(document, dict) for document in documents):
        raise TypeError("documents must be a list of dicts")
    chat = _aliased_reasoning([_without_none(_plain(message)) for message in messages])
    cut_at: str | None = None
    if continue_final_message:
        cut_at = _tag_final_message(chat, source, continue_final_message)
    rendered = compile_template(source).render(
        messages=chat,
        tools=_plain(tools),
        documents=_plain(documents),
        add_generation_prompt=add_generation_prompt,
        **_plain(variables),
    )
    if cut_at is not None:
        rendered = _cut_after_final_message(rendered, cut_at)
    return rendered


def _tag_final_message(chat: list[dict[str, Any]], source: str, field: bool | str) -> str:
    """Append the continuation tag to the final message's text (in each field the template may read
    it from); return that text."""
    if not chat:
        raise ValueError("continue_final_message is set but the conversation is empty")
    field = field if isinstance(field, str) else "content"
    final = chat[-1].get(field)
    if final is None:
        raise ValueError(f"continue_final_message is set but the final message has no {field!r} to continue")
    fields = [field]
    if field in _REASONING_FIELDS:  # reasoning sits under several names: tag each copy
        fields = [name for name in _REASONING_FIELDS if chat[-1].get(name) == final]
    if not any(name in source for name in fields):
        raise ValueError(f"continue_final_message is set to {field!r}, which this chat template does not read")
    if isinstance(final, (list, tuple)):
        for block in reversed(final):  # the last text block is the one to continue
            if isinstance(block, dict) and "text" in block:
                text = block["text"]
                block["text"] = text + _CONTINUE_TAG
                return text
        raise ValueError("continue_final_message is set but the final message has no text to continue")
    for name in fields:
        chat[-1][name] = chat[-1][name] + _CONTINUE_TAG
    return final


def _cut_after_final_message(rendered: str, final: str) -> str:
    if final.strip() not in rendered or _CONTINUE_TAG.strip() not in rendered:
        raise ValueError(
            "continue_final_message is set but the chat template dropped part of the final message, "
            "so the prompt cannot end with it"
        )
    at = rendered.rindex(_CONTINUE_TAG.strip())
    if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()  # the template trimmed the message's trailing space


def _without_none(message: Any) -> Any:
    """A message without its None-valued keys (OpenAI clients send `content: null`, `tool_calls:
    null`; many templates print "None" for those but handle a missing key)."""
    if not isinstance(message, dict):
        raise TypeError(f"chat messages must be dicts, not {type(message).__name__}")
    return {key: value for key, value in message.items() if value is not None}


def _aliased_reasoning(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each message's reasoning also under `reasoning_content` (the standard name) and `thinking`."""
    out = []
    for message in chat:
        reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _plain(value: Any) -> Any:
    """A fresh copy of `value` made of JSON's types only (str/int/float/bool/None, dict, list,
    tuple): the template cannot reach another object's methods, nor change the caller's data."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    return f"<{type(value).__name__}>"
