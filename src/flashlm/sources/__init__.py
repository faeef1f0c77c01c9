"""Conversion sources, read one tensor at a time: a GGUF file or a safetensors checkpoint directory.

Each tensor comes out under the name, in the shape and with the values `from_pretrained` would
give it in the model's state dict, while no more than one tensor (in the load dtype) and one
chunk of its source bytes are in memory:

- GGUF: the tensor table walked out of the header (`_gguf_table`, no tensor data touched);
  each tensor's bytes `os.preadv`-ed a chunk of rows at a time into one buffer (a memory map's
  pages would count in RSS once read) and dequantised by `gguf.quants.dequantize`, the function
  transformers' GGUF loader uses. Names are transformers' own map (`get_gguf_hf_weights_map`
  over the model built on the meta device); the per-tensor fixes transformers' loader applies
  (`TENSOR_PROCESSORS`: llama's q/k row order, gemma's norm offset) are mirrored in
  `_GGUF_FIXES`, chunk by chunk.
- safetensors: `safe_open` checks each file and lists its tensors; their bytes are
  `os.preadv`-ed a chunk of rows at a time too.

Config and tokenizer still come from transformers (`AutoConfig` / `AutoTokenizer`).
"""

from __future__ import annotations

from pathlib import Path

from flashlm.sources.base import DROP_CONFIG_KEYS, TOKENIZER_FILES, Checkpoint
from flashlm.sources.gguf_file import GGUFCheckpoint
from flashlm.sources.safetensors_dir import SafetensorsCheckpoint

__all__ = ["DROP_CONFIG_KEYS", "TOKENIZER_FILES", "Checkpoint", "GGUFCheckpoint",
           "SafetensorsCheckpoint", "open_checkpoint"]


def open_checkpoint(directory: Path, gguf_file: str | None) -> Checkpoint:
    """The config now; the tensor table when `shapes` is first asked for (after the caller has
    checked the architecture is one it can convert)."""
    if gguf_file is not None:
        return GGUFCheckpoint(directory / gguf_file)
    return SafetensorsCheckpoint(directory)
