"""Token counting for streamed responses (the usage chunk)."""

from __future__ import annotations

from helix_server.api.protocol.common import PromptTokensDetails, UsageInfo
from helix_server.engine.outputs import RequestOutput


def usage_info(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> UsageInfo:
    """OpenAI's `usage`, with `prompt_tokens_details.cached_tokens` (prefix-cache hits)."""
    return UsageInfo(
        prompt_tokens, completion_tokens, prompt_tokens + completion_tokens, PromptTokensDetails(cached_tokens)
    )


class UsageCounter:
    """Counts prompt tokens once per prompt, every generated token of every choice, and each
    prompt's tokens found in the prefix cache."""

    def __init__(self, prompts: list[list[int]]) -> None:
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.completion_tokens = 0
        # engine request id (one per prompt) -> its cached prompt tokens
        self._cached: dict[str, int] = {}

    def add(self, output: RequestOutput) -> None:
        """Count the tokens of one delta."""
        self.completion_tokens += sum(len(seq.token_ids) for seq in output.outputs)
        self._cached[output.request_id] = max(self._cached.get(output.request_id, 0), output.num_cached_tokens)

    def usage(self) -> UsageInfo:
        """The totals so far."""
        return usage_info(self.prompt_tokens, self.completion_tokens, sum(self._cached.values()))
