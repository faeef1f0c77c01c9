"""Loggers for library code: structlog front end, stdlib logging underneath.

Wrapping a stdlib logger (rather than using structlog's global default, which prints every
level to stdout) means an application that never configures logging sees only warnings, and
one that does controls levels and handlers the usual way. Only entry points (the CLI)
configure logging.
"""

from __future__ import annotations

import logging

import structlog

_PROCESSORS = [
    structlog.contextvars.merge_contextvars,  # request id, layer, token bound by the engine
    structlog.processors.add_log_level,
    structlog.dev.ConsoleRenderer(colors=False),
]


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.wrap_logger(
        logging.getLogger(name), processors=_PROCESSORS, wrapper_class=structlog.stdlib.BoundLogger
    )
