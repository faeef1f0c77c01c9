"""The chat app. Built only on the public API: `Engine.open`, `engine.stream`, `statistics()`.

One worker opens the engine (converting a built-in model on first use, its progress shown);
one worker per answer consumes `engine.stream`. Esc / Ctrl-C cancel the answer's worker,
which is how the engine's streams are meant to be stopped: the engine stays usable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message as TMessage
from textual.widgets import Footer, Input, Static
from textual.worker import Worker

from flashlm import Engine, EngineConfig
from flashlm.builtin import DEFAULT_MODEL, cached_store_path, default_store_dtype, is_builtin
from flashlm.convert import resolve_store
from flashlm.errors import EngineDeadError, FlashLMError
from flashlm.tui.commands import COMMANDS_HELP, Command, CommandError, parse_command
from flashlm.tui.stats import AnswerStats, engine_info
from flashlm.tui.widgets import Message, OpeningView, StatsPanel

THEMES = ("textual-dark", "textual-light")


@dataclass
class ChatSettings:
    model: str = DEFAULT_MODEL
    config: EngineConfig | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    system: str | None = None
    verbose: int = 0
    prompt_cache_file: str | None = None  # the prompt cache kept here across sessions (read at open, written at exit)

    def sampling(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed}


class LogLine(TMessage):
    """A flashlm log record, posted from whichever thread logged it."""

    def __init__(self, level: int, text: str) -> None:
        super().__init__()
        self.level, self.text = level, text


class _AppLogHandler(logging.Handler):
    """flashlm's warnings shown in the app: a stderr handler would scribble over the screen."""

    def __init__(self, app: App, level: int) -> None:
        super().__init__(level)
        self.app = app

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.app.post_message(LogLine(record.levelno, self.format(record)))
        except Exception:  # noqa: BLE001 - logging must never raise into the logger's caller
            self.handleError(record)


class ChatApp(App[None]):
    """`flashlm chat`: type a message, Enter sends it, Esc stops the answer."""

    TITLE = "flashlm chat"
    CSS = """
    #body { height: 1fr; }
    #chat { width: 1fr; height: 1fr; scrollbar-size-vertical: 1; }
    #status { height: 1; padding: 0 1; color: $text-muted; background: $boost; }
    #status.busy { color: $text-warning; }
    #prompt { border: tall $primary 60%; }
    #prompt:focus { border: tall $primary; }
    """
    BINDINGS = [
        Binding("escape", "stop", "Stop answer", priority=True),
        Binding("ctrl+c", "stop_or_hint", "Stop", show=False, priority=True),
        Binding("ctrl+l", "reset", "Reset"),
        Binding("f1", "help", "Help"),
        Binding("f2", "toggle_panel", "Panel"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, settings: ChatSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or ChatSettings()
        self.engine: Any = None
        self.history: list[dict[str, str]] = []
        self.stats = AnswerStats()
        self.info: dict[str, Any] = {"model": self.settings.model}
        self.answer: Worker[None] | None = None
        self.open_failed = False
        self.open_error: str | None = None  # why the model did not open (the CLI repeats it on exit)
        self._epoch = 0  # bumped by /reset: an answer from before it must not write into the new history
        self._log_handler: _AppLogHandler | None = None

    # -- layout -------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Horizontal(id="body"):
            with VerticalScroll(id="chat"):
                yield OpeningView(id="opening")
            yield StatsPanel(id="panel")
        yield Static("opening the model…", id="status")
        yield Input(placeholder="Type a message, Enter sends · /help for commands", id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        self._log_handler = _AppLogHandler(self, logging.WARNING - 10 * min(self.settings.verbose, 2))
        logging.getLogger("flashlm").addHandler(self._log_handler)
        self.query_one("#prompt", Input).focus()
        self._refresh_panel()
        self.open_engine(self.settings.config or EngineConfig())

    async def on_unmount(self) -> None:
        if self._log_handler is not None:
            logging.getLogger("flashlm").removeHandler(self._log_handler)
        if self.engine is not None:
            if self.settings.prompt_cache_file is not None:
                try:
                    await self.engine.save_prompt_cache(self.settings.prompt_cache_file)
                except FlashLMError as e:  # the screen is going: the log (stderr) says it
                    logging.getLogger("flashlm").error("%s", e)
            await self.engine.aclose()

    # -- helpers --------------------------------------------------------------------------

    def say(self, role: str, text: str) -> Message:
        """Add a turn (or an info / error line) to the chat and scroll to it."""
        msg = Message(role, text)
        chat = self.query_one("#chat", VerticalScroll)
        chat.mount(msg)
        chat.scroll_end(animate=False)
        return msg

    def set_status(self, text: str, busy: bool = False) -> None:
        status = self.query_one("#status", Static)
        status.update(text)
        status.set_class(busy, "busy")

    def _refresh_panel(self) -> None:
        self.query_one(StatsPanel).show(self.stats, self.info, self.settings.sampling())

    @property
    def answering(self) -> bool:
        return self.answer is not None and not self.answer.is_finished

    def _ready_status(self) -> None:
        self.set_status("ready · Enter sends · Esc stops an answer · /help")

    # -- opening the engine --------------------------------------------------------------

    @work(group="open", exclusive=True, exit_on_error=False)
    async def open_engine(self, config: EngineConfig) -> None:
        chat = self.query_one("#chat", VerticalScroll)
        views = self.query(OpeningView)
        view = views.first() if views else OpeningView()
        if not views:
            await chat.mount(view)
        name = self.settings.model
        try:
            if self.engine is not None:
                old, self.engine = self.engine, None
                await old.aclose()
            path: Any = name
            if is_builtin(name):
                first = not cached_store_path(name, config.store_dtype or default_store_dtype(name)).is_dir()
                view.stage(f"converting {name} into a flash store, on first use only (~20 s)…" if first
                           else f"finding the {name} store…")
                self.begin_capture_print(view, stdout=False, stderr=True)  # the converter's tqdm bar
                try:
                    path = await asyncio.to_thread(resolve_store, name, config.store_dtype, True)
                finally:
                    self.end_capture_print(view)
            view.stage(f"opening {path} …")
            self.engine = await Engine.open(path, config)
            if self.settings.prompt_cache_file is not None:
                await self.engine.load_prompt_cache(self.settings.prompt_cache_file, missing_ok=True)
        except FlashLMError as e:
            self.open_failed, self.open_error = True, f"could not open {name}: {e}"
            await view.remove()
            self.say("error", self.open_error)
            self.set_status("no model · ctrl+q quits", busy=True)
            return
        await view.remove()
        self.open_failed = False
        self.info = engine_info(self.engine, name)
        self._refresh_panel()
        self.say("info", f"{name} is ready ({self.info['ffn_line']}, density {self.info['density_line']}). "
                 "Type a message; /help lists commands.")
        self._ready_status()

    # -- answering ------------------------------------------------------------------------

    def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        event.input.value = ""
        if not text:
            return
        if text.startswith("/"):
            try:
                self.run_command(parse_command(text))
            except CommandError as e:
                self.say("error", str(e))
            return
        if self.engine is None:
            self.say("error", "the model is not open yet" + (" (it failed; see above)" if self.open_failed else ""))
            return
        if self.answering:
            self.notify("Still answering: Esc stops it.", severity="warning")
            return
        self.history.append({"role": "user", "content": text})
        self.say("user", text)
        bubble = self.say("assistant", "")
        self.answer = self.run_worker(self._answer(bubble), group="answer", exclusive=True, exit_on_error=False)

    async def _answer(self, bubble: Message) -> None:
        s, epoch = self.settings, self._epoch
        self.stats = AnswerStats()
        messages = ([{"role": "system", "content": s.system}] if s.system else []) + self.history
        self.set_status("thinking… Esc stops", busy=True)
        try:
            stream = await self.engine.stream(messages, max_tokens=s.max_tokens, temperature=s.temperature,
                                              top_p=s.top_p, seed=s.seed)
        except FlashLMError as e:
            self.history.pop()  # the turn was refused: it is not part of the conversation
            await bubble.remove()
            self.say("error", f"{e}" + (" (/reset starts over)" if "context" in str(e) else ""))
            self._ready_status()
            return
        try:
            # aclosing: a stopped answer's stream is closed now, not whenever it is collected
            async with aclosing(aiter(stream)) as chunks:
                async for chunk in chunks:
                    await self.show_chunk(chunk, bubble)
        except asyncio.CancelledError:
            self.stats.finish = "stopped"
            bubble.set_note("[stopped]")
            bubble.add_class("stopped")
            raise
        except FlashLMError as e:
            self.stats.finish = "error"
            bubble.set_note("[failed]")
            dead = isinstance(e, EngineDeadError)
            self.say("error", f"{type(e).__name__}: {e}" + (" · /reopen opens the model again" if dead else ""))
        finally:
            if epoch != self._epoch:
                pass  # reset while answering: the new conversation starts empty
            elif bubble.text:
                self.history.append({"role": "assistant", "content": bubble.text})
            elif self.history and self.history[-1]["role"] == "user":
                self.history.pop()  # nothing was said: drop the unanswered turn
            self._refresh_panel()
            self._ready_status()

    async def show_chunk(self, chunk: Any, bubble: Message) -> None:
        """One streamed token: its text into the bubble, its figures into the panel."""
        bubble.append(chunk.text)
        self.stats.add(chunk)
        self._refresh_panel()
        self.set_status(f"answering… {self.stats.tokens} tokens · Esc stops", busy=True)
        self.query_one("#chat", VerticalScroll).scroll_end(animate=False)

    # -- actions --------------------------------------------------------------------------

    def action_stop(self) -> None:
        if self.answering:
            assert self.answer is not None
            self.answer.cancel()

    def action_stop_or_hint(self) -> None:
        if self.answering:
            self.action_stop()
        else:
            self.notify("Nothing to stop. ctrl+q quits.", timeout=3)

    def action_reset(self) -> None:
        self.run_command(Command("reset"))

    def action_help(self) -> None:
        self.say("info", COMMANDS_HELP)

    def action_toggle_panel(self) -> None:
        panel = self.query_one(StatsPanel)
        panel.display = not panel.display

    async def action_quit(self) -> None:
        self.action_stop()
        self.exit(return_code=1 if self.open_failed else 0)

    def on_log_line(self, event: LogLine) -> None:
        self.say("error" if event.level >= logging.ERROR else "info", event.text)

    # -- commands -------------------------------------------------------------------------

    def run_command(self, cmd: Command) -> None:
        s = self.settings
        if cmd.name == "reset":
            self.action_stop()
            self._epoch += 1
            self.history.clear()
            self.stats = AnswerStats()
            for m in self.query(Message):
                m.remove()
            self.say("info", "conversation cleared")
        elif cmd.name == "help":
            self.action_help()
        elif cmd.name == "quit":
            self.exit(return_code=1 if self.open_failed else 0)
        elif cmd.name in ("temp", "top_p", "max", "seed", "system"):
            field = {"temp": "temperature", "max": "max_tokens"}.get(cmd.name, cmd.name)
            setattr(s, field, cmd.value)
            self.say("info", f"{field} = {cmd.value!r}")
        elif cmd.name == "theme":
            if cmd.value and cmd.value not in self.available_themes:
                raise CommandError(f"no theme {cmd.value!r}; try {', '.join(sorted(self.available_themes))}")
            self.theme = cmd.value or (THEMES[1] if self.theme == THEMES[0] else THEMES[0])
            self.say("info", f"theme {self.theme}")
        elif cmd.name == "stats":
            if self.engine is None:
                raise CommandError("the model is not open yet")
            self.say("info", json.dumps(self.engine.statistics(), indent=1, default=str))
        elif cmd.name == "trace":
            self._trace(cmd.value)
        elif cmd.name == "reopen":
            self.action_stop()
            self.open_engine(self.settings.config or EngineConfig())
        self._refresh_panel()

    def _trace(self, path: str | None) -> None:
        self.action_stop()
        self.settings.config = dataclasses.replace(self.settings.config or EngineConfig(), trace=path)
        self.say("info", f"reopening the model with trace {'to ' + path if path else 'off'}")
        self.open_engine(self.settings.config)
