"""How one request wants its tokens chosen and when it wants to stop.

`SamplingParams` is plain data shared by the engine (stop checks, detokenizer), the runner (sampler)
and the offline API. It validates itself on construction, raising `ParameterError` that names the
parameter (OpenAI's name for it) so a bad value never reaches the engine loop. Checks that need the
model (vocabulary size, context length) happen where a request enters the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from helix_server.errors import ParameterError

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 4
MAX_STOP_STRING_CHARS = 256
MAX_LOGIT_BIAS = 100.0
# Temperatures below this are greedy (vLLM's epsilon); dividing logits by them could overflow.
GREEDY_TEMPERATURE_EPS = 1e-5
# The kinds of output constraint (`StructuredOutputSpec.kind`).
STRUCTURED_OUTPUT_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputSpec:
    """A constraint on a request's output text, as plain data (compiled by `engine.structured`).

    `kind` is one of: "json" (`value` is a JSON Schema as JSON text), "json_object" (any JSON object;
    `value` unused), "regex" (`value` is the pattern the whole output matches), "choice" (`value` is
    a JSON list of the allowed strings) or "grammar" (`value` is a Lark grammar in llguidance's
    dialect, which may embed schemas with `%json{...}`). `whitespace_pattern` (JSON kinds) is the
    regex JSON whitespace may match; None means compact JSON without whitespace. `param` is the
    request parameter it came from, named in errors ("response_format", "structured_outputs", ...).
    """

    kind: str
    value: str = ""
    whitespace_pattern: str | None = None
    param: str = "structured_outputs"

    @property
    def key(self) -> tuple[str, str, str | None]:
        """What identifies the compiled grammar (`param` only changes error messages)."""
        return (self.kind, self.value, self.whitespace_pattern)


@dataclass
class SamplingParams:
    """Sampling and stopping options of one request (vLLM's names and meanings).

    temperature 0 means greedy. `top_k` -1 and `top_p` 1 disable those filters. `max_tokens` None
    means "until the model's context is full". `logprobs` N returns the chosen token's log-probability
    plus the N most likely alternatives at every step (0 returns only the chosen one). `seed` makes the
    request's random choices reproducible whatever else runs in the same batch.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    # Speculative decoding: the most tokens to draft per step for this request (0 turns it off);
    # None takes the server's setting, which also caps it.
    speculation_depth: int | None = None
    # Structured outputs: the output must match this constraint (None: free text).
    structured_output: StructuredOutputSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    @property
    def greedy(self) -> bool:
        """True when every step takes the most likely token (no randomness)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
        )

    def _validate(self) -> None:
        _check_int("n", self.n, minimum=1)
        _check_float("temperature", self.temperature, 0.0, 2.0)
        _check_float("top_p", self.top_p, 0.0, 1.0)
        if self.top_p <= 0.0:
            raise ParameterError(f"top_p must be in (0, 1], got {self.top_p}.", "top_p")
        _check_int("top_k", self.top_k, minimum=-1)
        if self.top_k == 0:
            raise ParameterError("top_k must be -1 (disabled) or at least 1, got 0.", "top_k")
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, math.inf)
        if self.repetition_penalty <= 0.0:
            raise ParameterError(
                f"repetition_penalty must be greater than 0, got {self.repetition_penalty}.",
                "repetition_penalty",
            )
        if self.seed is not None:
            _check_int("seed", self.seed)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ParameterError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens}).",
                "min_tokens",
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, minimum=0, maximum=MAX_LOGPROBS)
        if self.speculation_depth is not None:
            _check_int("speculation_depth", self.speculation_depth, minimum=0)
        self._validate_stop()
        self._validate_logit_bias()
        self._validate_structured_output()

    def _validate_structured_output(self) -> None:
        spec = self.structured_output
        if spec is None:
            return
        if spec.kind not in STRUCTURED_OUTPUT_KINDS:
            raise ParameterError(f"Unknown structured output kind {spec.kind!r}.", spec.param)
        if self.ignore_eos:
            # A finished grammar allows only EOS: ignoring it would loop until max_tokens.
            raise ParameterError("ignore_eos cannot be combined with structured outputs.", "ignore_eos")

    def _validate_stop(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ParameterError(f"At most {MAX_STOP_STRINGS} stop sequences are allowed.", "stop")
        for text in self.stop:
            if not isinstance(text, str):
                raise ParameterError("Each stop sequence must be a string.", "stop")
            if not text:
                raise ParameterError("Stop sequences must not be empty.", "stop")
            if len(text) > MAX_STOP_STRING_CHARS:
                raise ParameterError(
                    f"Stop sequences must be at most {MAX_STOP_STRING_CHARS} characters long.", "stop"
                )
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, minimum=0)

    def _validate_logit_bias(self) -> None:
        if not self.logit_bias:
            self.logit_bias = None
            return
        bias: dict[int, float] = {}
        for key, value in self.logit_bias.items():
            try:
                token_id = int(key)
            except (TypeError, ValueError):
                raise ParameterError(
                    f"logit_bias keys must be token ids (integers), got {key!r}.", "logit_bias"
                ) from None
            if isinstance(key, float) or (isinstance(key, str) and str(token_id) != key.strip()):
                raise ParameterError(
                    f"logit_bias keys must be token ids (integers), got {key!r}.", "logit_bias"
                )
            if token_id < 0:
                raise ParameterError(f"logit_bias key {token_id} is not a valid token id.", "logit_bias")
            _check_float("logit_bias", value, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
            bias[token_id] = float(value)
        self.logit_bias = bias


def _check_int(name: str, value: object, minimum: int | None = None, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParameterError(f"{name} must be an integer, got {value!r}.", name)
    if minimum is not None and value < minimum:
        raise ParameterError(f"{name} must be at least {minimum}, got {value}.", name)
    if maximum is not None and value > maximum:
        raise ParameterError(f"{name} must be at most {maximum}, got {value}.", name)


def _check_float(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParameterError(f"{name} must be a number, got {value!r}.", name)
    if not math.isfinite(value):
        raise ParameterError(f"{name} must be a finite number, got {value}.", name)
    if not low <= value <= high:
        raise ParameterError(f"{name} must be between {low:g} and {high:g}, got {value}.", name)
