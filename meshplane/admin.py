"""The HTTP port: /metrics, /ready, /healthz and /debug/*, served by aiohttp.

The pages themselves are the control plane's (meshplane/app.py hands in a
function per path); this module is how they are served, and what a bad or
hostile request gets:

- GET (and HEAD, which is GET without the body) only: any other method is
  405 with an `Allow` header; an unknown path 404.
- A request line or a header longer than 8 KiB, or more than 64 headers:
  400. A request with a body: 413 (nothing here takes one).
- A connection that sends nothing, or stops half way through a request,
  is closed after `timeout` seconds.
- A malformed request is logged as one warning line, never a traceback; a
  page that raises is our bug, logged with its traceback and answered 500.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import structlog
from aiohttp import http_exceptions, web

from meshplane import listen

log = structlog.get_logger(__name__)

MAX_LINE = 8190  # aiohttp's default, Node's and nginx's order of size
MAX_HEADERS = 64


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    content_type: str
    body: bytes


Page = Callable[[Mapping[str, str]], Reply]
"""Query parameters (a repeated one's values joined by commas) -> the reply."""


def index_page(title: str, pages: Mapping[str, str]) -> Page:
    """A plain-text list of the pages served (path -> what it is), for `/` and `/debug`."""
    width = max(map(len, pages), default=0)
    body = "\n".join([title, "", *(f"{path:<{width}}  {about}" for path, about in pages.items())]) + "\n"
    reply = Reply(200, "text/plain; charset=utf-8", body.encode())
    return lambda query: reply


class HttpPort:
    """Serves `pages` (path -> page) on one address until stopped."""

    def __init__(self, pages: Mapping[str, Page], *, timeout: float = 5.0) -> None:
        app = web.Application(middlewares=[_no_body], client_max_size=1024)
        for path, page in pages.items():
            app.router.add_get(path, _handler(page))
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, logger=_aiohttp_log(),
            keepalive_timeout=timeout, lingering_time=min(timeout, 1.0),
            max_line_size=MAX_LINE, max_field_size=MAX_LINE, max_headers=MAX_HEADERS, shutdown_timeout=1.0,
        )
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Listen on the addresses `host` resolves to, as the ADS port does (listen.bind); returns the
        port (useful when `port` is 0). ListenError naming `--http` if it cannot."""
        sockets = listen.bind("--http", host, port)
        await self._runner.setup()
        for sock in sockets:
            await web.SockSite(self._runner, sock).start()
        self.port = int(sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        await self._runner.cleanup()


def _handler(page: Page) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        # A parameter given twice (`?down=zone=a&down=zone=b`) counts as its values joined by commas,
        # as the command line sends them: never only the first of them.
        query = {key: ",".join(request.query.getall(key)) for key in request.query}
        reply = page(query)
        return web.Response(status=reply.status, body=reply.body, headers={"Content-Type": reply.content_type})

    return handle


@web.middleware
async def _no_body(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                   ) -> web.StreamResponse:
    if request.body_exists:
        return web.Response(status=413, text="requests to this port carry no body\n",
                            headers={"Connection": "close"})
    return await handler(request)


class _OneLine(logging.Handler):
    """aiohttp's own log, as meshplane's: a bad request is one warning line; our bugs keep their traceback."""

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, http_exceptions.HttpProcessingError):
            reason = str(error.message).splitlines()[0] if error.message else ""
            log.warning("bad HTTP request", status=error.code, reason=reason[:200], detail=record.getMessage())
        elif record.levelno >= logging.ERROR:
            log.error("HTTP page failed", detail=record.getMessage(), exc_info=record.exc_info)


def _aiohttp_log() -> logging.Logger:
    logger = logging.getLogger("meshplane.admin.aiohttp")
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    if not logger.handlers:
        logger.addHandler(_OneLine())
    return logger
