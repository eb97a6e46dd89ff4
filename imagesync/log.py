"""Logging: structlog for imagesync, the stdlib (oslo, kombu) routed through it.

JSON lines prefixed with the syslog priority (`<6>{...}`) for journald, or
readable console lines on a TTY. Credentials in URLs and secret-looking keys
are masked in every line, whatever logger wrote it. Configures; logs nothing.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

import structlog

_PRIORITY = {"critical": 2, "error": 3, "exception": 3, "warning": 4, "warn": 4, "info": 6,
             "debug": 7}
_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<netloc>[^/\s\"'?#]+)")
_USERINFO = re.compile(r"[^,@/]*:[^,@/]*@")   # user:password@, once per host of a netloc
_SECRET_KEYS = re.compile(r"(?i)([\"']?[a-z_-]*(?:password|passwd|secret|token|api_key|"
                          r"application_credential_secret)[\"']?\s*[:=]\s*)"
                          r"(\"[^\"]*\"|'[^']*'|[^\s\"'&,;}\]]+)")   # never past its field
_QUIET = {"amqp": logging.WARNING, "kombu": logging.WARNING, "urllib3": logging.WARNING,
          "keystoneauth": logging.WARNING, "stevedore": logging.WARNING,
          "oslo.messaging._drivers.impl_rabbit": logging.WARNING,
          "oslo_messaging._drivers.amqpdriver": logging.WARNING,
          "openstack": logging.WARNING, "oslo_policy": logging.WARNING}


def redact(text: str) -> str:
    """Mask credentials: rabbit://u:SECRET@h1,u:SECRET@h2 -> rabbit://***@h1,***@h2, and
    password=SECRET, "password": "SECRET", {'password': 'SECRET'} -> ***."""
    text = _URL.sub(lambda m: m["scheme"] + _USERINFO.sub("***@", m["netloc"]), text)
    return _SECRET_KEYS.sub(_masked, text)


def _masked(m: re.Match) -> str:
    quote = m[2][0] if m[2][0] in "\"'" else ""   # a quoted value stays quoted: valid JSON
    return f"{m[1]}{quote}***{quote}"


class _JournalJSON:
    def __call__(self, _logger, _name, event_dict) -> str:
        prio = _PRIORITY.get(str(event_dict.get("level", "info")), 6)
        return f"<{prio}>" + redact(json.dumps(event_dict, default=str, separators=(",", ":")))


class _RedactingConsole(structlog.dev.ConsoleRenderer):
    def __call__(self, logger, name, event_dict) -> str:
        return redact(super().__call__(logger, name, event_dict))


def setup(fmt: str = "auto", level: str = "INFO", stream=None) -> None:
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    renderer = _JournalJSON() if fmt == "json" else _RedactingConsole(colors=False)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer])
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name, lvl in _QUIET.items():
        logging.getLogger(name).setLevel(max(lvl, logging.getLevelName(level)))
