"""The followers of n > 1 requests: sequences waiting to share their leader's prompt blocks.

An API request with `n` > 1 becomes n sequences; the first (the leader) prefills the prompt, the
others (followers, `Request.fork_parent` set) wait until the leader's prompt K/V is computed and then
fork its full prompt blocks. This module only keeps the links; the scheduler does the forking.
"""

from __future__ import annotations

from helix_server.scheduler.request import Request


class Followers:
    """Leader request id -> its followers still waiting to fork the leader's prompt blocks."""

    def __init__(self) -> None:
        self._by_leader: dict[str, list[Request]] = {}

    def __contains__(self, leader_id: str) -> bool:
        return leader_id in self._by_leader

    def link(self, follower: Request, leader_is_tracked: bool) -> bool:
        """Make `follower` wait for its `fork_parent`; returns False (and cuts the link) when the
        leader is gone or has another prompt, so the follower computes its prompt itself."""
        leader = follower.fork_parent
        if leader is None:
            return False
        if not leader_is_tracked or leader.prompt_token_ids != follower.prompt_token_ids:
            follower.fork_parent = None
            return False
        self._by_leader.setdefault(leader.request_id, []).append(follower)
        return True

    def unlink(self, request: Request) -> None:
        """A request stopped being tracked: drop it from its leader's list, and release its own
        followers that never got the prompt blocks (they compute the prompt themselves)."""
        leader = request.fork_parent
        if leader is not None:
            followers = self._by_leader.get(leader.request_id, [])
            if request in followers:
                followers.remove(request)
            if not followers:
                self._by_leader.pop(leader.request_id, None)
        for follower in self._by_leader.pop(request.request_id, ()):
            follower.fork_parent = None

    def take(self, leader: Request) -> list[Request]:
        """The leader's waiting followers, forgotten here (the caller forks them)."""
        return self._by_leader.pop(leader.request_id, [])
