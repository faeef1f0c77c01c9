"""What a quantised store (dtype "int8", "q4" or "q4d8") holds, as the writer encodes it (the
quantisers themselves are `flashlm.kernels.quantizers`).

- FFN bundles: each part (gate row, up row, down column; OPT's fc1 row, fc2 column) quantised
  along the neuron's own d values, in groups of 32, then packed as `flashlm.kernels.BundleLayout`
  lays a bundle out: every part's data, every part's scales, the q4 parts' mins. Every part is
  in the store's format, but in q4d8 the down / fc2 column is q8 (`formats.WIDE_PARTS`): it
  regroups values the source quantised along d_ff, and at 4 bits that costs all of q4's loss.
- Resident weights: every 2-D float tensor whose rows are a multiple of 32 long (attention
  projections, embeddings, lm_head, OPT's positions and projections) is quantised row-wise in
  the same format and stored as NAME.qdata / NAME.qscales (/ NAME.qmins); `Manifest.quantized`
  records which. 1-D tensors (norms, biases) are kept in float32; a 2-D tensor whose rows do not
  divide into groups of 32 is kept in float16. Integer tensors (permutations) pass unchanged.
  In a q4 (and q4d8) store the token embeddings and the LM head are q8 (`WIDE_IN_Q4`): every token's logits
  and input pass through them, and 4 bits there cost most of q4's perplexity on small models
  (llama.cpp's Q4_K_M keeps its output matrix at 6 bits for the same reason); measured in
  docs/quantization.md.

Large tensors are quantised a block of rows at a time (`quantize_rows`), so encoding a
151936 x 1536 embedding does not hold float32 copies of it.
"""

from __future__ import annotations

import numpy as np
import torch

from flashlm.kernels.formats import GROUP, QUANT_DTYPES, bundle_layout
from flashlm.kernels.qtensors import QRows, pack_bundle
from flashlm.kernels.quantizers import quantize_rows

# resident tensors a q4 store keeps at q8 (name suffixes; llama/qwen/gemma/phi3 and OPT names)
WIDE_IN_Q4 = ("embed_tokens.weight", "lm_head.weight")


class QuantEncoder:
    """The writer's `Encoder` for a quantised store; `quantized` collects name -> format of the
    tensors it quantised (for `Manifest.quantized`)."""

    def __init__(self, dtype: str) -> None:
        self.fmt = QUANT_DTYPES[dtype]
        self.quantized: dict[str, str] = {}

    def format_of(self, name: str) -> str:
        """The format resident tensor `name` is stored in (the store's, or q8 for `WIDE_IN_Q4`)."""
        return "q8" if self.fmt == "q4" and name.endswith(WIDE_IN_Q4) else self.fmt

    def __call__(self, name: str, tensor: torch.Tensor | QRows) -> list[tuple[str, torch.Tensor]]:
        fmt = self.format_of(name)
        if isinstance(tensor, QRows):  # already quantised (a store rewritten, e.g. by calibrate): kept exactly
            if tensor.fmt != fmt:
                raise ValueError(f"{name} is {tensor.fmt}; this store holds it as {fmt}")
            rows = tensor
        elif not tensor.is_floating_point():
            return [(name, tensor)]
        elif tensor.dim() == 2 and tensor.shape[1] % GROUP == 0 and not name.startswith("flashlm."):
            rows = quantize_rows(fmt, tensor)
        else:
            return [(name, tensor.to(torch.float32 if tensor.dim() < 2 else torch.float16))]
        self.quantized[name] = fmt
        out = [(f"{name}.qdata", rows.data.contiguous()), (f"{name}.qscales", rows.scales.contiguous())]
        return out + ([(f"{name}.qmins", rows.mins.contiguous())] if rows.mins is not None else [])


def quantized_bundles(rows: torch.Tensor, dtype: str, parts: tuple[str, ...], stride: int) -> np.ndarray:
    """(n, P, d) float rows -> (n, stride) uint8 bundles of a quantised store, zero-padded; each
    part in its layout format (q4 parts with the least-squares fit)."""
    layout = bundle_layout(dtype, rows.shape[2], tuple(parts))
    qparts = [quantize_rows(f, rows[:, p]) for p, f in enumerate(layout.fmts)]
    return pack_bundle(layout, qparts, stride).numpy()
