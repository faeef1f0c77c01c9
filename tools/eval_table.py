"""Markdown table of a `flashlm eval` JSON: python tools/eval_table.py eval.json [more.json ...]"""

from __future__ import annotations

import json
import sys


def table(path: str) -> str:
    r = json.load(open(path))
    d = r["dense"]
    out = [f"`{path}`: {r['tokens']['wiki']} + {r['tokens']['news']} tokens, dense ppl wiki {d['ppl_wiki']:.2f} / "
           f"news {d['ppl_news']:.2f}, dense FFN {d['ffn_ms_per_token']:.1f} ms/token ({r['threads']} thread)", "",
           "| selector | rule | density | k | cache budget | ppl wiki | ppl news | read/token | DRAM held | recall | "
           "select / FFN time |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["runs"]:
        rule = "top-k" if x.get("rule", "top_k") == "top_k" else f"mass {x['mass']:.2f}"
        if x.get("label"):
            rule += f" ({x['label']})"
        cap = "-" if x.get("cache_capacity") is None else f"{x['cache_capacity']:.0%}"
        dens = f"{x['density']:.0%}" if x.get("rule", "top_k") == "top_k" else f"{x['predicted_density']:.0%} (mean)"
        dram = f"{x['dram_fraction']:.0%}" if "dram_fraction" in x else "-"
        out.append(f"| {x['selector']} | {rule} | {dens} | {x['window']} | {cap} | {x['ppl_wiki_rel']:+.2%} | "
                   f"{x['ppl_news_rel']:+.2%} | {x['ffn_read_fraction']:.2%} | {dram} | {x['recall']:.1%} | "
                   f"{x['select_over_ffn']:.0%} |")
    dft = r.get("default") or {}
    if dft:
        out.append("")
        out.append(f"default: {dft['selector']} {dft['density']:.0%} k={dft['window']}, meets goals: {dft['meets_goals']}")
    return "\n".join(out)


if __name__ == "__main__":
    print("\n\n".join(table(p) for p in sys.argv[1:]))
