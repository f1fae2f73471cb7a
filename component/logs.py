"""Structured logging for the gateway process (DESIGN 9): one event per line.

A terminal gets structlog's console renderer; anything else (systemd, a container, a file) gets
JSON lines. Standard-library loggers (slixmpp, alembic, asyncio) are routed through the same
processors so the whole process speaks one format. Values of keys that name a secret or a
password are redacted before rendering, wherever they come from.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Mapping
from typing import Any, TextIO, cast

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

REDACTED = "[redacted]"
_SECRET_WORDS = ("secret", "password", "passwd")
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


@functools.lru_cache(maxsize=1024)
def _is_secret_name(key: str) -> bool:
    return key.lower().endswith(_SECRET_WORDS)


def _is_secret_key(key: object) -> bool:
    # Event keys come from a small fixed vocabulary, so the answer is cached per key name.
    return isinstance(key, str) and _is_secret_name(key)


def _redact(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: REDACTED if _is_secret_key(k) else _redact(v) for k, v in value.items()}
    return value


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Processor: replace the value of any key named ``*secret``/``*password`` (also nested)."""
    for key, value in event_dict.items():
        if _is_secret_key(key):
            event_dict[key] = REDACTED
        elif isinstance(value, dict):  # a plain type check: abc checks cost per key
            event_dict[key] = _redact(value)
    return event_dict


def _add_stdlib_logger_name(
    _logger: WrappedLogger, _method: str, event_dict: EventDict
) -> EventDict:
    record = event_dict.get("_record")
    if isinstance(record, logging.LogRecord):
        event_dict["logger_name"] = record.name
    return event_dict


def parse_level(level: str) -> int:
    """``"info"`` -> ``logging.INFO``; raises ValueError naming the accepted levels."""
    try:
        return _LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(f"log level {level!r} is not one of {', '.join(_LEVELS)}") from None


def configure_logging(
    level: str = "info", json: bool | None = None, stream: TextIO | None = None
) -> None:
    """Set up structlog and stdlib logging; ``json=None`` picks JSON unless stderr is a TTY."""
    numeric = parse_level(level)
    out = stream if stream is not None else sys.stderr
    if json is None:
        json = not out.isatty()
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    renderer: Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
        # No locals in tracebacks: they could hold the very secrets redacted above.
        shared.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # Libraries log through the stdlib; give them the same processors and renderer.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[_add_stdlib_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)


def get_logger(name: str, **context: Any) -> FilteringBoundLogger:
    """A logger bound to ``logger_name=name`` and ``context``; resolved lazily, so module-level
    loggers follow a later :func:`configure_logging`."""
    return cast(FilteringBoundLogger, structlog.get_logger(logger_name=name, **context))
