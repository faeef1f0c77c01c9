"""What a memory budget leaves for the neuron caches (and selectors), from a model's shapes.

`python -m flashlm.bench.budget_plan STORE... [--json FILE]` prints the table.

A store in format F (bits per weight b, scales included) holds:
  embeddings  V d b/8            on flash when untied (a token needs one row; tied: it is the head)
  head        V d b/8            resident (every token multiplies all of it); tied: the embeddings
  attention   L (d (H + 2 K) h + H h d) b/8 + biases        resident (H heads, K KV heads, h head dim)
  norms       (2 L + 1) d x 2 B                              resident
  FFN         L n stride, stride = round_up(3 d b/8, 512)   on flash, one padded bundle per neuron
  store S = embeddings (if untied) + head + attention + norms + FFN
At a budget fraction f of S and a context of C tokens (fp16 KV: L 2 K h 2 B per token):
  left  = f S - head - attention - norms - KV(C)        caches AND selectors share it
  cache fraction = left / FFN                        (clipped to [0, 1]; a cache slot is a stride)
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flashlm.kernels.formats import GROUP, row_bytes

# bits per weight of each format, its scales (and q4's mins) included: q4 5.0, q8 8.5
BITS = {fmt: 8 * row_bytes(fmt, GROUP) / GROUP for fmt in ("q4", "q8")}
BUDGETS = (1.0, 0.75, 0.5, 0.35)
CONTEXTS = (512, 2048)


@dataclass(frozen=True)
class Shapes:
    vocab: int
    d: int
    n_layers: int
    d_ff: int
    n_heads: int
    n_kv: int
    head_dim: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, c: dict[str, Any], model_type: str = "") -> Shapes:
        h = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        return cls(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"],
                   c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"], h,
                   bool(c.get("tie_word_embeddings", False)), model_type == "qwen2" or bool(c.get("attention_bias")))

    @property
    def attention_params(self) -> int:
        d, H, K, h = self.d, self.n_heads, self.n_kv, self.head_dim
        return self.n_layers * (d * (H + 2 * K) * h + H * h * d)

    @property
    def bias_params(self) -> int:
        return self.n_layers * (self.n_heads + 2 * self.n_kv) * self.head_dim if self.qkv_bias else 0

    def kv_bytes_per_token(self, itemsize: int = 2) -> int:
        return self.n_layers * 2 * self.n_kv * self.head_dim * itemsize


def round_up(x: float, m: int) -> int:
    return int(math.ceil(x / m) * m)


def gated_bundle_bytes(s: Shapes, bits: float) -> float:
    """Bytes of a (gate, up, down) bundle of d values a part at `bits` per weight."""
    return 3 * s.d * bits / 8


def stride(s: Shapes, bits: float, block: int = 512) -> int:
    return round_up(gated_bundle_bytes(s, bits), block)


def plan(s: Shapes, fmt: str, budget: float, context: int) -> dict[str, float]:
    """Bytes of each part of a `fmt` store and what a `budget` fraction of it leaves."""
    b = BITS[fmt]
    table = s.vocab * s.d * b / 8
    head = table
    embed_flash = 0.0 if s.tied else table
    attn = s.attention_params * b / 8 + s.bias_params * 2
    norms = (2 * s.n_layers + 1) * s.d * 2
    ffn = s.n_layers * s.d_ff * stride(s, b)
    store = embed_flash + head + attn + norms + ffn
    kv = s.kv_bytes_per_token() * context
    left = budget * store - head - attn - norms - kv
    return {"format": fmt, "budget": budget, "context": context, "store_bytes": store, "embeddings_flash_bytes": embed_flash,
            "head_bytes": head, "attention_bytes": attn, "norm_bytes": norms, "ffn_flash_bytes": ffn,
            "bundle_bytes": gated_bundle_bytes(s, b), "stride_bytes": stride(s, b), "kv_bytes": kv,
            "budget_bytes": budget * store, "left_bytes": left, "cache_fraction": min(1.0, max(0.0, left / ffn))}


def selector_bytes(s: Shapes, kind: str, fmt: str = "q4") -> float:
    """Resident bytes of a selector: "shadow_intB" (gate and up at B bits + an fp16 scale per 32),
    "gate_intB" (gate only), "lowrank_R" (rank-R predictor A (R, d), B (n, R), b (n,) in fp16),
    "static" / "oracle" / "none" (0: the oracle is a reference, counted as 0)."""
    if kind in ("static", "oracle", "none"):
        return 0.0
    if kind.startswith("shadow_int") or kind.startswith("gate_int"):
        bits = int(kind.split("_int")[1]) + 0.5
        parts = 2 if kind.startswith("shadow") else 1
        return s.n_layers * parts * s.d_ff * s.d * bits / 8
    if kind.startswith("lowrank_"):
        r = int(kind.split("_")[1])
        return s.n_layers * ((s.d + s.d_ff) * r + s.d_ff) * 2
    raise ValueError(f"unknown selector {kind!r}")


def table(shapes: dict[str, Shapes]) -> list[dict[str, Any]]:
    rows = []
    for name, s in shapes.items():
        for fmt in BITS:
            for ctx in CONTEXTS:
                for f in BUDGETS:
                    rows.append({"model": name, **plan(s, fmt, f, ctx)})
    return rows


def shapes_of(store_path: str | Path) -> Shapes:
    m = json.loads((Path(store_path) / "manifest.json").read_text())
    return Shapes.from_config(m["config"], m["model_type"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m flashlm.bench.budget_plan", description=__doc__.splitlines()[0])
    p.add_argument("stores", nargs="+", metavar="STORE")
    p.add_argument("--json", default=None, metavar="FILE")
    a = p.parse_args(argv)
    shapes = {Path(x).name: shapes_of(x) for x in a.stores}
    rows = table(shapes)
    mb = 1e6
    print("| model | format | context | store MB | head+attn MB | KV MB | FFN MB | stride B | budget | left MB | cache |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['format']} | {r['context']} | {r['store_bytes'] / mb:.0f} | "
              f"{(r['head_bytes'] + r['attention_bytes']) / mb:.0f} | {r['kv_bytes'] / mb:.1f} | "
              f"{r['ffn_flash_bytes'] / mb:.0f} | {r['stride_bytes']} | {r['budget']} | {r['left_bytes'] / mb:.0f} | "
              f"{r['cache_fraction']:.1%} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"shapes": {k: asdict(v) for k, v in shapes.items()}, "rows": rows},
                                           indent=1) + "\n")


if __name__ == "__main__":
    main()
