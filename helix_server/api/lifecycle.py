"""Start-up, warm-up, draining and shutdown of the engine behind the app.

Start-up starts the engine thread inside the running loop and warms the model up with one tiny
generation in the background (/ready stays 503 until it is done). Draining stops admitting work,
waits up to `shutdown_timeout` for in-flight requests, then aborts the rest: their streams end with
a finish_reason "abort" chunk and `[DONE]`.
"""

from __future__ import annotations

import logging
import time

from litestar import Litestar

from helix_server.api.state import STATE_KEY, ServerState
from helix_server.sampling_params import SamplingParams

logger = logging.getLogger("helix_server.api")

WARMUP_PROMPT = "Hello"
# With speculative decoding the warm-up generates a little more, so that drafts get verified and
# the start-up log can report a first acceptance rate.
WARMUP_SPECULATIVE_TOKENS = 16
# After aborting, how long the aborted responses get to send their last events.
ABORT_GRACE_S = 5.0


async def warm_up(state: ServerState) -> None:
    """Run one tiny greedy generation, then mark the server ready."""
    engine = state.engine
    started = time.monotonic()
    speculative = engine.num_speculative_tokens > 0
    max_tokens = WARMUP_SPECULATIVE_TOKENS if speculative else 1
    try:
        token_ids = engine.tokenizer.encode(WARMUP_PROMPT) or [0]
        stream = await engine.add_request(
            token_ids[:1],
            SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
            request_id="helix-warmup",
        )
        async for output in stream:
            if output.finished and any(seq.finish_reason == "error" for seq in output.outputs):
                logger.error("warm-up generation failed: %s", output.error)
                return
            if output.finished and speculative and output.metrics is not None:
                rate = output.metrics.acceptance_rate
                logger.info(
                    "speculative decoding warm-up: %d drafted tokens, acceptance rate %s",
                    output.metrics.num_draft_tokens,
                    "n/a" if rate is None else f"{rate:.2f}",
                )
    except Exception:
        logger.exception("warm-up generation failed")
        return
    state.ready = True
    logger.info("model warmed up in %.2fs; ready", time.monotonic() - started)


async def start_engine(app: Litestar) -> None:
    """Litestar on_startup: start the engine thread in this loop and warm up in the background."""
    state: ServerState = app.state[STATE_KEY]
    state.engine.start()
    state.spawn(warm_up(state))


async def stop_engine(app: Litestar) -> None:
    """Litestar on_shutdown: abort what is left and stop the engine thread."""
    state: ServerState = app.state[STATE_KEY]
    state.draining = True
    state.ready = False
    for task in list(state.background_tasks):
        task.cancel()
    state.engine.abort_all()
    state.engine.shutdown()


async def drain(state: ServerState, timeout: float) -> None:
    """Stop admitting, let in-flight requests finish for up to `timeout` s, then abort the rest."""
    state.draining = True
    state.ready = False
    if state.active.count:
        logger.info("draining: waiting up to %.1fs for %d request(s)", timeout, state.active.count)
    if await state.active.wait_idle(timeout):
        return
    logger.warning("shutdown timeout: aborting %d request(s)", state.active.count)
    state.engine.abort_all()
    if not await state.active.wait_idle(ABORT_GRACE_S):
        logger.warning("%d response(s) still open after aborting; closing anyway", state.active.count)
