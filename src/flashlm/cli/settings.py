"""The CLI options and README's settings table, both made from the EngineConfig fields'
declarations (`flashlm.pipeline.config.Setting`): a field's help, choices and default are
written once, there.

`python tools/settings_table.py` prints the table README carries (tests/test_settings.py
checks that they are the same).
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from flashlm.pipeline.config import RESEARCH, USER, EngineConfig, Research, Setting, describe

CONFIG_FIELD = "config_field"  # the attribute an option built here carries: the field it sets


def field_of(name: str) -> tuple[type, Setting, Any]:
    """(its record, its Setting, its default) for a flat field name."""
    record = Research if name in RESEARCH else EngineConfig
    return record, describe(record, name), next(f.default for f in fields(record) if f.name == name)


def value_type(name: str) -> type | None:
    """What the option's text becomes, read off the field's annotation: int or float, else the
    text itself (a field that takes a string takes "512MiB", "0.5" ... as it is)."""
    record = Research if name in RESEARCH else EngineConfig
    kinds = next(f.type for f in fields(record) if f.name == name).split(" | ")
    return None if "str" in kinds or "Any" in kinds else {"int": int, "float": float}.get(kinds[0])


def default_words(name: str) -> str:
    _, s, default = field_of(name)
    return s.default_text or str(default)


def help_text(name: str, *, default: Any = None, choices: tuple[Any, ...] | None = None, note: str = "") -> str:
    """The option's help: `note` (what the command does with it), the field's help, the choices
    where the help does not name them all, and the default (the option's, else the field's)."""
    _, s, _ = field_of(name)
    choices = s.choices if choices is None else choices
    text = f"{note}{s.help}"
    if choices and not all(str(c) in s.help for c in choices):
        text += f" (one of {', '.join(map(str, choices))})"
    elif choices and s.choices and set(choices) < set(s.choices):
        text += f" (here one of {', '.join(map(str, choices))})"
    return text + f" (default {default if default is not None else default_words(name)})"


def config_option(g: Any, name: str, *flags: str, default: Any = None, choices: tuple[Any, ...] | None = None,
                  note: str = "", **kw: Any) -> argparse.Action:
    """Add the option that sets EngineConfig field `name` (flat name) to parser or group `g`:
    its flag, metavar, type and choices from the field, unless a command narrows them (`choices`
    a subset of the field's, its own `default`); `note` goes before the field's help."""
    _, s, _ = field_of(name)
    flags = flags or ((s.flag,) if s.flag else ())
    if not flags:
        raise ValueError(f"EngineConfig field {name!r} has no CLI flag; name one")
    if choices is not None and s.choices is not None and not set(choices) <= set(s.choices):
        raise ValueError(f"{flags[0]}: choices {choices} are not all {name}'s {s.choices}")
    if "action" not in kw:
        if value_type(name) is not None:
            kw.setdefault("type", value_type(name))
        if s.metavar:
            kw.setdefault("metavar", s.metavar)
        if (choices or s.choices) and kw.get("metavar") is None:
            kw["choices"] = list(choices or s.choices)
    text = help_text(name, default=default, choices=choices, note=note)
    action = g.add_argument(*flags, default=default, help=text.replace("%", "%%"), **kw)
    setattr(action, CONFIG_FIELD, name)
    return action


def settings_table(indent: str = "  ") -> str:
    """README's table of EngineConfig fields: the user's, then the research knobs."""
    lines = ["| field | default | CLI | meaning |", "|---|---|---|---|"]

    def row(name: str) -> str:
        _, s, default = field_of(name)
        shown = s.default_text or (f'"{default}"' if isinstance(default, str) else str(default))
        meaning = s.help + (f" (one of {', '.join(map(str, s.choices))})"
                            if s.choices and not all(str(c) in s.help for c in s.choices) else "")
        return f"| `{name}` | {shown} | {f'`{s.flag}`' if s.flag else ''} | {meaning} |"

    lines += [row(n) for n in USER]
    lines.append("| *research knobs* (`research=Research(...)`, or by name) | | | |")
    lines += [row(n) for n in RESEARCH]
    return "\n".join(indent + line for line in lines)
