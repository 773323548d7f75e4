"""helix's chat-template renderer (`engine.chat_template`) against transformers' `apply_chat_template`,
the reference: the same text for the same template, messages and variables, over templates that use
what Hub templates use (tools, documents, `tojson` options, `namespace`, loop controls,
`raise_exception`, `{% generation %}`, reasoning fields, several named templates) and over
`continue_final_message`."""

from __future__ import annotations

import inspect

import msgspec
import pytest

from helix_server.engine.tokenizer import Tokenizer
from helix_server.engine.tokenizer_spec import read_tokenizer_spec
from helix_server.errors import ParameterError

CHATML_TOOLS = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}{% continue %}{% endif %}
<|im_start|>{{ message.role }}
{% if message.content is string %}{{ message.content }}{% elif message.content %}{% for block in message.content %}{{ block.text }}{% endfor %}{% endif %}
{%- if message.tool_calls is defined %}{% for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}{% endif %}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

HEADERS = """{{ bos_token }}{% set ns = namespace(system='', turns=0) %}
{%- for message in messages %}{% if message['role'] == 'system' %}{% set ns.system = message['content'] %}{% endif %}{% endfor %}
{%- if ns.system %}<|start_header_id|>system<|end_header_id|>

{{ ns.system | trim }}<|eot_id|>{% endif %}
{%- for message in messages if message.role != 'system' %}{% set ns.turns = ns.turns + 1 %}
{%- if ns.turns > 6 %}{% break %}{% endif %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>

{% if message.role == 'assistant' %}{% generation %}{{ message['content'] | trim }}{% endgeneration %}{% else %}{{ message['content'] | trim }}{% endif %}<|eot_id|>
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

INST = """{{ bos_token }}{% for message in messages %}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}
{%- if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}{% endif %}
{%- endfor %}"""

JSON_AND_DOCS = """{% if documents %}Documents:
{% for doc in documents %}[{{ loop.index }}] {{ doc.title }}: {{ doc.text }}
{% endfor %}{% endif %}{% if tools %}{{ tools | tojson(indent=2, sort_keys=True) }}
{{ dict(count=tools | length) | tojson(separators=(',', ':')) }}
{% endif %}{% for m in messages %}{{ m | tojson }}
{% if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>{% endif %}{% endfor %}
{%- if add_generation_prompt %}>>> {% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}"""

NAMED = {"default": INST, "tool_use": CHATML_TOOLS}

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather <b>now</b> & \"here\"",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
]
DOCS = [{"title": "Paris", "text": "The capital of France."}, {"title": "Émile", "text": "café ☕"}]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello "}, {"role": "user", "content": "日本語 and 🙂"}],
    [{"role": "user", "content": [{"type": "text", "text": "part one "}, {"type": "text", "text": "two"}]}],
    [{"role": "user", "content": "weather?"},
     {"role": "assistant", "content": None, "tool_calls": [
         {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
     {"role": "tool", "content": "sunny", "tool_call_id": "c1"}],
    [{"role": "user", "content": "think"}, {"role": "assistant", "content": "42", "reasoning": "6 times 7"}],
]


@pytest.fixture(scope="module")
def spec(tokenizer_dir):
    return read_tokenizer_spec(str(tokenizer_dir))


def _reference(reference_tokenizer, template, messages, **kwargs) -> str:
    options = {"tokenize": False, "chat_template": template}
    if "sanitize_control_tokens" in inspect.signature(reference_tokenizer.apply_chat_template).parameters:
        options["sanitize_control_tokens"] = False
    saved = reference_tokenizer.chat_template
    reference_tokenizer.chat_template = template  # a dict of named templates is chosen from here
    try:
        if isinstance(template, dict):
            del options["chat_template"]
        return reference_tokenizer.apply_chat_template(messages, **options, **kwargs)
    finally:
        reference_tokenizer.chat_template = saved


def _helix(spec, template) -> Tokenizer:
    return Tokenizer(msgspec.structs.replace(spec, chat_template=template))


CASES = [
    (CHATML_TOOLS, {}), (CHATML_TOOLS, {"tools": TOOLS}), (HEADERS, {}), (JSON_AND_DOCS, {}),
    (JSON_AND_DOCS, {"tools": TOOLS, "documents": DOCS}), (JSON_AND_DOCS, {"enable_thinking": False}),
]


@pytest.mark.parametrize("template,kwargs", CASES, ids=lambda value: str(value)[:12])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_same_text_as_transformers(reference_tokenizer, spec, template, kwargs, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    expected = _reference(reference_tokenizer, template, messages, add_generation_prompt=add_generation_prompt, **kwargs)
    got = _helix(spec, template).render_chat_template(messages, add_generation_prompt, **kwargs)
    assert got == expected


def test_the_named_template_follows_the_tools(reference_tokenizer, spec):
    messages = CONVERSATIONS[0]
    for kwargs in ({}, {"tools": TOOLS}):
        expected = _reference(reference_tokenizer, NAMED, messages, add_generation_prompt=True, **kwargs)
        assert _helix(spec, NAMED).render_chat_template(messages, True, **kwargs) == expected
    assert "[INST]" in _helix(spec, NAMED).render_chat_template(messages, True)


@pytest.mark.parametrize("content", ["The answer is", "The answer is  ", [{"type": "text", "text": "Part"}]])
@pytest.mark.parametrize("template", [CHATML_TOOLS, HEADERS])
def test_continue_final_message_like_transformers(reference_tokenizer, spec, template, content):
    messages = [{"role": "user", "content": "Go on"}, {"role": "assistant", "content": content}]
    expected = _reference(reference_tokenizer, template, messages, continue_final_message=True)
    got = _helix(spec, template).render_chat_template(messages, False, continue_final_message=True)
    assert got == expected
    assert got.rstrip().endswith("is") or got.endswith("Part")


def test_the_templates_own_refusal_is_a_parameter_error(spec):
    with pytest.raises(ParameterError, match="roles must alternate") as info:
        _helix(spec, INST).render_chat_template([{"role": "assistant", "content": "first"}])
    assert info.value.param == "messages"


@pytest.mark.parametrize("escape", [
    "{{ messages.__class__.__mro__ }}",
    "{{ ''.__class__.__subclasses__() }}",
    "{% set ns = namespace() %}{% set ns._private = 1 %}",
    "{{ messages.append(1) }}",
])
def test_the_sandbox_holds(spec, escape):
    with pytest.raises(ParameterError):
        _helix(spec, escape).render_chat_template(CONVERSATIONS[0])


def test_the_callers_messages_are_not_changed(spec):
    messages = [{"role": "user", "content": "Go on"}, {"role": "assistant", "content": "so"}]
    before = repr(messages)
    _helix(spec, CHATML_TOOLS).render_chat_template(messages, False, continue_final_message=True)
    assert repr(messages) == before
