"""Fault injection for the end-to-end fault tests: a TCP proxy that can cut, a server that never answers,
and a fake third party (Hunter's Email Verifier, an OpenID Connect provider) whose answers can be held.

Everything here runs on its own event loop in a background thread (`LoopThread`), so it outlives the
per-test event loops of pytest-asyncio and keeps forwarding while a test's loop is busy; tests drive
it through plain synchronous methods. Everything listens on loopback ports the kernel picks.

- `TcpProxy`: forwards a loopback port to PostgreSQL or Redis (on TCP or a unix socket). `cut()` aborts
  every connection through it and stops listening (new connections are refused), `restore()` listens
  again on the same port. To the services that is a real outage; the shared servers are untouched.
- `Blackhole`: accepts connections, reads whatever arrives and never answers (a hung third party).
- `FakeVendor`: an aiohttp app with Hunter's `/v2/email-verifier` (answers `valid`, or waits while
  `hold()` is on) and an OpenID Connect discovery document whose token endpoint is a `Blackhole`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from tests.e2e.api import _ReadResponse

HOST = "127.0.0.1"
T = TypeVar("T")


class LoopThread:
    """An event loop running in a daemon thread; `call` runs a coroutine there and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="faults-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_rest() -> None:
            current = asyncio.current_task()
            tasks = [task for task in asyncio.all_tasks() if task is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.call(cancel_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


class _Listener:
    """A loopback listener on a fixed port (picked at the first start) whose connections can be aborted."""

    def __init__(self, runner: LoopThread) -> None:
        self._runner = runner
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.accepted = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._transports.add(writer.transport)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handle(reader, writer)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            self._transports.discard(writer.transport)
            writer.transport.abort()

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, HOST, self.port, reuse_address=True)
            self.port = int(self._server.sockets[0].getsockname()[1])

    async def _abort_all(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for transport in list(self._transports):
            transport.abort()  # type: ignore[attr-defined]
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def start(self) -> None:
        self._runner.call(self._listen())

    def close(self) -> None:
        self._runner.call(self._abort_all())


class TcpProxy(_Listener):
    """Forwards connections to `upstream`; `cut()` aborts them all and refuses new ones until `restore()`."""

    def __init__(self, runner: LoopThread, upstream: tuple[str, int] | str) -> None:
        super().__init__(runner)
        self._upstream = upstream  # (host, port), or the path of a unix socket
        self.is_cut = False

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if isinstance(self._upstream, str):
            return await asyncio.open_unix_connection(self._upstream)
        return await asyncio.open_connection(*self._upstream)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await self._connect()
        except OSError:
            return
        self._transports.add(up_writer.transport)
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            self._transports.discard(up_writer.transport)
            up_writer.transport.abort()

    def cut(self) -> None:
        """Every connection through the proxy is aborted (RST), and new ones are refused."""
        self.is_cut = True
        self.close()

    def restore(self) -> None:
        """Listen again on the same port."""
        self.start()
        self.is_cut = False


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    while data := await source.read(65536):
        sink.write(data)
        await sink.drain()
    with contextlib.suppress(OSError):
        sink.write_eof()


class Blackhole(_Listener):
    """Accepts connections and reads whatever they send, but never answers."""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass


class FakeVendor:
    """Hunter's verifier and an OIDC provider's discovery on one aiohttp app; Hunter answers can be held.

    `hold()` makes every Hunter call wait (counted in `waiting`, its email in `waiting_emails`) until
    `release()`; a held call the client gave up on is answered into the void when released. The OIDC
    provider `/oidc` publishes a token endpoint at `token_endpoint` (a Blackhole: the exchange hangs).
    """

    def __init__(self, runner: LoopThread, token_endpoint: str) -> None:
        self._runner = runner
        self._token_endpoint = token_endpoint
        self._gate: asyncio.Event | None = None
        self._site_runner: web.AppRunner | None = None
        self.port = 0
        self.waiting = 0
        self.waiting_emails: set[str] = set()  # whose check is being held right now
        self.hunter_calls = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def oidc_issuer(self) -> str:
        return f"{self.url}/oidc"

    async def _hunter(self, request: web.Request) -> web.Response:
        self.hunter_calls += 1
        assert self._gate is not None
        email = request.query.get("email", "")
        self.waiting += 1
        self.waiting_emails.add(email)
        try:
            await self._gate.wait()
        finally:
            self.waiting -= 1
            self.waiting_emails.discard(email)
        return web.json_response(
            {"data": {"status": "valid", "score": 95, "email": request.query.get("email")}}
        )

    async def _discovery(self, _: web.Request) -> web.Response:
        issuer = self.oidc_issuer
        return web.json_response(
            {
                "issuer": issuer,
                "authorization_endpoint": f"{issuer}/authorize",
                "token_endpoint": self._token_endpoint,
                "jwks_uri": f"{issuer}/jwks",
                "id_token_signing_alg_values_supported": ["RS256"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic"],
            }
        )

    async def _jwks(self, _: web.Request) -> web.Response:
        return web.json_response({"keys": []})

    async def _start(self) -> None:
        self._gate = asyncio.Event()
        self._gate.set()
        app = web.Application()
        app.router.add_get("/v2/email-verifier", self._hunter)
        app.router.add_get("/oidc/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/oidc/jwks", self._jwks)
        self._site_runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._site_runner.setup()
        site = web.TCPSite(self._site_runner, HOST, 0)
        await site.start()
        self.port = int(self._site_runner.addresses[0][1])

    def start(self) -> None:
        self._runner.call(self._start())

    async def _set(self, held: bool) -> None:
        assert self._gate is not None
        if held:
            self._gate.clear()
        else:
            self._gate.set()

    def hold(self) -> None:
        self._runner.call(self._set(True))

    def release(self) -> None:
        self._runner.call(self._set(False))

    def close(self) -> None:
        if self._site_runner is not None:
            self.release()
            self._runner.call(self._site_runner.cleanup())


def bounded_client(base_url: str | None = None, *, seconds: float) -> aiohttp.ClientSession:
    """A client whose every request must be answered within `seconds` (else TimeoutError), read whole."""
    return aiohttp.ClientSession(
        base_url=base_url,
        response_class=_ReadResponse,
        timeout=aiohttp.ClientTimeout(total=seconds),
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
    )


def wait_until(predicate: Any, *, seconds: float, poll: float = 0.05, what: str = "condition") -> Any:
    """Poll `predicate()` (sync) until it returns something truthy; fail with `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {seconds:.1f} s")
        time.sleep(poll)


async def eventually(predicate: Any, *, seconds: float, poll: float = 0.1, what: str = "condition") -> Any:
    """`wait_until` for async tests: `predicate()` may return an awaitable."""
    deadline = time.monotonic() + seconds
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {seconds:.1f} s")
        await asyncio.sleep(poll)
