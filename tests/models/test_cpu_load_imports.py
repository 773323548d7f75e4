"""Loading and running a model on the CPU imports neither triton nor torch._dynamo.

With triton installed, importing it leaves nanobind objects alive at exit, which print hundreds of
"leaked type/function" lines when the server shuts down; torch._dynamo imports triton, and a random
init on the meta device (`normal_`) imports torch._dynamo. Checked in a fresh process through the
public `LLM` API: this test session imports triton itself (the Triton interpreter tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import json, sys
from helix_server.engine.llm import LLM
from helix_server.sampling_params import SamplingParams

llm = LLM(sys.argv[1], num_kv_blocks=16, max_model_len=64, **json.loads(sys.argv[2]))
out = llm.generate([[5, 6, 7, 5, 6]], SamplingParams(max_tokens=4, temperature=0))
print(json.dumps({"tokens": out[0].outputs[0].token_ids,
                  "imported": sorted(m for m in ("triton", "torch._dynamo") if m in sys.modules)}))
"""


@pytest.mark.parametrize(
    "settings",
    [{}, {"dtype": "bfloat16", "quantization": "int8", "speculative_method": "ngram"}],
    ids=["float32", "bfloat16-int8-ngram"],
)
def test_a_cpu_model_never_imports_triton(tiny_model_dir, settings):
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tiny_model_dir), json.dumps(settings)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["tokens"]) == 4
    assert report["imported"] == []
