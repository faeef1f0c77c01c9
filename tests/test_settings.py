"""EngineConfig's two records (the user's settings, the research knobs) and the places that
describe them: every CLI option that sets a field is built from the field's declaration (help,
choices, default), and README's settings table is the one generated from it."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from flashlm import EngineConfig
from flashlm.cli.settings import CONFIG_FIELD, field_of, settings_table
from flashlm.errors import ConfigError
from flashlm.pipeline.config import RESEARCH, USER, Research, describe
from test_cli import commands

README = Path(__file__).resolve().parents[1] / "README.md"
# options named like a field's but setting something else (not an EngineConfig field)
NOT_CONFIG = {("calibrate", "--density"): "hot-first's activation threshold",
              ("convert", "--dtype"): "the store's dtype (EngineConfig.dtype is the compute dtype)"}


def config_actions() -> list[tuple[str, argparse.Action]]:
    return [(" ".join(path), a) for path, p in commands() for a in p._actions if a.option_strings]


def test_the_records_split_and_the_flat_names_map():
    assert set(USER) & set(RESEARCH) == set()
    assert {"window", "eviction", "reuse", "compute", "lookahead", "io_backend", "in_flight", "page_cache",
            "cache_gamma"} == set(RESEARCH)
    assert {"device", "dtype", "selection", "density", "memory_budget", "ffn", "store_dtype"} <= set(USER)
    c = EngineConfig(selection="gate", window=3, lookahead=0, max_context=64)
    assert (c.selection, c.research.window, c.research.lookahead, c.max_context) == ("gate", 3, 0, 64)
    assert EngineConfig(research=Research(window=3, lookahead=0), selection="gate", max_context=64) == c
    assert EngineConfig(research=Research(window=9), window=3, lookahead=0, selection="gate", max_context=64) == c
    # the flat record has every field by its name (what traces and bench JSON record), and rebuilds it
    flat = c.settings()
    assert list(flat) == [*USER, *RESEARCH] and EngineConfig(**flat) == c
    assert dataclasses.replace(c, window=5).research.window == 5 and c.replace(selection="shadow").research.window == 3
    assert EngineConfig.merged(c, {"eviction": "window"}).research == Research(window=3, lookahead=0, eviction="window")
    with pytest.raises(ConfigError, match=r"unknown EngineConfig field\(s\) 'windwo'"):
        EngineConfig(windwo=3)
    with pytest.raises(ConfigError, match="research must be"):
        EngineConfig(research={"window": 3})
    with pytest.raises(ConfigError, match="window must be an int"):
        Research(window=0)
    with pytest.raises(ConfigError, match="needs selection 'griffin'"):  # a rule across both records
        EngineConfig(research=Research(cache_gamma=0.5))


def test_every_field_is_described_and_its_choices_are_what_validation_allows():
    for name in USER + RESEARCH:
        _, s, default = field_of(name)
        assert s.help and "(default" not in s.help, name  # the default is added where it is shown
        assert default is not None or s.default_text, name  # None says what it means
        if s.choices:
            assert default is None or default in s.choices, name
            with pytest.raises(ConfigError, match=name):
                EngineConfig(**{name: "surely-not-a-choice" if isinstance(s.choices[0], str) else 7})
            for good in s.choices:  # configuring opens nothing: uring and batch are accepted here
                assert EngineConfig(**{name: good}).settings()[name] == good


def test_every_cli_option_of_a_field_is_built_from_it():
    """Every option that sets an EngineConfig field, in every command, carries its field's help
    and default, and choices within the field's (all of them for run/chat/serve); and no option
    named like a field's flag or field is written by hand beside it."""
    flags = {field_of(n)[1].flag: n for n in USER + RESEARCH if field_of(n)[1].flag}
    seen = set()
    for cmd, a in config_actions():
        name = getattr(a, CONFIG_FIELD, None)
        long = max(a.option_strings, key=len)
        if name is None:
            named = flags.get(long) or (a.dest if a.dest in USER + RESEARCH else None)
            assert named is None or (cmd, long) in NOT_CONFIG, f"`flashlm {cmd} {long}` is not built from {named}"
            continue
        seen.add((cmd, long))
        _, s, _ = field_of(name)
        assert s.help in a.help, (cmd, long)
        assert "(default " in a.help, (cmd, long)
        if a.choices is not None:
            assert set(a.choices) <= set(s.choices), (cmd, long)
            assert all(str(c) in a.help for c in a.choices), (cmd, long)
            if cmd in ("run", "chat", "serve"):
                assert list(a.choices) == list(s.choices), (cmd, long)
    for cmd in ("run", "chat", "serve"):
        assert {(cmd, f) for f in flags} <= seen, sorted({(cmd, f) for f in flags} - seen)
    assert ("bench paper", "--selection") in seen and ("eval", "--lookahead") in seen
    run = dict((" ".join(p), q) for p, q in commands())["run"]
    sel = next(a for a in run._actions if a.dest == "selection")
    assert {"auto", "griffin"} <= set(sel.choices) and "(default auto)" in sel.help
    # the options make the config the fields say
    a = run.parse_args(["--ram", "--window", "3", "--eviction", "window", "--threads", "2", "hi"])
    from flashlm.cli.common import engine_config

    c = engine_config(a)
    assert (c.ffn, c.research.window, c.research.eviction, c.num_threads, c.device) == ("ram", 3, "window", 2, "cpu")
    assert engine_config(run.parse_args(["hi"])) == EngineConfig()


def test_readme_settings_table_is_the_generated_one():
    """README's EngineConfig table is `python -m flashlm.cli.settings`'s output, verbatim."""
    table = settings_table()
    assert table in README.read_text(), "README's settings table drifted: paste `python -m flashlm.cli.settings`"
    for name in USER + RESEARCH:
        assert f"| `{name}` |" in table


def test_the_cli_options_load_no_torch():
    """The options are built from the config's declarations without torch: `flashlm --help` stays light."""
    import os
    import subprocess
    import sys

    code = ("import sys; from flashlm.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])")
    src = Path(__file__).resolve().parents[1] / "src"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(src)})
    assert out.stdout.strip() == "[]", out.stdout
