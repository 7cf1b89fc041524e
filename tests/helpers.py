"""Small helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as email_policy
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import redis
from aiohttp.test_utils import TestClient

from shared.appkeys import DATABASE

PROBLEM_KEYS = {"type", "title", "status", "detail", "code"}


@dataclass
class User:
    """A signed-up user as the tests hold one: id, email and an access token."""

    id: str
    email: str
    access_token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


async def signup(client: TestClient[Any, Any], email: str, password: str = "correct horse") -> dict[str, Any]:
    """Sign up and return the 201 body."""
    response = await client.post("/api/v1/auth/signup", json={"email": email, "password": password})
    assert response.status == 201, await response.text()
    return dict(await response.json())


async def verify_email(client: TestClient[Any, Any], mailbox: Mailbox, email: str) -> dict[str, Any]:
    """Prove `email` the way its owner does: the token of the mail it received, posted back."""
    token = await mailbox.token(email, "verify-email")
    response = await client.post("/api/v1/auth/email/verify", json={"token": token})
    assert response.status == 200, await response.text()
    return dict(await response.json())


async def verified_signup(
    client: TestClient[Any, Any], mailbox: Mailbox, email: str, password: str = "correct horse"
) -> dict[str, Any]:
    """A signup whose address is then proven; the body of a login after it (tokens say verified)."""
    body = await signup(client, email, password)
    await verify_email(client, mailbox, email)
    granted = await password_login(client, email, password)
    assert granted.status == 200, await granted.text()
    return {"user": {**body["user"], "email_verified": True}, **dict(await granted.json())}


async def password_login(client: TestClient[Any, Any], email: str, password: str = "correct horse") -> Any:
    """POST the password grant; return the response."""
    return await client.post(
        "/api/v1/auth/token",
        data={"grant_type": "password", "username": email, "password": password},
    )


async def assert_problem(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is problem+json with the RFC 9457 keys and the given status (and code)."""
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == "application/problem+json", response.headers
    body = await response.json(content_type=None)
    assert set(body) >= PROBLEM_KEYS, body
    assert body["status"] == status
    assert isinstance(body["type"], str) and body["type"]
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str)
    assert re.fullmatch(r"[a-z][a-z0-9_]*", body["code"]), body["code"]
    if code is not None:
        assert body["code"] == code, body
    if body["code"] == "validation_failed":
        assert isinstance(body.get("errors"), dict) and body["errors"], body
        for field, messages in body["errors"].items():
            assert isinstance(field, str)
            assert isinstance(messages, list) and messages
            assert all(isinstance(m, str) for m in messages)
    assert response.headers.get("X-Request-ID")
    return dict(body)


async def prepared_per_connection(client: TestClient[Any, Any]) -> list[int]:
    """How many statements the server holds prepared for each open connection of a service's pool
    (all held at once, so each is asked once)."""
    database = client.app[DATABASE]
    async with contextlib.AsyncExitStack() as stack:
        held = [await stack.enter_async_context(database.connection()) for _ in range(database.size)]
        rows = [await conn.fetch_one("SELECT count(*) AS n FROM pg_prepared_statements") for conn in held]
    return [int(row["n"]) for row in rows if row is not None]


def with_database(url: str, name: str) -> str:
    """The same server URL, naming another database."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@contextlib.contextmanager
def fresh_database(server_url: str, prefix: str) -> Iterator[str]:
    """An empty database of its own on the server (`<prefix>_<random>`), dropped afterwards even if
    connections to it are left (FORCE)."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = psycopg2.connect(server_url, connect_timeout=5)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield with_database(server_url, name)
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def query(database_url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement on its own autocommit connection; the rows it returns, if any."""
    with contextlib.closing(psycopg2.connect(database_url, connect_timeout=5)) as conn:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall()) if cursor.description else []


def fresh_run_dir(parent: Path) -> Path:
    """`parent/<this process's pid>`, created, for one run's logs; the logs of earlier runs whose process
    is gone are deleted, but for the last three."""
    runs = [d for d in parent.glob("*") if d.name.isdigit() and not Path(f"/proc/{d.name}").exists()]
    for old in sorted(runs, key=lambda d: d.stat().st_mtime)[:-3]:
        shutil.rmtree(old, ignore_errors=True)
    current = parent / str(os.getpid())
    current.mkdir(parents=True, exist_ok=True)
    return current


def drop_redis_keys(redis_url: str, prefix: str) -> None:
    """Delete every key under `prefix` (a test's or a run's own namespace)."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def kill_tracking_connections(client: Any, prefix: str) -> int:
    """Close the Redis connections of near caches tracking keys under `prefix`; how many."""
    killed = 0
    for entry in client.execute_command("CLIENT", "LIST").splitlines():
        line = entry.decode() if isinstance(entry, bytes) else entry
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if fields.get("name", "").startswith(f"near-cache:{prefix}"):
            killed += int(client.execute_command("CLIENT", "KILL", "ID", fields["id"]))
    return killed


@dataclass
class Answer:
    """One HTTP answer read off a kept-alive connection."""

    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    @property
    def closes(self) -> bool:
        """The server said it closes the connection after this answer."""
        return self.headers.get("connection", "").lower() == "close"


class KeptAliveConnection:
    """A raw HTTP/1.1 client connection that stays open between requests (the way a gateway holds its
    upstream connections), so a test can see what a server does with an idle connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self._reader = reader
        self._writer = writer
        self._host = host

    @classmethod
    async def open(cls, host: str, port: int) -> KeptAliveConnection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, f"{host}:{port}")

    async def send(self, method: str, path: str) -> None:
        """Write one request without a body (its answer: `answer()`)."""
        head = f"{method} {path} HTTP/1.1\r\nHost: {self._host}\r\nContent-Length: 0\r\n\r\n"
        self._writer.write(head.encode("latin-1"))
        await self._writer.drain()

    async def answer(self, timeout: float = 5.0) -> Answer:
        """Read one answer (its body sized by Content-Length)."""
        async with asyncio.timeout(timeout):
            head = await self._reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
            headers = {}
            for line in lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await self._reader.readexactly(int(headers.get("content-length", "0")))
        return Answer(int(status_line.split()[1]), headers, body)

    async def request(self, method: str, path: str, timeout: float = 5.0) -> Answer:
        await self.send(method, path)
        return await self.answer(timeout)

    async def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """Whether the server closes the connection (EOF or reset) within `timeout` with nothing more sent."""
        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


class Mailbox:
    """The mails an SMTP server (`deploy.local.embedded.start_smtp`) kept as files, from now on: a
    mailbox made during a test sees only the mails that arrive after it was made."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._before = {path.name for path in directory.glob("*.eml")}
        self._read: dict[str, EmailMessage] = {}  # each file is parsed once

    def messages(self) -> list[EmailMessage]:
        """The new mails, oldest first."""
        for path in self.directory.glob("*.eml"):
            if path.name not in self._before and path.name not in self._read:
                parsed = BytesParser(_class=EmailMessage, policy=email_policy).parsebytes(path.read_bytes())
                self._read[path.name] = parsed
        return [self._read[name] for name in sorted(self._read)]

    def to(self, recipient: str) -> list[EmailMessage]:
        return [m for m in self.messages() if str(m["To"]).strip().lower() == recipient.strip().lower()]

    async def wait_for(self, recipient: str, count: int = 1, timeout: float = 10.0) -> list[EmailMessage]:
        """At least `count` new mails to `recipient` (fails after `timeout` seconds)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while len(found := self.to(recipient)) < count:
            assert asyncio.get_running_loop().time() < deadline, (
                f"{count} mail(s) to {recipient} expected within {timeout} s; got {len(found)}"
            )
            await asyncio.sleep(0.02)
        return found

    async def token(self, recipient: str, page: str, timeout: float = 10.0) -> str:
        """The token of the newest mail to `recipient` linking to `page` (verify-email, reset-password)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for message in reversed(self.to(recipient)):
                match = re.search(rf"/{re.escape(page)}#token=([A-Za-z0-9_-]+)", text_of(message))
                if match:
                    return match.group(1)
            assert asyncio.get_running_loop().time() < deadline, f"no {page} mail to {recipient}"
            await asyncio.sleep(0.02)


def text_of(message: EmailMessage) -> str:
    """The plain-text part of a mail."""
    part = message.get_body(preferencelist=("plain",))
    assert part is not None, "the mail has no plain-text part"
    return str(part.get_content())
