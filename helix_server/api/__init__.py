"""The HTTP layer: an OpenAI-compatible Litestar app around an `AsyncEngine`.

`server.serve(config)` builds the engine and runs uvicorn with graceful draining; `app.create_app(engine,
config)` builds the Litestar app alone (tests use it with an already-built engine). The wire types live
in `protocol/`, the request-to-engine logic in `serving/`, the controllers in `routes/`.
Nothing outside this package imports it.
"""
