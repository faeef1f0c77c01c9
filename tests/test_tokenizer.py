"""The engine's tokenizer (`flashlm.pipeline.tokenizer.StoreTokenizer`, on the tokenizers library
alone) against transformers' AutoTokenizer on the same store directory: the same ids for text and
for chats (the chat template rendered in the same sandbox), the same decoded text, the same eos
id and size; and it holds less memory, which is why it exists (measured in a fresh process)."""

from __future__ import annotations

import json
import subprocess
import sys

import jinja2
import pytest
from transformers import AutoTokenizer

from flashlm.pipeline.tokenizer import StoreTokenizer, load

TEXTS = ["Hello world", "  leading spaces and trailing  ", "def f(x):\n    return x ** 2\n", "naïve café — 日本語 🤖",
         "<|im_start|>user\nhi<|im_end|> <eos> <bos>", "a\tb\r\nc", "The capital of France is", "x" * 300]
CHATS = [[{"role": "user", "content": "What is 2+2?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
          {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "And a fruit of it?"}],
         [{"role": "user", "content": "with a None field", "name": None}]]


def tokenizer_dirs(llama_store, smollm2_int8_store):
    return {"tiny": llama_store[1] / "tokenizer", "smollm2": smollm2_int8_store / "tokenizer"}


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_the_same_ids_and_text_as_transformers(which, llama_store, smollm2_int8_store):
    d = tokenizer_dirs(llama_store, smollm2_int8_store)[which]
    hf, mine = AutoTokenizer.from_pretrained(str(d)), load(d)
    assert isinstance(mine, StoreTokenizer)
    assert (mine.eos_token_id, mine.bos_token_id, len(mine)) == (hf.eos_token_id, hf.bos_token_id, len(hf))
    assert mine.get_vocab() == hf.get_vocab()
    for t in TEXTS:
        ids = hf.encode(t)
        assert mine.encode(t) == ids, t
        with_special = ids + [hf.eos_token_id]
        assert mine.decode(with_special, skip_special_tokens=True) == hf.decode(
            with_special, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    for chat in CHATS:
        want = hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        want = list(want["input_ids"] if hasattr(want, "keys") else want)
        assert mine.apply_chat_template(chat, add_generation_prompt=True, tokenize=True) == want
        assert mine.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == hf.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=False)


def test_the_template_sandbox_refuses_what_transformers_refuses(llama_store, tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((llama_store[1] / "tokenizer" / f).read_bytes())
    for template, err in (("{{ raise_exception('no system role') }}", jinja2.exceptions.TemplateError),
                          ("{% set ns = namespace(_x=1) %}", jinja2.exceptions.SecurityError),
                          ("{{ messages.__class__.__mro__ }}", jinja2.exceptions.SecurityError)):
        (d / "chat_template.jinja").write_text(template)
        with pytest.raises(err):
            StoreTokenizer(d).apply_chat_template(CHATS[0], tokenize=False)
    (d / "chat_template.jinja").write_text("{% generation %}{{ messages[0]['content'] | tojson }}{% endgeneration %}")
    assert StoreTokenizer(d).apply_chat_template([{"role": "user", "content": "é"}], tokenize=False) == '"é"'


def test_it_holds_less_than_transformers_tokenizer(smollm2_int8_store):
    """Resident bytes after loading, in a fresh process each (heap trimmed as the engine trims it)."""
    code = ("import ctypes, sys, torch\n"
            "def rss():\n"
            "    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])\n"
            "r0 = rss()\n"
            "if sys.argv[1] == 'hf':\n"
            "    from transformers import AutoTokenizer; t = AutoTokenizer.from_pretrained(sys.argv[2])\n"
            "else:\n"
            "    from pathlib import Path; from flashlm.pipeline.tokenizer import load; t = load(Path(sys.argv[2]))\n"
            "ctypes.CDLL('libc.so.6').malloc_trim(0)\n"
            "print(rss() - r0)\n")
    d = str(smollm2_int8_store / "tokenizer")
    kib = {k: int(subprocess.run([sys.executable, "-c", code, k, d], capture_output=True, text=True, check=True,
                                 timeout=120).stdout) for k in ("hf", "ours")}
    assert kib["ours"] < kib["hf"], json.dumps(kib)
