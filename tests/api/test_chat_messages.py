"""Chat messages reach the model's chat template: every role, text parts, tool-call history."""

from __future__ import annotations


def test_every_role_and_text_parts_reach_the_template(client):
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": [{"type": "text", "text": "Answer in Python."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Add"}, {"type": "text", "text": "two numbers."}],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
        {"role": "assistant", "content": "3", "refusal": None},
        {"role": "user", "content": "Again.", "name": "ann"},
    ]
    tokenized = client.post("/tokenize", json={"messages": messages}).json()
    text = client.post("/detokenize", json={"tokens": tokenized["tokens"]}).json()["prompt"]
    for piece in ("Be brief.", "Answer in Python.", "Add\ntwo numbers.", '"add"', "3", "Again."):
        assert piece in text
    assert text.startswith("system\nBe brief.") and "developer" not in text  # special tokens are skipped
    response = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] == tokenized["count"]
