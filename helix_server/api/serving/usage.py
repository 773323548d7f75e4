"""Token counting for streamed responses (the usage chunk)."""

from __future__ import annotations

from helix_server.api.protocol.common import UsageInfo
from helix_server.engine.outputs import RequestOutput


class UsageCounter:
    """Counts prompt tokens once per prompt and every generated token of every choice."""

    def __init__(self, prompts: list[list[int]]) -> None:
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.completion_tokens = 0

    def add(self, output: RequestOutput) -> None:
        """Count the tokens of one delta."""
        self.completion_tokens += sum(len(seq.token_ids) for seq in output.outputs)

    def usage(self) -> UsageInfo:
        """The totals so far."""
        return UsageInfo(
            self.prompt_tokens, self.completion_tokens, self.prompt_tokens + self.completion_tokens
        )
