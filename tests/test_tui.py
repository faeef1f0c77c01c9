"""The chat app, driven by Textual's Pilot against a small real store (random weights, a real
tokenizer with a chat template). Gated with events, never sleeps."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("textual")

from textual.widgets import Input  # noqa: E402

from flashlm import EngineConfig  # noqa: E402
from flashlm.tui import ChatApp, ChatSettings  # noqa: E402
from flashlm.tui.commands import Command, CommandError, parse_command  # noqa: E402
from flashlm.tui.widgets import Message  # noqa: E402


class GatedChat(ChatApp):
    """Holds the answer after `hold_after` tokens until the test lets go (or Esc cancels it)."""

    def __init__(self, settings: ChatSettings, hold_after: int | None = None) -> None:
        super().__init__(settings)
        self.hold_after = hold_after
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def show_chunk(self, chunk, bubble) -> None:
        await super().show_chunk(chunk, bubble)
        if self.hold_after is not None and self.stats.tokens == self.hold_after:
            self.holding.set()
            await self.release.wait()


def settings(store, **kw) -> ChatSettings:
    return ChatSettings(model=str(store), config=EngineConfig(selection="dense"), **kw)


async def opened(app: ChatApp, pilot) -> None:
    await app.workers.wait_for_complete()
    await pilot.pause()
    assert app.engine is not None, [m.text for m in app.query(Message)]


async def send(pilot, text: str) -> None:
    pilot.app.query_one("#prompt", Input).value = text
    await pilot.press("enter")


def turns(app: ChatApp, role: str) -> list[Message]:
    return [m for m in app.query(Message) if m.role == role]


async def test_prompt_streams_the_answer(llama_store):
    _, store = llama_store
    app = ChatApp(settings(store, max_tokens=12))
    async with app.run_test(size=(80, 24)) as pilot:
        await opened(app, pilot)
        await pilot.press(*"hello fox")  # typed, as a person would
        await pilot.press("enter")
        await app.answer.wait()
        await pilot.pause()

        [user], [bubble] = turns(app, "user"), turns(app, "assistant")
        assert user.text == "hello fox"
        # what the app shows is what the engine streams for the same conversation
        expected = await app.engine.generate([{"role": "user", "content": "hello fox"}], max_tokens=12)
        assert bubble.text == expected and expected
        assert app.stats.tokens >= 1 and app.stats.finish in ("stop", "length")
        assert app.history == [{"role": "user", "content": "hello fox"}, {"role": "assistant", "content": expected}]
        assert app.query_one("#prompt", Input).value == ""


async def test_escape_stops_mid_answer_and_the_app_stays_usable(llama_store):
    _, store = llama_store
    app = GatedChat(settings(store, max_tokens=200), hold_after=3)
    async with app.run_test(size=(80, 24)) as pilot:
        await opened(app, pilot)
        await send(pilot, "The quick brown")
        await app.holding.wait()  # three tokens are on screen; the answer wants 197 more
        await pilot.press("escape")
        await app.workers.wait_for_complete()
        await pilot.pause()

        [bubble] = turns(app, "assistant")
        assert app.answer.is_cancelled and app.stats.finish == "stopped" and app.stats.tokens == 3
        assert bubble.note == "[stopped]" and bubble.has_class("stopped")
        assert app.history[-1] == {"role": "assistant", "content": bubble.text}

        # still responsive: a command and a whole new answer work
        app.hold_after = None
        await send(pilot, "/max 4")
        assert app.settings.max_tokens == 4
        await send(pilot, "hello")
        await app.answer.wait()
        assert not app.answer.is_cancelled and 1 <= app.stats.tokens <= 4
        assert app.stats.finish in ("stop", "length") and len(turns(app, "assistant")) == 2


async def test_ctrl_c_stops_the_answer_not_the_app(llama_store):
    _, store = llama_store
    app = GatedChat(settings(store, max_tokens=200), hold_after=2)
    async with app.run_test(size=(80, 24)) as pilot:
        await opened(app, pilot)
        await send(pilot, "Flash memory")
        await app.holding.wait()
        await pilot.press("ctrl+c")
        await app.workers.wait_for_complete()
        assert app.is_running and app.stats.finish == "stopped"


async def test_reset_clears_the_conversation(llama_store):
    _, store = llama_store
    app = ChatApp(settings(store, max_tokens=4))
    async with app.run_test(size=(80, 24)) as pilot:
        await opened(app, pilot)
        await send(pilot, "hello")
        await app.answer.wait()
        assert len(app.history) == 2
        await send(pilot, "/reset")
        await pilot.pause()
        assert app.history == [] and app.stats.tokens == 0
        assert turns(app, "user") == turns(app, "assistant") == []
        assert [m.text for m in turns(app, "info")] == ["conversation cleared"]


async def test_reset_while_answering_keeps_the_new_conversation_empty(llama_store):
    _, store = llama_store
    app = GatedChat(settings(store, max_tokens=200), hold_after=2)
    async with app.run_test(size=(80, 24)) as pilot:
        await opened(app, pilot)
        await send(pilot, "hello")
        await app.holding.wait()
        await pilot.press("ctrl+l")
        await app.workers.wait_for_complete()
        assert app.history == [] and turns(app, "assistant") == []


async def test_commands_and_errors_are_shown_in_the_app(llama_store):
    _, store = llama_store
    app = ChatApp(settings(store, max_tokens=4))
    async with app.run_test(size=(80, 24)) as pilot:
        await opened(app, pilot)
        await send(pilot, "/temp 0.7")
        await send(pilot, "/temp hot")
        await send(pilot, "/nope")
        await send(pilot, "fox " * 400)  # longer than the model's 256-token context
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.settings.temperature == 0.7
        errors = [m.text for m in turns(app, "error")]
        assert any("/temp 'hot'" in e for e in errors) and any("unknown command /nope" in e for e in errors)
        assert any("PromptTooLong" in e or "context" in e for e in errors), errors
        assert app.history == []  # the refused prompt is not part of the conversation


async def test_trace_command_reopens_the_engine_with_a_trace_file(llama_store, tmp_path):
    _, store = llama_store
    app = ChatApp(settings(store, max_tokens=3))
    async with app.run_test(size=(80, 24)) as pilot:
        await opened(app, pilot)
        trace = tmp_path / "chat.jsonl"
        await send(pilot, f"/trace {trace}")
        await app.workers.wait_for_complete()
        assert app.engine is not None and app.engine.config.trace == str(trace)
        assert app.info["trace"] == "chat.jsonl"
        await send(pilot, "hello")
        await app.answer.wait()
        await send(pilot, "/trace off")  # closes the traced engine: its file is complete
        await app.workers.wait_for_complete()
        assert app.engine is not None and app.engine.config.trace is None
    lines = trace.read_text().splitlines()
    assert len(lines) > 1 and '"header"' in lines[0]


async def test_a_store_that_does_not_open_is_an_error_on_screen(tmp_path):
    app = ChatApp(ChatSettings(model=str(tmp_path / "missing"), config=EngineConfig(selection="dense")))
    async with app.run_test(size=(80, 24)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        [err] = turns(app, "error")
        assert "could not open" in err.text and "neither a store directory" in err.text
        await send(pilot, "hello")  # no engine: says so, does not crash
        await pilot.press("ctrl+q")
    assert app.return_code == 1


@pytest.mark.parametrize(
    "line,expected",
    [
        ("/temp 0.7", Command("temp", 0.7)),
        ("/temperature 0", Command("temp", 0.0)),
        ("/max 128", Command("max", 128)),
        ("/top-p 0.9", Command("top_p", 0.9)),
        ("/seed off", Command("seed", None)),
        ("/system be brief", Command("system", "be brief")),
        ("/trace off", Command("trace", None)),
        ("/clear", Command("reset")),
        ("/theme", Command("theme", None)),
    ],
)
def test_parse_command(line, expected):
    assert parse_command(line) == expected


@pytest.mark.parametrize("line", ["/temp", "/temp -1", "/max 0", "/top_p 2", "/trace", "/frobnicate"])
def test_bad_commands_say_what_to_type(line):
    with pytest.raises(CommandError, match=r"expected|needs|unknown"):
        parse_command(line)
