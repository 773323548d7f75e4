"""`helix-server` (also `python -m helix_server`): serve a model over HTTP, or generate offline.

    helix-server serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--config FILE.toml] ...
    helix-server generate --prompt "def fibonacci(n):" [--max-tokens 64] [--temperature 0] ...

Every engine and server setting is a flag, an `HELIX_*` environment variable and a TOML key (see
`helix_server.settings`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from helix_server import __version__
from helix_server.errors import HelixError
from helix_server.settings import add_setting_flags, build_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="helix-server",
        description="OpenAI-compatible LLM inference server for local Hugging Face models.",
    )
    parser.add_argument("--version", action="version", version=f"helix-server {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="Serve the OpenAI-compatible HTTP API (the default command).")
    serve.add_argument("--config", dest="config_file", help="TOML file with settings (see configs/).")
    add_setting_flags(serve)

    generate = commands.add_parser("generate", help="Complete one prompt offline and print the text.")
    generate.add_argument("--config", dest="config_file", help="TOML file with settings.")
    generate.add_argument("--prompt", required=True, help="Text to complete.")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--sampling-seed", type=int, default=None, help="Seed of this request.")
    add_setting_flags(generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["serve", *argv]
    args = build_parser().parse_args(argv)
    try:
        config = build_config(vars(args), config_file=args.config_file)
    except (HelixError, OSError) as exc:
        print(f"helix-server: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "generate":
        return _generate(args, config)
    from helix_server.api.server import serve  # the HTTP stack is only imported to serve

    return serve(config)


def _generate(args: argparse.Namespace, config) -> int:
    from helix_server.engine.core import EngineCore
    from helix_server.sampling_params import SamplingParams

    engine = EngineCore(config.engine)
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.sampling_seed
    )
    engine.add_request("cli", engine.tokenizer.encode(args.prompt), params)
    sys.stdout.write(args.prompt)
    while engine.has_unfinished_requests():
        for output in engine.step():
            for seq in output.outputs:
                sys.stdout.write(seq.text)
                sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
