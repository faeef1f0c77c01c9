"""The `flashlm` command: the parser, assembled from the command groups (`store`: convert,
verify; `generate`: run, chat; `selection`: calibrate, eval; `measure`: bench, trace), and `main`.
Thin: everything goes through the public API.

Exit codes: 0 success, 1 a flashlm error (one line on stderr, no traceback), 2 bad usage,
130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from flashlm import __version__
from flashlm.builtin import DEFAULT_MODEL
from flashlm.cli.common import Parser, engine_config, engine_options, sparsity_options
from flashlm.cli.generate import add_chat, add_run
from flashlm.cli.measure import add_bench, add_trace
from flashlm.cli.selection import add_calibrate, add_eval
from flashlm.cli.store import add_convert, add_pull, add_verify
from flashlm.errors import FlashLMError
from flashlm.serve import cli as serve_cli


def _configure_logging(verbose: int) -> None:
    # flashlm's structlog loggers sit on stdlib logging (flashlm.log): configure that.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    logging.getLogger("flashlm").setLevel(logging.WARNING - 10 * min(verbose, 2))


EPILOG = f"""\
examples:
  flashlm run "What is flash memory?"          answer with the default model ({DEFAULT_MODEL})
  flashlm chat                                 chat in the terminal (needs the tui extra)
  flashlm pull qwen2.5-coder-1.5b              install a built-in model (flashlm pull --list)
  flashlm convert ckpt/ store/ --dtype float32 make a store from a transformers checkpoint
  flashlm verify store/ --json                 check every checksum, as JSON

exit codes: 0 success, 1 a flashlm error (one line on stderr), 2 bad usage, 130 interrupted.
`flashlm COMMAND --help` explains each command."""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="flashlm", epilog=EPILOG,
               description="Run language models larger than memory: attention stays in RAM, "
               "FFN neurons are read from flash as needed.")
    p.add_argument("--version", action="version", version=f"flashlm {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_convert(sub)
    add_pull(sub)
    add_run(sub)
    add_chat(sub)
    serve_cli.add_parser(sub, engine_options=(engine_options, sparsity_options), engine_config=engine_config)
    add_verify(sub)
    add_calibrate(sub)
    add_eval(sub)
    add_bench(sub)
    add_trace(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "logs_to_app", False):  # the chat app shows flashlm's warnings itself
        _configure_logging(args.verbose)
    try:
        return args.func(args)
    except FlashLMError as e:
        print(f"flashlm: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a path that cannot be read or written: the user's to fix, not a crash
        if isinstance(e, BrokenPipeError):  # `flashlm run ... | head`: the reader left; say nothing
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        print(f"flashlm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nflashlm: interrupted", file=sys.stderr)
        return 130
