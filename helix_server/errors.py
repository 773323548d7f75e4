"""Errors shared by every layer.

`ParameterError` is raised wherever user input is validated (the API boundary and where a request
enters the engine); it names the offending parameter so the HTTP layer can answer with OpenAI's error
envelope (`param`, `code`) without parsing messages.
"""

from __future__ import annotations


class HelixError(Exception):
    """Base class of helix_server's own exceptions."""


class ParameterError(HelixError, ValueError):
    """Invalid user input, naming the parameter at fault.

    `code` follows OpenAI's error codes where one exists (`context_length_exceeded`), else None.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class UnsupportedModelError(HelixError, ValueError):
    """The model directory asks for something helix_server does not implement."""


class EngineDeadError(HelixError, RuntimeError):
    """The engine's background loop has stopped; no request can be served."""


class EngineOverloadedError(HelixError, RuntimeError):
    """The engine refuses a request it could serve later: its waiting queue is full, or the request
    waited in it longer than allowed. Clients should retry after `retry_after` seconds.

    `code`: "queue_full" (too many queued requests or prompt tokens) or "queue_timeout".
    """

    def __init__(self, message: str, code: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.retry_after = retry_after
