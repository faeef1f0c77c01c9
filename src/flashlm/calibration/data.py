"""Calibration and evaluation text, from the gensim 4.4.0 wheel's test data.

- Wikipedia: `enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`, markup
  stripped by `gensim.corpora.wikicorpus`, redirects and stubs dropped, split *by article*
  into calibration and held-out parts (a fixed rule, so every run splits the same way).
- News: `lee_background.cor`, for evaluation only.
- Code: the wheel's own Python sources, `gensim/models/*.py` (gensim 4.4.0), for evaluation
  only (no calibration reads them).

The files come from an installed gensim (the `calibrate` extra: `pip install 'flashlm[calibrate]'`),
or from copies of them in `$FLASHLM_HOME/data` (or `~/.cache/flashlm/data`). Nothing is downloaded
or installed here: without either, `MissingDependencyError` says what to install (or to pass
`--text FILE` to calibrate).
"""

from __future__ import annotations

import bz2
import importlib.util
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from flashlm.builtin import home
from flashlm.errors import FlashLMError, MissingDependencyError

GENSIM = "gensim==4.4.0"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
HELD_OUT_EVERY = 5  # article i is held out when i % 5 == 4: ~20% of the articles


class CalibrationDataError(FlashLMError):
    """The calibration text could not be obtained."""


def data_dir() -> Path:
    return home() / "data"


def _installed_test_data() -> Path | None:
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        return None
    d = Path(spec.origin).parent / "test" / "test_data"
    return d if (d / WIKI_FILE).is_file() and (d / NEWS_FILE).is_file() else None


def data_file(name: str) -> Path:
    """Path of one of the two test-data files: a copy in `data_dir()`, else gensim's own."""
    cached = data_dir() / name
    if cached.is_file():
        return cached
    installed = _installed_test_data()
    if installed is not None:
        return installed / name
    why = ("the installed gensim has no test data" if importlib.util.find_spec("gensim") is not None
           else "gensim is not installed")
    raise MissingDependencyError(
        f"the calibration and evaluation text ({name}) is gensim's test data and {why}: pip install '{GENSIM}' "
        f"(or 'flashlm[calibrate]'), or put the file in {data_dir()}, or calibrate on your own text with --text FILE")


_MARKUP = [(re.compile(r"'{2,}"), ""), (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
           (re.compile(r"\n{3,}"), "\n\n")]


def _clean(text: str) -> str:
    for pat, rep in _MARKUP:
        text = pat.sub(rep, text)
    return text.strip()


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[str, str], ...]:
    """(title, plain text) of every real article (no redirects, no stubs under 500 characters)."""
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError:
        raise MissingDependencyError(f"stripping Wikipedia markup needs gensim, which is not installed: "
                                     f"pip install '{GENSIM}' (or 'flashlm[calibrate]'), or pass --text FILE") from None
    out = []
    with bz2.BZ2File(data_file(WIKI_FILE)) as f:
        for title, text, _pid in extract_pages(f, filter_namespaces=("0",)):
            plain = _clean(filter_wiki(text))
            if len(plain) >= 500 and not plain.upper().startswith("#REDIRECT"):
                out.append((title, plain))
    return tuple(out)


def wiki_split(part: str) -> list[str]:
    """Article texts of the "calibration" or "heldout" part."""
    if part not in ("calibration", "heldout"):
        raise ValueError(f"part must be 'calibration' or 'heldout', got {part!r}")
    held = part == "heldout"
    return [t for i, (_title, t) in enumerate(wiki_articles()) if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == held]


def news_texts() -> list[str]:
    """The news text, one story per line (evaluation only)."""
    lines = data_file(NEWS_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    return [ln.strip() for ln in lines if ln.strip()]


CODE_GLOB = "gensim/models/*.py"


def code_texts() -> list[tuple[str, str]]:
    """(path, source) of gensim 4.4.0's `gensim/models/*.py`, sorted by path, from the installed
    gensim (it must be 4.4.0: another version is another text)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        got = version("gensim")
    except PackageNotFoundError:
        got = None
    spec = importlib.util.find_spec("gensim") if got is not None else None
    if got != GENSIM.split("==")[1] or spec is None or spec.origin is None:
        why = "gensim is not installed" if got is None else f"gensim {got} is installed"
        raise MissingDependencyError(f"the code text is gensim 4.4.0's own sources and {why}: pip install '{GENSIM}' "
                                     f"(or 'flashlm[calibrate]')")
    root = Path(spec.origin).parent.parent
    return [(str(f.relative_to(root)), f.read_text(encoding="utf-8")) for f in sorted(root.glob(CODE_GLOB))]


def file_chunks(tokenizer, texts: list[str], seq_len: int, n: int, skip: int = 1) -> list[list[int]]:
    """Up to n sequences of seq_len tokens, one per text that is long enough: tokens
    [skip * seq_len, (skip + 1) * seq_len) of each (skip=1 passes over the licence header and
    imports to the code itself)."""
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if len(ids) >= (skip + 1) * seq_len:
            out.append(ids[skip * seq_len: (skip + 1) * seq_len])
        if len(out) == n:
            break
    if len(out) < n:
        raise CalibrationDataError(f"only {len(out)} texts have {(skip + 1) * seq_len} tokens, {n} were asked for")
    return out


def token_stream(tokenizer, texts: list[str], n: int, sep: int | None = None) -> list[int]:
    """The first n tokens of the texts, tokenized one by one and joined (with `sep` between)."""
    ids: list[int] = []
    for t in texts:
        if len(ids) >= n:
            break
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
    if len(ids) < n:
        raise CalibrationDataError(f"the text has only {len(ids)} tokens, {n} were asked for")
    return ids[:n]


def tokenizer(store: Any) -> Any:
    """The tokenizer of `store` (a FlashStore), to turn these texts into token ids."""
    from transformers import AutoTokenizer

    if store.tokenizer_dir is None:
        raise CalibrationDataError(f"{store.path} has no tokenizer; calibration needs text -> tokens")
    return AutoTokenizer.from_pretrained(str(store.tokenizer_dir))


def calibration_ids(store: Any, tokens: int, text: str | Path | None) -> tuple[list[int], str]:
    """`tokens` ids of calibration text for `store` (the Wikipedia calibration split, or the file
    `text`) and a line naming where they came from."""
    tok = tokenizer(store)
    if text is None:
        return token_stream(tok, wiki_split("calibration"), tokens, tok.eos_token_id), \
            f"gensim-4.4.0:{WIKI_FILE} (calibration split: article i % {HELD_OUT_EVERY} != 4)"
    path = Path(text)
    return token_stream(tok, [path.read_text(encoding="utf-8", errors="replace")], tokens), str(path)
