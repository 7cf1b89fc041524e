"""JSON logging with the request id on every line, and the request-id middleware.

Every record is one JSON object per line on stderr. The request id is taken from `X-Request-ID`
when the client (or the gateway) sent a sane one, else generated, and echoed on every response.
Access log lines carry the path without its query string: queries may hold codes or tokens.

The access log is the one record written for every request, so it skips the logging machinery:
each line is built directly and lines are written in batches (at most `ACCESS_FLUSH_SECONDS` late,
and at exit). Through `logging` it cost about 45 µs of CPU per request, more than aiohttp itself.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import re
import sys
import time
from contextvars import ContextVar
from typing import Any

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler

REQUEST_ID_HEADER = "X-Request-ID"
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
REQUEST_ID = web.RequestKey("request_id", str)

_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request id, service, extras."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(service: str, level: str) -> None:
    """Route every logger to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def new_request_id() -> str:
    """32 random hex digits (the shape of a uuid4's hex, without building a UUID)."""
    return os.urandom(16).hex()


def adopt_request_id(request: web.Request) -> str:
    """The client's (or gateway's) request id when it is sane, else a new one; kept on the request."""
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = incoming if _VALID_REQUEST_ID.fullmatch(incoming) else new_request_id()
    request[REQUEST_ID] = request_id
    return request_id


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Adopt or generate the request id, expose it to logging, echo it on the response."""
    request_id = adopt_request_id(request)
    token = request_id_var.set(request_id)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers[REQUEST_ID_HEADER] = request_id
        raise
    finally:
        request_id_var.reset(token)
    response.headers[REQUEST_ID_HEADER] = request_id
    return response


ACCESS_FLUSH_SECONDS = 0.2
ACCESS_BATCH_LINES = 512


class _AccessLines:
    """Access log lines waiting to be written: flushed by a timer on the loop, when many, and at exit."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.handler: logging.StreamHandler[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        atexit.register(self.flush)

    def add(self, line: str, handler: logging.StreamHandler[Any]) -> None:
        self.handler = handler
        self.lines.append(line)
        if len(self.lines) >= ACCESS_BATCH_LINES:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(ACCESS_FLUSH_SECONDS, self.flush)
            except RuntimeError:  # no loop: nothing would flush later
                self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.lines or self.handler is None:
            return
        text, self.lines = "".join(self.lines), []
        handler = self.handler
        handler.acquire()  # one write, never interleaved with a record another thread logs
        try:
            handler.stream.write(text)
            handler.stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed or gone: an access line is not worth failing a request for
        finally:
            handler.release()


_ACCESS_LINES = _AccessLines()
_second = -1
_second_text = ""


def _timestamp(now: float) -> str:
    global _second, _second_text
    second = int(now)
    if second != _second:
        _second, _second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second_text}.{int((now - second) * 1000):03d}Z"


def _json_handler() -> tuple[logging.StreamHandler[Any], JsonFormatter] | None:
    """The root logger's JSON stream handler (`configure_logging`), if that is how logging is set up."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and isinstance(handler.formatter, JsonFormatter):
            return handler, handler.formatter
    return None


class JsonAccessLogger(AbstractAccessLogger):
    """Access log as JSON: method, path (no query), status, duration, request id, client.

    The same fields and shape `JsonFormatter` writes, built directly (see the module's docstring);
    where logging is not set up by `configure_logging`, it logs through `logging` instead.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, duration: float) -> None:
        target = _json_handler()
        if target is None:
            self._log_record(request, response, duration)
            return
        handler, formatter = target
        entry = {
            "time": _timestamp(time.time()),
            "level": "info",
            "service": formatter.service,
            "logger": self.logger.name,
            "message": f"{request.method} {request.path} {response.status}",
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "duration_ms": round(duration * 1000, 3),
            "request_id": response.headers.get(REQUEST_ID_HEADER),
            "remote": request.remote,
        }
        _ACCESS_LINES.add(orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE).decode(), handler)

    def _log_record(self, request: web.BaseRequest, response: web.StreamResponse, duration: float) -> None:
        self.logger.info(
            "%s %s %s",
            request.method,
            request.path,
            response.status,
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "duration_ms": round(duration * 1000, 3),
                "request_id": response.headers.get(REQUEST_ID_HEADER),
                "remote": request.remote,
            },
        )


def flush_access_log() -> None:
    """Write the access lines not written yet (tests, and shutdown paths that skip `atexit`)."""
    _ACCESS_LINES.flush()
