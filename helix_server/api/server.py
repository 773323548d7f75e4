"""`serve(config)`: build the engine, log what was loaded, and run the app under uvicorn.

Shutdown is graceful: on SIGINT/SIGTERM the server keeps listening but answers new requests with 503
(and /ready with 503) while in-flight requests get `server.shutdown_timeout` seconds to finish; the
rest are then aborted (their streams end with finish_reason "abort" and `[DONE]`) and the process
exits with status 0. A second signal skips the wait. uvicorn's own handler would close the listening
socket at once, so `DrainingServer` replaces it.

The port is bound before the model loads, so a port in use fails at once (exit status 1). Connections
are served by `TimedH11Protocol`: a client that sends nothing, or stalls in its request head or body,
is timed out (`header_timeout`, `body_timeout`, `keep_alive_timeout`).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import socket
from types import FrameType

import uvicorn

from helix_server.api.app import create_app
from helix_server.api.connection_timeouts import ConnectionTimeouts, TimedH11Protocol
from helix_server.api.lifecycle import drain
from helix_server.api.server_logging import AcceptErrorLog, rename_uvicorn_logger
from helix_server.api.state import STATE_KEY, ServerState
from helix_server.config import HelixConfig, ServerConfig
from helix_server.engine.async_engine import AsyncEngine
from helix_server.errors import HelixError
from helix_server.layers.cpu_kernels import start_building_cpu_kernels
from helix_server.platform.device import resolve_device
from helix_server.platform.process_policy import freeze_loaded_objects, prepare_process

logger = logging.getLogger("helix_server.api")

# Seconds uvicorn waits for connections after draining (a client that stopped reading).
CONNECTION_CLOSE_TIMEOUT_S = 5.0


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose SIGINT/SIGTERM drains the app before exiting."""

    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float) -> None:
        super().__init__(config)
        self._state = state
        self._shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        """Remember the serving loop (signal handlers schedule the drain on it), then serve."""
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(AcceptErrorLog())
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Start draining on the first signal; on the second, abort everything and exit now."""
        if self._loop is None or self.should_exit:
            self.should_exit = True
            return
        if self._drain_task is not None:
            logger.warning("second %s: aborting in-flight requests now", signal.Signals(sig).name)
            self._loop.call_soon_threadsafe(self._state.engine.abort_all)
            self.should_exit = True
            return
        logger.info("%s received: draining (up to %.1fs)", signal.Signals(sig).name, self._shutdown_timeout)
        self._loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        self._state.draining = True
        self._drain_task = self._loop.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await drain(self._state, self._shutdown_timeout)
        finally:
            self.should_exit = True


def build_engine(config: HelixConfig) -> AsyncEngine:
    """Load the model (a tqdm bar while weights load) and wrap it in an `AsyncEngine`."""
    from tqdm import tqdm

    bar: tqdm | None = None

    def progress(loaded: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="Loading weights", unit="tensor", leave=False)
        bar.update(loaded - bar.n)

    try:
        return AsyncEngine.from_config(config.engine, progress=progress)
    finally:
        if bar is not None:
            bar.close()


def log_startup(engine: AsyncEngine, config: HelixConfig, port: int) -> None:
    """Log the model, caching and queue settings, and the URL (the runtime logged device, dtype and KV pool)."""
    runtime = engine.runtime
    logger.info(
        "serving model %r from %s on %s (%s); max_model_len %d",
        runtime.model_name,
        runtime.model_dir,
        runtime.device,
        str(runtime.dtype).removeprefix("torch."),
        engine.seq_num_tokens_limit,
    )
    # (The KV pool's size was logged when it was allocated.)
    scheduler = config.engine.scheduler
    logger.info(
        "prefix caching %s; at most %s queued requests",
        "on" if config.engine.cache.enable_prefix_caching else "off",
        scheduler.max_queued_requests if scheduler.max_queued_requests is not None else "unlimited",
    )
    server = config.server
    auth = "required" if server.api_key else "off"
    logger.info("listening on %s (API key %s; docs at /docs)", server_url(server.host, port), auth)


def server_url(host: str, port: int) -> str:
    """`http://host:port`, with an IPv6 host in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening; `OSError` when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def uses_cpu_kernels(config: HelixConfig) -> bool:
    """Whether this engine will run on the CPU with helix's kernels (in float32 or bfloat16)."""
    model = config.engine.model
    if not model.cpu_kernels or model.dtype == "float16":
        return False
    try:
        return resolve_device(model.device).type == "cpu"
    except HelixError:
        return False


def raise_open_file_limit() -> None:
    """Raise the soft open-file limit to the hard one (systemd's soft default is 1,024): every
    connection holds a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.debug("could not raise the open-file limit from %d: %s", soft, exc)


def uvicorn_config(app, server_config: ServerConfig) -> uvicorn.Config:
    """uvicorn's settings for `app`: our timed HTTP/1.1 protocol, our logging, graceful shutdown."""
    timeouts = ConnectionTimeouts(
        header_timeout=server_config.header_timeout,
        body_timeout=server_config.body_timeout,
        keep_alive_timeout=server_config.keep_alive_timeout,
    )
    return uvicorn.Config(
        app,
        host=server_config.host,
        port=server_config.port,
        http=TimedH11Protocol.factory(timeouts),
        ws="none",  # no WebSocket routes: importing a WebSocket stack would only cost memory
        timeout_keep_alive=server_config.keep_alive_timeout,
        log_config=None,
        log_level=server_config.log_level.lower(),
        lifespan="on",
        timeout_graceful_shutdown=int(CONNECTION_CLOSE_TIMEOUT_S),
    )


def serve(config: HelixConfig) -> int:
    """Serve the OpenAI-compatible API until SIGINT/SIGTERM; returns the process exit status."""
    server_config = config.server
    try:
        sock = bind_socket(server_config.host, server_config.port)
    except OSError as exc:
        url = server_url(server_config.host, server_config.port)
        logger.error("cannot listen on %s: %s", url, exc.strerror or exc)
        return 1
    raise_open_file_limit()
    rename_uvicorn_logger()
    with sock:
        if uses_cpu_kernels(config):  # compile (first run only) while the weights load
            start_building_cpu_kernels()
        prepare_process(config.engine.model.device)
        try:
            engine = build_engine(config)
        except (HelixError, OSError, ValueError) as exc:
            logger.error("could not load the model: %s", exc)
            return 1
        app = create_app(engine, config)
        log_startup(engine, config, sock.getsockname()[1])
        freeze_loaded_objects()
        server = DrainingServer(uvicorn_config(app, server_config), app.state[STATE_KEY], server_config.shutdown_timeout)
        try:
            server.run(sockets=[sock])
        except SystemExit as exc:  # uvicorn exits 1 when its start-up fails
            return int(exc.code or 0)
        finally:
            engine.shutdown()
    return 0 if server.started else 1
