"""Structured logging for the gateway process (DESIGN 9): one event per line.

A terminal gets structlog's console renderer; anything else (systemd, a container, a file) gets
JSON lines. Standard-library loggers (slixmpp, alembic, asyncio) are routed through the same
processors so the whole process speaks one format. Values of keys that name a secret or a
password are redacted before rendering, wherever they come from.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
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


# key -> "is it a secret's name"; event keys come from a small fixed vocabulary, so this stays
# small, and a plain dict lookup is what redacting costs per key (it runs for every event).
_SECRET_KEYS: dict[object, bool] = {}
_SECRET_KEYS_MAX = 1024


def _is_secret_key(key: object) -> bool:
    secret = _SECRET_KEYS.get(key)
    if secret is None:
        secret = isinstance(key, str) and key.lower().endswith(_SECRET_WORDS)
        if len(_SECRET_KEYS) < _SECRET_KEYS_MAX:
            _SECRET_KEYS[key] = secret
    return secret


def _redact(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: REDACTED if _is_secret_key(k) else _redact(v) for k, v in value.items()}
    return value


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Processor: replace the value of any key named ``*secret``/``*password`` (also nested)."""
    secret_keys = _SECRET_KEYS
    for key, value in event_dict.items():
        secret = secret_keys.get(key)
        if secret is None:
            secret = _is_secret_key(key)
        if secret:
            event_dict[key] = REDACTED
        elif isinstance(value, dict):  # a plain type check: abc checks cost per key
            event_dict[key] = _redact(value)
    return event_dict


def _when_present(key: str, processor: Processor) -> Processor:
    """``processor``, run only for events that carry ``key`` (it leaves the others alone)."""

    def run(logger: WrappedLogger, method: str, event_dict: EventDict) -> Any:
        return processor(logger, method, event_dict) if key in event_dict else event_dict

    return run


# (whole second, its ISO text): the date and time are formatted once a second, not per event.
_second: tuple[int, str] = (-1, "")


def add_timestamp(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Processor: ``timestamp`` in ISO 8601 UTC with microseconds, e.g.
    ``2026-12-03T13:48:55.704391Z`` (what structlog's ISO TimeStamper writes, for less)."""
    global _second
    now = time.time()
    whole = int(now)
    if whole != _second[0]:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    event_dict["timestamp"] = f"{_second[1]}.{int((now - whole) * 1e6):06d}Z"
    return event_dict


def _json_fallback(value: object) -> object:
    """What structlog's JSON renderer does with a value json cannot encode."""
    custom = getattr(value, "__structlog__", None)
    return custom() if callable(custom) else repr(value)


# One encoder for every event: json.dumps(..., default=...) builds a new JSONEncoder per call.
_ENCODER = json.JSONEncoder(default=_json_fallback)


def _encode(event_dict: EventDict, **_options: Any) -> str:
    return _ENCODER.encode(event_dict)


def _add_stdlib_logger_name(
    _logger: WrappedLogger, _method: str, event_dict: EventDict
) -> EventDict:
    record = event_dict.get("_record")
    if isinstance(record, logging.LogRecord):
        event_dict["logger_name"] = record.name
    return event_dict


# Whether debug events are rendered: structlog's own default (nothing configured) renders all,
# configure_logging sets the level. Hot paths ask this before a per-message debug event, because
# even a filtered one costs a few microseconds (the lazy logger binds itself on every call).
_debug = True


def debug_enabled() -> bool:
    """True when debug events are logged: a per-message ``log.debug`` is worth its cost."""
    return _debug


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
    global _debug
    numeric = parse_level(level)
    _debug = numeric <= logging.DEBUG
    out = stream if stream is not None else sys.stderr
    if json is None:
        json = not out.isatty()
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        add_timestamp,
        redact_secrets,
    ]
    renderer: Processor
    if json:
        renderer = structlog.processors.JSONRenderer(serializer=_encode)
        # No locals in tracebacks: they could hold the very secrets redacted above.
        exceptions = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        # It renders only events with exc_info (log.exception sets it): skip the call otherwise.
        shared.append(_when_present("exc_info", exceptions))
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    structlog.configure(
        processors=[
            *shared,
            _when_present("stack_info", structlog.processors.StackInfoRenderer()),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One output logger for the stream, not a new one built for every event; it writes each
        # line with one write and a flush (print() writes the line and its end separately).
        logger_factory=functools.partial(_same_logger, structlog.WriteLogger(out)),
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


def _same_logger(logger: structlog.WriteLogger, *_args: Any) -> structlog.WriteLogger:
    return logger


def get_logger(name: str, **context: Any) -> FilteringBoundLogger:
    """A logger bound to ``logger_name=name`` and ``context``; resolved lazily, so module-level
    loggers follow a later :func:`configure_logging`."""
    return cast(FilteringBoundLogger, structlog.get_logger(logger_name=name, **context))
