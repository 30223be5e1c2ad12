"""Structured logs: one JSON object per line on stderr.

Every line has ``ts`` (UTC, ISO 8601, milliseconds), ``level``, ``service``, ``logger`` and
``msg``; the context fields ``run_id``, ``step``, ``event_id`` and ``trace_id`` follow when
given through ``extra=`` (``trace_id`` also comes from the current OpenTelemetry span when not
given), then any other ``extra`` keys, and ``exc`` holds the traceback of a logged exception.

Secrets are never written: settings hold them as ``SecretStr`` (which prints as asterisks),
and passwords in URLs (``redis://user:pw@host``) and ``password=``/``token=``-style pairs
are masked in the message, the traceback and every string value.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import msgspec
from opentelemetry import trace

from eventstore.errors import FlowlogError

CONTEXT_FIELDS: Final = ("run_id", "step", "event_id", "trace_id")


def trace_field(traceparent: str) -> dict[str, str]:
    """The ``trace_id`` field naming the trace of a W3C ``traceparent`` (none without one), for
    a line logged about an event once its span has ended."""
    return {"trace_id": traceparent.split("-")[1]} if traceparent else {}


#: Attributes every LogRecord has: anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES: Final = frozenset(
    {*logging.LogRecord("", 0, "", 0, "", None, None).__dict__, "message", "asctime", "taskName"}
)

_ENCODER: Final = msgspec.json.Encoder(enc_hook=str)
_URL_PASSWORD: Final = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^:/@\s]*):[^@\s]+@", re.I)
_SECRET_PAIR: Final = re.compile(
    r"(?P<key>\b(?:password|passwd|secret|token|api[_-]?key|authorization)\b\s*[=:]\s*)"
    r"(?:bearer\s+)?[^\s,;&]+",
    re.I,
)
_MASK: Final = "***"


def mask_secrets(text: str) -> str:
    """``text`` with URL passwords and ``password=...``-style values replaced by ``***``."""
    text = _URL_PASSWORD.sub(rf"\g<scheme>:{_MASK}@", text)
    return _SECRET_PAIR.sub(rf"\g<key>{_MASK}", text)


class JsonLineFormatter(logging.Formatter):
    """Formats a record as one JSON object (see the module docstring for the fields)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in CONTEXT_FIELDS:
            value = record.__dict__.get(field)
            if value is not None and value != "":
                line[field] = value
        if "trace_id" not in line:
            span_context = trace.get_current_span().get_span_context()
            if span_context.is_valid:
                line["trace_id"] = trace.format_trace_id(span_context.trace_id)
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and key not in line:
                line[key] = value
        for key, value in line.items():
            if isinstance(value, str):
                line[key] = mask_secrets(value)
        if record.exc_info:
            line["exc"] = mask_secrets(self.formatException(record.exc_info))
        return _ENCODER.encode(line).decode()


class UnknownLogLevel(FlowlogError, ValueError):
    """The configured log level is not a level name of :mod:`logging`."""


class _JsonLineHandler(logging.StreamHandler[TextIO]):
    """The stderr handler :func:`configure_logging` installs (and replaces when called again)."""


def configure_logging(service: str, level: str) -> None:
    """Send every log record at ``level`` or above to stderr as JSON lines for ``service``.

    Replaces a handler installed by an earlier call; other handlers are left alone. Raises
    :class:`UnknownLogLevel` for a level name :mod:`logging` does not know.
    """
    levels = logging.getLevelNamesMapping()
    if level.upper() not in levels:
        raise UnknownLogLevel(f"unknown log level {level!r}; use one of {sorted(levels)}")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _JsonLineHandler)]:
        root.removeHandler(handler)
    handler = _JsonLineHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter(service))
    root.addHandler(handler)
    root.setLevel(levels[level.upper()])
