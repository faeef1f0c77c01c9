"""`flashlm bench decode` end to end on a small real store: each run its own process, the
report's figures are the runs' own (medians of their rounds, peak RSS the largest), and a
missing llama-bench is a note, not a crash."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from conftest import random_llama, save_checkpoint
from flashlm.convert import convert


def test_bench_decode_writes_each_runs_medians_and_notes_a_missing_llama_cpp(tokenizer, tmp_path):
    q8 = tmp_path / "q8"
    src = save_checkpoint(random_llama(5, eos_token_id=None), tmp_path / "ckpt", tokenizer)
    convert(src, q8, dtype="int8", progress=False)
    out = tmp_path / "d.json"
    r = subprocess.run([sys.executable, "-m", "flashlm", "bench", "decode", "--model", "tiny", "--dtypes", "int8",
                        "--store", f"int8={q8}", "--tokens", "6", "--rounds", "2", "--llama-bench", "",
                        "--quiet", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert set(rep["runs"]) == {"flashlm int8 dense in RAM", "flashlm int8 sparse default"}
    assert any("llama.cpp skipped" in n for n in rep["notes"])
    for run in rep["runs"].values():
        assert len(run["rounds"]) == 2 and run["store_dtype"] == "int8"
        assert run["ms_per_token"] == statistics.median(x["ms_per_token"] for x in run["rounds"])
        assert run["peak_rss_bytes"] == max(x["peak_rss_bytes"] for x in run["rounds"]) > 50 * 2**20
    assert rep["machine"]["cpu_count"] >= 1
