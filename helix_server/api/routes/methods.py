"""HTTP method sets shared by route handlers."""

from __future__ import annotations

from litestar.enums import HttpMethod

# Read-only routes that uptime checkers probe: HEAD runs the GET handler and the server drops the body.
GET_AND_HEAD = [HttpMethod.GET, HttpMethod.HEAD]
