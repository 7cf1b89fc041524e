"""Serve an app on its port, and stop it on SIGTERM or SIGINT without losing a request.

A stop happens in three steps (README, "Guarantees"):

1. At the signal, in one go: `/readyz` answers 503 (`stopping`); every answer from then on carries
   `Connection: close`; the connections the kernel has already completed but the process has not
   yet accepted are accepted; the listening sockets close. A new connection is refused, which a
   gateway retries on another instance (nginx does so even for a POST: nothing was sent).
2. The drain (`drain` seconds at most): the connections already open keep being served, each closed
   after its next answer. An idle keep-alive connection is left open for its client to use or close:
   closing it here could cross a request the client is sending on it at that moment, which nginx
   would not retry (a POST may have reached the service). nginx closes its own idle upstream
   connections after `keepalive_timeout`, set below the drain, so behind it the drain ends early,
   as soon as every connection is gone.
3. aiohttp's shutdown: the remaining idle connections are closed, requests in flight get
   `shutdown_timeout` seconds to finish, then the cleanup contexts run (the outbox relay finishes the
   delivery under way). The process exits 0.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import socket
import struct
import sys
from typing import Protocol

from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_log import AccessLogger

from shared.appkeys import LIFECYCLE, Lifecycle
from shared.config import SettingsError

log = logging.getLogger(__name__)

BACKLOG = 128
DRAIN_POLL = 0.02  # seconds between two looks at the open connections during the drain


def setup_lifecycle(app: web.Application) -> Lifecycle:
    """The app's `Lifecycle`, and `Connection: close` on every answer once it is stopping."""
    lifecycle = Lifecycle()
    app[LIFECYCLE] = lifecycle

    async def close_when_stopping(_: web.Request, response: web.StreamResponse) -> None:
        if lifecycle.stopping:
            # aiohttp has already chosen the Connection header when this signal runs: set both.
            response.force_close()
            response.headers[hdrs.CONNECTION] = "close"

    app.on_response_prepare.append(close_when_stopping)
    return lifecycle


class ListenError(Exception):
    """The address cannot be listened on (taken, not this machine's, not resolvable)."""


class ServingSettings(Protocol):
    """What `serve_until_signalled` needs of a service's settings."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def shutdown_drain(self) -> float: ...
    @property
    def shutdown_timeout(self) -> float: ...


def check_shutdown(drain: float, timeout: float, prefix: str) -> None:
    """SettingsError unless the drain is 0..300 seconds and the shutdown timeout 1..300."""
    if not 0 <= drain <= 300 or not 1 <= timeout <= 300:
        raise SettingsError(
            f"{prefix}SHUTDOWN_DRAIN must be 0..300 seconds and {prefix}SHUTDOWN_TIMEOUT 1..300 seconds"
        )


def listen(host: str, port: int, *, backlog: int = BACKLOG) -> list[socket.socket]:
    """Non-blocking listening sockets on every address `host` resolves to (as asyncio would bind);
    ListenError when one cannot be opened."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError as error:
        for sock in sockets:
            sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {error}") from error
    return sockets


_SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>
# One classic BPF instruction, BPF_RET | BPF_K with 0: keep nothing of the packet, i.e. drop it.
_DROP_EVERYTHING = struct.pack("HBBI", 0x06, 0, 0, 0)


def _drop_new_connections(sock: socket.socket) -> None:
    """From now on, drop every connection attempt `sock` receives (Linux: a socket filter).

    Closing a listening socket resets every connection the kernel completed but nobody accepted, and
    a client (nginx) that had already sent its request on one cannot tell that reset from a crash
    mid-request, so it may not retry a POST elsewhere. With the filter on, no connection completes
    between taking the backlog and closing: a new client's SYN is dropped, its retransmission meets
    a closed port and is refused, and a refused connection is retried on another instance. Where the
    filter cannot be set (not Linux), the window is the few microseconds of `GracefulServer.stop`.
    """
    if not sys.platform.startswith("linux"):
        return
    program = ctypes.create_string_buffer(_DROP_EVERYTHING)
    fprog = struct.pack("HL", 1, ctypes.addressof(program))  # struct sock_fprog {len; filter *}
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError as error:
        log.warning("could not stop new connections before closing the listener: %s", error)


def _accept_pending(sock: socket.socket) -> list[socket.socket]:
    """Every connection waiting in `sock`'s backlog, accepted now (closing the socket would reset them)."""
    accepted: list[socket.socket] = []
    while True:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            return accepted
        except ConnectionAbortedError:
            continue
        except OSError as error:
            log.warning("accepting the pending connections at shutdown stopped: %s", error)
            return accepted
        conn.setblocking(False)
        accepted.append(conn)


class GracefulServer:
    """An app served on `host`:`port`; `stop()` starts the stop, `serve()` runs until it is done."""

    def __init__(
        self,
        app: web.Application,
        *,
        host: str,
        port: int,
        drain: float,
        shutdown_timeout: float,
        access_log_class: type[AbstractAccessLogger] = AccessLogger,
    ) -> None:
        self._lifecycle = app[LIFECYCLE]
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log_class=access_log_class, shutdown_timeout=shutdown_timeout
        )
        self._host = host
        self._port = port
        self._sockets: list[socket.socket] = []
        self._listeners: list[asyncio.Server] = []
        self._drain = drain
        self.listening = asyncio.Event()  # set once the sockets listen (tests wait for it)
        self._stop_requested = asyncio.Event()
        self._handovers: set[asyncio.Task[None]] = set()

    @property
    def stopping(self) -> bool:
        return self._lifecycle.stopping

    @property
    def port(self) -> int:
        """The port listened on: the kernel's pick once `listening` is set, when asked for 0."""
        return self._port

    async def serve(self) -> None:
        """Start the app, then listen; after `stop()`, drain, shut down and clean up; then return."""
        await self._runner.setup()
        try:
            server = self._runner.server
            assert server is not None
            if not self.stopping:  # a signal during startup: clean up without ever listening
                self._sockets = listen(self._host, self._port)
                self._port = int(self._sockets[0].getsockname()[1])
                loop = asyncio.get_running_loop()
                for sock in self._sockets:
                    self._listeners.append(await loop.create_server(server, sock=sock, backlog=BACKLOG))
                self.listening.set()
                log.info("listening", extra={"host": self._host, "port": self.port})
            await self._stop_requested.wait()
            await self._wait_drained()
        finally:
            self.stop()  # when listening failed or the task was cancelled: never leave a socket open
            await self._runner.cleanup()
            log.info("stopped")

    def stop(self) -> None:
        """Not ready, `Connection: close` from now on, pending connections taken, listeners closed.

        Synchronous on purpose: no event-loop turn passes between accepting the backlog and closing
        the sockets, so no connection the kernel completed meanwhile is reset.
        """
        if self.stopping:
            return
        self._lifecycle.stopping = True
        for sock in self._sockets:
            _drop_new_connections(sock)
        pending = [conn for sock in self._sockets for conn in _accept_pending(sock)]
        for listener in self._listeners:
            listener.close()
        for sock in self._sockets:
            sock.close()  # those no listener took yet; closing a socket twice is harmless
        loop = asyncio.get_running_loop()
        for conn in pending:
            task = loop.create_task(self._hand_over(conn))
            self._handovers.add(task)
            task.add_done_callback(self._handovers.discard)
        log.info(
            "stopping: not ready, listener closed, draining for at most %.1f s",
            self._drain,
            extra={"accepted_at_stop": len(pending)},
        )
        self._stop_requested.set()

    async def _hand_over(self, conn: socket.socket) -> None:
        """Serve a connection accepted at the stop like any other (aiohttp tracks it for the shutdown)."""
        server = self._runner.server
        assert server is not None
        try:
            await asyncio.get_running_loop().connect_accepted_socket(server, conn)
        except OSError:
            conn.close()

    async def _wait_drained(self) -> None:
        """Until every connection has closed, or the drain time is over."""
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self._drain
        # Polled: aiohttp's Server signals nothing when its last connection goes.
        while (server.connections or self._handovers) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL)
        log.info(
            "drained",
            extra={"seconds": round(loop.time() - started, 3), "connections_left": len(server.connections)},
        )


async def serve_until_signalled(
    app: web.Application,
    settings: ServingSettings,
    *,
    access_log_class: type[AbstractAccessLogger] = AccessLogger,
) -> None:
    """Serve `app` on the settings' host and port until SIGTERM or SIGINT, then stop as above."""
    server = GracefulServer(
        app,
        host=settings.host,
        port=settings.port,
        drain=settings.shutdown_drain,
        shutdown_timeout=settings.shutdown_timeout,
        access_log_class=access_log_class,
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.stop)
    try:
        await server.serve()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
