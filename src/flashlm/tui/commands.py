"""Slash commands: parsed and checked here (plain data), carried out by the app."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

COMMANDS_HELP = """\
Enter sends · Esc or ctrl+c stops the answer · ctrl+l resets · F2 hides the panel · ctrl+q quits
/reset           clear the conversation
/temp T          sampling temperature (0 = greedy)
/top_p P         nucleus mass in (0, 1]
/max N           most tokens per answer
/seed N|off      sampling seed, for repeatable answers
/system TEXT|off system message
/trace FILE|off  write a per-token trace (when the engine supports it)
/theme [NAME]    toggle light/dark, or pick a Textual theme
/stats           the engine's memory plan and read counters
/reopen          open the model again (after a fault)
/quit            leave"""


class CommandError(ValueError):
    """A command the app cannot carry out; the message says why and what to type."""


@dataclass(frozen=True)
class Command:
    name: str
    value: Any = None


_ALIASES = {"clear": "reset", "new": "reset", "temperature": "temp", "top-p": "top_p", "topp": "top_p",
            "max_tokens": "max", "max-tokens": "max", "exit": "quit", "q": "quit", "?": "help"}
_NO_ARG = {"reset", "help", "quit", "stats", "reopen"}


def _number(name: str, arg: str, kind: type, ok: Any, want: str) -> Any:
    try:
        value = kind(arg)
    except ValueError:
        raise CommandError(f"/{name} {arg!r}: expected {want}") from None
    if not ok(value):
        raise CommandError(f"/{name} {arg}: expected {want}")
    return value


def parse_command(line: str) -> Command:
    """`/name [argument]` -> Command; CommandError says what was wrong."""
    head, _, arg = line.strip()[1:].partition(" ")
    name, arg = _ALIASES.get(head.lower(), head.lower()), arg.strip()
    off = arg.lower() in ("off", "none")
    if name in _NO_ARG:
        return Command(name)
    if name == "temp":
        return Command(name, _number(name, arg, float, lambda v: 0 <= v <= 10, "a temperature in [0, 10], e.g. /temp 0.7"))
    if name == "top_p":
        return Command(name, _number(name, arg, float, lambda v: 0 < v <= 1, "a number in (0, 1], e.g. /top_p 0.9"))
    if name == "max":
        return Command(name, _number(name, arg, int, lambda v: v >= 1, "a positive number of tokens, e.g. /max 128"))
    if name == "seed":
        return Command(name, None if off else _number(name, arg, int, lambda v: v >= 0, "an int >= 0 or off"))
    if name == "system":
        return Command(name, None if off or not arg else arg)
    if name == "trace":
        if not arg:
            raise CommandError("/trace needs a file name (or off), e.g. /trace trace.jsonl")
        return Command(name, None if off else arg)
    if name == "theme":
        return Command(name, arg or None)
    raise CommandError(f"unknown command /{head}; /help lists them")
