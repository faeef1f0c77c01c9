"""The chat's widgets: message bubbles, the figures panel, the opening (conversion) view."""

from __future__ import annotations

import re
from typing import Any

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, ProgressBar, Static

from flashlm.tui.stats import AnswerStats, panel_rows

_TQDM_COUNT = re.compile(r"(\d+)/(\d+) \[")


class Message(Static):
    """One turn. Text is shown as typed (no markup), so a model writing "[b]" stays "[b]"."""

    DEFAULT_CSS = """
    Message { width: 1fr; height: auto; padding: 0 1; margin: 0 0 1 0; }
    Message.user { background: $primary 15%; border-left: tall $primary; }
    Message.assistant { border-left: tall $accent; }
    Message.info { color: $text-muted; }
    Message.error { color: $text-error; background: $error 10%; border-left: tall $error; }
    Message.stopped { border-left: tall $warning; }
    """

    def __init__(self, role: str, text: str = "") -> None:
        super().__init__(Text(text), classes=role)
        self.role = role
        self.text = text
        self.note = ""

    def append(self, delta: str) -> None:
        self.text += delta
        self._refresh_text()

    def set_note(self, note: str) -> None:
        """A dim suffix such as "[stopped]" that is not part of the answer."""
        self.note = note
        self._refresh_text()

    def _refresh_text(self) -> None:
        body = Text(self.text or ("…" if not self.note else ""))
        if self.note:
            body.append(("\n" if self.text else "") + self.note, style="dim italic")
        self.update(body)


class StatsPanel(Static):
    """The side panel: live figures of the current answer, the engine, memory and sampling."""

    DEFAULT_CSS = """
    StatsPanel { width: 27; height: 1fr; padding: 0 1; border-left: vkey $primary 50%; }
    """

    def show(self, stats: AnswerStats, info: dict[str, Any], sampling: dict[str, Any]) -> None:
        out = Text(no_wrap=True, overflow="ellipsis")
        for label, value in panel_rows(stats, info, sampling):
            if label.startswith("─"):
                out.append(f"{label} \n", style="bold")
            else:
                out.append(f"{label:<9}", style="dim")
                out.append(f" {value}\n")
        self.update(out)


class OpeningView(Vertical):
    """Shown while the model converts (first use) and the engine opens: never a frozen screen.

    The converter reports progress with tqdm on stderr; the app captures stderr while it runs
    and hands the text here, where the layer count drives the bar.
    """

    DEFAULT_CSS = """
    OpeningView { height: auto; padding: 1 2; }
    OpeningView Label { width: 1fr; }
    OpeningView ProgressBar { margin: 1 0; }
    OpeningView #detail { color: $text-muted; }
    """

    def compose(self) -> ComposeResult:
        yield Label("", id="stage")
        yield ProgressBar(total=None, show_eta=False, id="bar")
        yield Label("", id="detail")

    def stage(self, text: str) -> None:
        self.query_one("#stage", Label).update(text)
        self.query_one("#bar", ProgressBar).update(total=None, progress=0)
        self.query_one("#detail", Label).update("")

    def on_print(self, event: events.Print) -> None:
        line = event.text.replace("\r", "\n").strip().splitlines()
        if not line:
            return
        last = line[-1].strip()
        m = _TQDM_COUNT.search(last)
        if m:
            self.query_one("#bar", ProgressBar).update(total=int(m.group(2)), progress=int(m.group(1)))
            self.query_one("#detail", Label).update(f"layer {m.group(1)} of {m.group(2)} written")
        else:
            self.query_one("#detail", Label).update(Text(last[:200]))
