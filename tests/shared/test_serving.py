"""The graceful stop (shared/serving.py) on a real listening socket: not ready at once, new connections
refused, open ones served and told to close, idle ones kept through the drain, the backlog served, and
requests in flight finished."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from services.auth.settings import AuthSettings
from services.referral.settings import ReferralSettings
from shared.access import public
from shared.config import SettingsError, load_settings
from shared.serving import GracefulServer, ListenError, _drop_new_connections, listen
from shared.tokens import TokenVerifier
from shared.web import setup_common
from tests.helpers import KeptAliveConnection

HOST = "127.0.0.1"


@dataclass
class Served:
    server: GracefulServer
    task: asyncio.Task[None]
    release: asyncio.Event  # lets /slow answer
    slow_started: asyncio.Event
    connections: list[KeptAliveConnection]

    @property
    def port(self) -> int:
        return self.server.port

    async def connect(self) -> KeptAliveConnection:
        connection = await KeptAliveConnection.open(HOST, self.port)
        self.connections.append(connection)
        return connection

    async def finished(self, timeout: float) -> float:
        """Seconds until `serve()` returns (fails the test if it does not within `timeout`)."""
        started = time.monotonic()
        await asyncio.wait_for(asyncio.shield(self.task), timeout)
        return time.monotonic() - started


Start = Callable[..., Awaitable[Served]]
NO_USERS = web.AppKey("no_users", TokenVerifier)  # every route here is public


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Serve a small app (the shared middleware, probes, /hello and /slow) on a port of the kernel's pick."""
    running: list[Served] = []

    async def start(*, drain: float, shutdown_timeout: float = 5.0) -> Served:
        app = web.Application()
        setup_common(app, CollectorRegistry(), user_verifier=NO_USERS)
        release, slow_started = asyncio.Event(), asyncio.Event()

        @public
        async def hello(_: web.Request) -> web.Response:
            return web.json_response({"hello": "world"})

        @public
        async def slow(_: web.Request) -> web.Response:
            slow_started.set()
            await release.wait()
            return web.json_response({"slow": "done"})

        app.router.add_get("/hello", hello)
        app.router.add_get("/slow", slow)
        server = GracefulServer(app, host=HOST, port=0, drain=drain, shutdown_timeout=shutdown_timeout)
        task = asyncio.create_task(server.serve())
        await asyncio.wait_for(server.listening.wait(), 10)
        served = Served(server, task, release, slow_started, [])
        running.append(served)
        return served

    yield start
    for served in running:
        served.release.set()
        served.server.stop()
        for connection in served.connections:
            await connection.close()
        await asyncio.wait_for(served.task, 10)


def refused(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(2)
        try:
            probe.connect((HOST, port))
        except ConnectionRefusedError:
            return True
    return False


async def test_at_the_stop_it_is_not_ready_refuses_new_connections_and_closes_each_after_its_answer(
    start: Start,
) -> None:
    served = await start(drain=5)
    kept = await served.connect()
    before = await kept.request("GET", "/readyz")
    assert before.status == 200 and not before.closes, before

    served.server.stop()

    assert refused(served.port)
    answer = await kept.request("GET", "/readyz")
    assert answer.status == 503, answer
    assert json.loads(answer.body)["status"] == "stopping"
    assert answer.closes, answer.headers
    assert await kept.closed_by_peer(2)
    # Its last connection gone, the drain ends at once: no waiting out the 5 s.
    assert await served.finished(3) < 2


async def test_an_idle_connection_is_kept_through_the_drain_and_answered_once_more(start: Start) -> None:
    served = await start(drain=5)
    kept = await served.connect()
    assert (await kept.request("GET", "/hello")).status == 200

    served.server.stop()

    # A client may be sending on its idle connection at this very moment: it is not closed under it.
    assert not await kept.closed_by_peer(1.0)
    answer = await kept.request("GET", "/hello")
    assert answer.status == 200 and answer.closes, answer
    assert json.loads(answer.body) == {"hello": "world"}
    assert await kept.closed_by_peer(2)
    assert await served.finished(3) < 2


async def test_after_the_drain_idle_connections_close_and_requests_in_flight_finish(start: Start) -> None:
    served = await start(drain=0.5, shutdown_timeout=10)
    idle = await served.connect()
    assert (await idle.request("GET", "/hello")).status == 200
    busy = await served.connect()
    await busy.send("GET", "/slow")
    await asyncio.wait_for(served.slow_started.wait(), 5)

    served.server.stop()

    assert await idle.closed_by_peer(3), "the idle connection outlived the drain"
    assert not served.task.done(), "stopped with a request in flight"
    await asyncio.sleep(0.5)
    served.release.set()
    answer = await busy.answer()
    assert answer.status == 200 and answer.closes, answer
    assert json.loads(answer.body) == {"slow": "done"}
    await served.finished(5)


async def test_connections_waiting_in_the_backlog_at_the_stop_are_served_not_reset(start: Start) -> None:
    """The kernel completes a connection before the process accepts it; closing the listener with such
    connections still queued would reset them after their request was sent (a gateway does not retry
    a POST then). The stop accepts them first."""
    served = await start(drain=5)
    port = served.port
    count = 8
    answers: list[bytes | BaseException] = []
    connected = threading.Barrier(count + 1)

    def client() -> None:
        try:
            with socket.create_connection((HOST, port), timeout=10) as conn:
                conn.sendall(f"GET /hello HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
                connected.wait(10)
                received = b""
                while chunk := conn.recv(65536):
                    received += chunk
                answers.append(received)
        except OSError as error:
            answers.append(error)

    def stop_with_connections_queued() -> None:
        # Runs on the event loop, blocking it: the connections complete in the kernel meanwhile, and
        # no loop turn can accept them before the stop.
        connected.wait(10)
        served.server.stop()

    threads = [threading.Thread(target=client) for _ in range(count)]
    for thread in threads:
        thread.start()
    asyncio.get_running_loop().call_soon(stop_with_connections_queued)
    await asyncio.to_thread(lambda: [thread.join(15) for thread in threads])

    assert len(answers) == count
    for received in answers:
        assert isinstance(received, bytes), repr(received)
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), received
        assert b"\r\nConnection: close" in head, head
        assert json.loads(body) == {"hello": "world"}
    await served.finished(5)


async def test_a_port_in_use_is_a_listen_error() -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        with pytest.raises(ListenError, match=r"cannot listen on 127\.0\.0\.1"):
            listen(HOST, taken.getsockname()[1])


@pytest.mark.parametrize(("settings", "prefix"), [(AuthSettings, "AUTH_"), (ReferralSettings, "REFERRAL_")])
@pytest.mark.parametrize(("name", "value"), [("SHUTDOWN_DRAIN", "-1"), ("SHUTDOWN_TIMEOUT", "0")])
def test_shutdown_settings_are_bounded(settings: type, prefix: str, name: str, value: str) -> None:
    environ = {
        "DATABASE_URL": "postgresql://db/x",
        "REDIS_URL": "redis://r",
        "AUTH_ENV": "dev",
        f"{prefix}{name}": value,
    }
    with pytest.raises(SettingsError, match=f"{prefix}SHUTDOWN_DRAIN"):
        load_settings(settings, prefix, environ)


def test_at_the_stop_new_connections_never_complete_so_none_is_reset_after_its_request() -> None:
    """Between taking the backlog and closing the listener, a connection the kernel completed would be
    reset with its request already sent (a POST nginx may not retry): the filter set first drops the
    new SYN instead, and once the socket is closed the client is refused (retried anywhere)."""
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    before = socket.create_connection((HOST, port), timeout=1)
    try:
        _drop_new_connections(listener)
        with pytest.raises(TimeoutError):
            socket.create_connection((HOST, port), timeout=0.3)  # its SYN dropped: nothing completes
        accepted, _ = listener.accept()  # the one completed before is still there to serve
        accepted.close()
        listener.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((HOST, port), timeout=1)
    finally:
        before.close()
        listener.close()
