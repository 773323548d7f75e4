"""`ResponseStore`: the bounded in-memory store behind `store: true`, `previous_response_id` and
`GET /v1/responses/{id}`.

It keeps at most `capacity` responses (`--max-stored-responses`) and forgets the oldest first; 0
keeps none. Each entry holds the response object and the conversation that led to it (earlier turns,
its input, its output as an assistant turn, without `instructions`, which OpenAI does not carry over),
so a follow-up request continues it. The conversation's messages are shared between entries, not
copied. Everything runs on the event loop, so no lock is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from helix_server.api.protocol.chat import ChatMessage
from helix_server.api.protocol.responses import ResponseObject


@dataclass
class StoredResponse:
    """One stored response and the conversation up to and including its output."""

    response: ResponseObject
    conversation: list[ChatMessage]


class ResponseStore:
    """At most `capacity` responses by id, oldest forgotten first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    @property
    def enabled(self) -> bool:
        """Whether responses are stored at all."""
        return self.capacity > 0

    def put(self, entry: StoredResponse) -> None:
        """Store `entry` (a no-op when disabled), forgetting the oldest beyond the capacity."""
        if not self.enabled:
            return
        self._entries[entry.response.id] = entry
        self._entries.move_to_end(entry.response.id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        """The stored response `response_id`, or None."""
        return self._entries.get(response_id)

    def delete(self, response_id: str) -> bool:
        """Forget `response_id`; whether it was there."""
        return self._entries.pop(response_id, None) is not None
