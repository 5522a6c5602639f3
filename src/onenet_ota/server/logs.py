"""The server's logs: text or JSON lines on stderr, an optional access log, and no secrets.

``configure_logging(level, "json")`` makes every record one JSON object per line (``time``,
``level``, ``logger``, ``message``, ``process``, ``worker`` in a worker process, ``exception``
with its traceback, and an access record's fields); ``"text"`` keeps the plain one-line format.

The access log (:class:`AccessLog`, ``serve --access-log``) writes one record per request on the
``onenet_ota.access`` logger: time, client address (without port), method, path WITHOUT its query
string (a query can carry a token, E8's ``token=``), status, body bytes, duration, dialect and
endpoint. Headers are never logged.

What never reaches a log line: Authorization values, download tokens, signatures, keys. The
server does not log them to begin with; on top of that every formatter here passes its output
through :func:`redact`, which blanks what looks like one (``sign=``, ``token=``, ``key=``, a
``Bearer`` value, the token segment of an E5/E6/E7 path), so that a request target or header
quoted in an exception's message cannot leak one either.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, Final, Literal, TextIO

from onenet_ota.server.http import FileSegment, Request, Response

__all__ = [
    "ACCESS_LOGGER",
    "AccessLog",
    "JsonFormatter",
    "LogFormat",
    "TextFormatter",
    "configure_logging",
    "redact",
]

LogFormat = Literal["text", "json"]

ACCESS_LOGGER: Final = "onenet_ota.access"
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_MASK: Final = "***"
_HANDLER_NAME: Final = "onenet-ota"
# name=value and "name": "value" pairs whose value is a credential. The names: the OneNET
# Authorization fields (sign, and the whole value), download tokens, access keys, the
# management API's bearer token and the push token.
_SECRET_PAIR_RE: Final = re.compile(
    r"(?i)(\b(?:authorization|sign|token|(?:access_?|auth_?)?key|accesskey|authinfo|password|"
    r"secret|admin_token|push_token|metrics_token)\b\s*(?:[=:]|\"\s*:)\s*\"?)"
    r"([^\s&\"',;}]+)"
)
_BEARER_RE: Final = re.compile(r"(?i)(\bbearer\s+)[^\s\"',;}]+")
# The classic paths whose segment is a download token (E5, E6, E7; §4.1).
_TOKEN_PATH_RE: Final = re.compile(r"(/ota/south/(?:device/)?download/)[^/\s?\"']+")
_UNPRINTABLE_RE: Final = re.compile(r"[\x00-\x1f\x7f]")


def redact(text: str) -> str:
    """``text`` with every credential-looking value replaced by ``***``."""
    text = _TOKEN_PATH_RE.sub(r"\1" + _MASK, text)
    text = _BEARER_RE.sub(r"\1" + _MASK, text)
    return _SECRET_PAIR_RE.sub(r"\1" + _MASK, text)


class TextFormatter(logging.Formatter):
    """The plain format, redacted, with ``worker-N`` after the time in a worker process."""

    def __init__(self, worker: int | None = None) -> None:
        fmt = TEXT_FORMAT if worker is None else TEXT_FORMAT.replace(" ", f" worker-{worker} ", 1)
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        """One redacted line (and the traceback, if any)."""
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per record; see the module's description for the fields."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON, redacted."""
        created = time.gmtime(record.created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", created) + f".{int(record.msecs):03d}Z"
        entry: dict[str, Any] = {
            "time": stamp,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
            "process": record.process,
        }
        if self._worker is not None:
            entry["worker"] = self._worker
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(access)
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = redact(record.exc_text)
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


def configure_logging(
    level: int,
    log_format: LogFormat = "text",
    *,
    worker: int | None = None,
    stream: TextIO | None = None,
) -> None:
    """Log records of ``level`` and above to ``stream`` (stderr) in ``log_format``, replacing
    the handler an earlier call installed; ``worker`` is the worker index shown on each line.

    Like ``logging.basicConfig``, this does nothing where something else has set up the root
    logger already (an application embedding the server, a test runner): its handlers and
    level are its own.
    """
    root = logging.getLogger()
    if any(old.get_name() != _HANDLER_NAME for old in root.handlers):
        return
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    formatter: logging.Formatter = (
        JsonFormatter(worker) if log_format == "json" else TextFormatter(worker)
    )
    handler.setFormatter(formatter)
    handler.set_name(_HANDLER_NAME)
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # start-up noise


class AccessLog:
    """Writes one access record per request to the ``onenet_ota.access`` logger (INFO)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger if logger is not None else logging.getLogger(ACCESS_LOGGER)

    def write(
        self,
        request: Request,
        answer: int | str,
        response: Response | None,
        seconds: float,
        dialect: str,
        endpoint: str,
    ) -> None:
        """Log ``request``'s record; ``response`` is None when none was made (``answer`` says
        why)."""
        if not self._log.isEnabledFor(logging.INFO):
            return
        client = request.peer.rsplit(":", 1)[0] if ":" in request.peer else request.peer
        path = _UNPRINTABLE_RE.sub(_escape, redact(request.path))
        nbytes = 0
        if response is not None and request.method != "HEAD":
            body = response.body
            if isinstance(body, FileSegment):
                nbytes = body.length
            elif isinstance(body, bytes):
                nbytes = len(body)  # a Stream's size is unknown when the request is logged
        duration_ms = round(seconds * 1000, 3)
        fields = {
            "client": client,
            "method": request.method,
            "path": path,
            "status": answer,
            "bytes": nbytes,
            "duration_ms": duration_ms,
            "dialect": dialect,
            "endpoint": endpoint,
        }
        self._log.info(
            '%s "%s %s" %s %d %.3fms %s %s',
            client,
            request.method,
            path,
            answer,
            nbytes,
            duration_ms,
            dialect,
            endpoint,
            extra={"access": fields},
        )


def _escape(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"
