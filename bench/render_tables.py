"""Render docs/benchmarks.md's generated tables from the JSON files the benchmarks write.

Each generated table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->` in the page and is
rendered from `bench/results/NAME.json` by the function of that name below, so a table cannot say
something its JSON does not. `python bench/render_tables.py` rewrites the page; `--check` exits 1
(and names the tables) when the page differs from what the JSON gives (the test suite runs it).
These JSON files are committed: .gitignore keeps the rest of bench/results/ local and names each of
them, so a new table's JSON is added there too (tests/test_benchmark_tables.py checks both lists).

    python bench/render_tables.py [--check] [--page docs/benchmarks.md] [--results bench/results]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.DOTALL)


def _command(data: dict) -> str:
    """The recorded command line, without its `--out` path (the results land in bench/results/)."""
    return re.sub(r" --out \S+", "", data.get("command", ""))


def _load_note(data: dict) -> str:
    before, after = data.get("load_average_before"), data.get("load_average_after")
    if before is None:
        return ""
    return f" Load average {before:.1f} before and {after:.1f} after the run: measured under load."


def peer_serving(data: dict) -> str:
    """helix against llama.cpp's llama-server, and vLLM when the run had it (`bench/peer_serving.py`).
    vLLM's resident set is not shown: its engine runs in a child process the reading misses."""
    work = data["workload"]
    servers = [("helix", data["helix"])]
    if "llama_server" in data:
        servers.append(("llama.cpp `llama-server`", data["llama_server"]))
    if "vllm" in data:
        servers.append(("vLLM (CPU)", {**data["vllm"], "memory": {}}))
    shared = work.get("shared_prefix")  # runs before this workload existed have no such column
    header = f"| server | batch-1 decode tok/s | batch-1 TTFT | {work['concurrent']} concurrent, output tok/s |"
    header += f" {shared} sharing a prefix: median TTFT |" if shared else ""
    rows = [header + " RSS idle after the workload (peak) |", "|---|---|---|---|---|" + ("---|" if shared else "")]
    for name, result in servers:
        batch1, memory = result["batch1"], result.get("memory", {})
        conc = result.get("concurrent")
        rss = f"{memory['rss_mb']:.0f} MiB ({memory['peak_rss_mb']:.0f} MiB)" if memory.get("rss_mb") else "-"
        conc_cell = f"{conc['output_tok_s']:.1f}" if conc else "-"
        shared_cell = f" {result['shared_prefix']['ttft_median_s']:.2f} s |" if shared else ""
        rows.append(f"| {name} | {batch1['decode_tok_s']:.1f} | {batch1['ttft_s'] * 1000:.0f} ms | {conc_cell} |"
                    f"{shared_cell} {rss} |")
    # A ratio row per peer: helix's rates over the peer's, and the peer's shared-prefix TTFT over helix's.
    for key, peer, label in (("llama", "llama_server", "llama-server"), ("vllm", "vllm", "vLLM")):
        if f"helix_over_{key}_batch1" not in data:
            continue
        conc_ratio = data.get(f"helix_over_{key}_concurrent")
        conc_cell = f"**{conc_ratio:.2f}x**" if conc_ratio is not None else "-"
        lead = data.get(f"ttft_lead_over_{peer}_shared_prefix")
        shared_cell = (f" {label} / helix: **{lead:.2f}x** |" if lead is not None else " - |") if shared else ""
        rows.append(f"| helix / {label} | **{data[f'helix_over_{key}_batch1']:.2f}x** | | {conc_cell} |{shared_cell} |")
    note = (f"\n{work['requests']} sequential requests of {work['max_tokens']} tokens (medians), then "
            f"{work['concurrent']} at once (prompts 64-1,024 words, 64-256 output tokens)"
            + (f", then {shared} at once sharing a 1,000-word prompt seen once before (16 output tokens each)"
               if shared else "")
            + f". `{_command(data)}`." + _load_note(data) + "\n")
    return "\n".join(rows) + "\n" + note


def default_speculation(data: dict) -> str:
    """Speculative decoding on the default model, per proposer (`bench/default_speculation.py`)."""
    methods = data["methods"]
    kinds = list(next(iter(methods.values())))
    baseline = next(iter(methods))
    header = "| proposer (depth `auto`) | " + " | ".join(
        f"{k}: tok/s (speedup; per CPU second), tokens per step, accepted / drafted" for k in kinds
    )
    rows = [header + " | same greedy text |", "|---|" + "---|" * len(kinds) + "---|"]
    for method, row in methods.items():
        cells = [
            f"{row[k]['tok_s_median']:.1f} ({row[k]['speedup']:.2f}x; {row[k]['cpu_speedup']:.2f}x), "
            f"{row[k]['tokens'] / row[k]['steps']:.2f}, {row[k]['accepted']} / {row[k]['drafted']}"
            for k in kinds
        ]
        same = all(row[k][f"same_text_as_{baseline}"] for k in kinds)
        rows.append(f"| {method} | " + " | ".join(cells) + f" | {'yes' if same else '**no**'} |")
    note = (f"\n{data['model']}, dtype {data['dtype']}, one request at a time, greedy, up to {data['max_tokens']} "
            f"tokens; medians of {data['rounds']} interleaved rounds. `{_command(data)}`."
            + _load_note(data) + "\n")
    return "\n".join(rows) + "\n" + note


RENDERERS: dict[str, Callable[[dict], str]] = {
    "peer_serving": peer_serving,
    "peer_serving_bf16_peers": peer_serving,
    "peer_serving_f32_peers": peer_serving,
    "default_speculation": default_speculation,
}


def render_page(page: str, results: Path) -> str:
    """`page` with every generated table rendered afresh from its JSON file under `results`."""

    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in RENDERERS:
            raise SystemExit(f"no renderer for table {name!r} (known: {', '.join(RENDERERS)})")
        data = json.loads((results / f"{name}.json").read_text())
        return match.group(1) + RENDERERS[name](data) + match.group(4)

    return BLOCK.sub(replace, page)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when the page is stale; change nothing")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    page = args.page.read_text()
    rendered = render_page(page, args.results)
    if args.check:
        stale = [m.group("name") for m, n in zip(BLOCK.finditer(page), BLOCK.finditer(rendered)) if m.group(0) != n.group(0)]
        if stale:
            print(f"{args.page}: stale tables {', '.join(stale)}; run python bench/render_tables.py", file=sys.stderr)
            return 1
        return 0
    args.page.write_text(rendered)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
