"""The store's tokenizer on the `tokenizers` library alone: encode, decode and the chat template,
without transformers' tokenizer objects.

Why: RSS. Qwen2.5's tokenizer through `transformers.AutoTokenizer` holds ~130 MiB beside the
~220 MiB of the interpreter with torch (its vocabulary mirrored into Python objects, and
transformers itself imported); the same tokenizer.json on `tokenizers.Tokenizer` holds ~50 MiB
once the heap its JSON parse freed is trimmed. Under a memory budget of half the 1.5B's store
that difference is most of what is left for the caches (docs/budget.md).

What the engine asks of a tokenizer, done as transformers 5 does it for a store's tokenizer
directory (tokenizer.json, tokenizer_config.json, chat_template.jinja, as `save_pretrained`
writes them), tested token-for-token against `AutoTokenizer` on the built-ins' tokenizers:
- `encode(text)`: the tokenizer.json's pipeline with its post-processor (special tokens as
  transformers adds them: `add_special_tokens=True`).
- `decode(ids, skip_special_tokens=True)`.
- `apply_chat_template(messages, add_generation_prompt=True)`: the template rendered in a jinja2
  sandbox set up as transformers sets it up (trim_blocks, lstrip_blocks, loopcontrols; its
  `tojson`, `raise_exception`, `strftime_now`, `dict` and underscore-refusing `namespace`), with
  the special tokens' strings as variables, then encoded without special tokens.
- `eos_token_id`, `bos_token_id`, `chat_template`, `len()`, `get_vocab()`.
A store whose tokenizer directory has no tokenizer.json (a slow tokenizer only) is opened with
transformers instead (`load`).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any


def load(path: Path | None) -> Any | None:
    """The tokenizer of a store's tokenizer directory: a `StoreTokenizer`, or transformers'
    AutoTokenizer where the directory has no tokenizer.json; None without a directory."""
    if path is None:
        return None
    if (Path(path) / "tokenizer.json").is_file():
        return StoreTokenizer(Path(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _token_text(v: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class StoreTokenizer:
    SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        self.special_tokens = {k: t for k in self.SPECIAL if (t := _token_text(cfg.get(k))) is not None}
        template = path / "chat_template.jinja"
        self.chat_template: str | None = (template.read_text(encoding="utf-8") if template.is_file()
                                          else cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str)
                                          else None)
        self.eos_token_id: int | None = self._id("eos_token")
        self.bos_token_id: int | None = self._id("bos_token")
        self._compiled: Any = None

    def _id(self, name: str) -> int | None:
        text = self.special_tokens.get(name)
        return None if text is None else self._tok.token_to_id(text)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False, **_: Any) -> str:
        # transformers' clean_up_tokenization_spaces is False for these tokenizers and asked off by
        # the engine (Detokenizer): not applied
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True, **kwargs: Any) -> Any:
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        if self._compiled is None:
            self._compiled = _compile(self.chat_template)
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as transformers drops None values
        text = self._compiled.render(messages=chat, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **{**self.special_tokens, **kwargs})
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _compile(template: str) -> Any:
    """The template in the sandbox transformers renders chat templates in."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:  # dict() without attribute access to the type
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):  # refuses underscore names (CPython internals)
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot store {name!r} on a namespace")

    class Generation(jinja2.ext.Extension):  # {% generation %}: marks assistant text for masks; rendered as is
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                       dict=TemplateDict(), namespace=TemplateNamespace)
    return env.from_string(template)
