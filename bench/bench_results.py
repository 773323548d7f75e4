"""Where a benchmark run is recorded: one JSON file, by default under bench/results/.

The JSON files behind docs/benchmarks.md's generated tables are committed (see .gitignore and
`render_tables.py`); the others stay local.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def save_results(results: dict, out: Path | str) -> Path:
    """Write `results` as indented JSON to `out` (making its folder), say where, and return the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {out}", flush=True)
    return out
