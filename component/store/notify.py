"""Notifications between gateway instances over PostgreSQL LISTEN/NOTIFY (DESIGN 9).

Each instance listens on a channel of its own and on one that all share. A NOTIFY payload is
at most 8000 bytes, so a longer text is cut into numbered pieces, sent in one transaction:
PostgreSQL delivers one transaction's notifications together and in order, and the listener
joins them again. Sending goes through the store (its pool and its error edge); listening
takes one dedicated connection, whose socket the event loop watches.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Callable

import psycopg2  # type: ignore[import-untyped]
import psycopg2.extensions  # type: ignore[import-untyped]
from psycopg2 import sql

from component.logs import get_logger

from .migrate import engine_url
from .port import StorePort

log = get_logger("component.store.notify")

BROADCAST = "sipxmpp_all"
"""The channel every instance listens on."""

_LIMIT = 7900  # bytes of one payload, the piece header included; PostgreSQL allows 7999
_RECONNECT = 1.0


def channel_of(instance: str) -> str:
    """The channel ``instance`` listens on: a hash, since a channel name is an identifier of at
    most 63 bytes and an instance name is anything."""
    return "sipxmpp_" + hashlib.sha256(instance.encode()).hexdigest()[:32]


def pieces(text: str, limit: int = _LIMIT) -> list[str]:
    """``text`` as payloads of at most ``limit`` bytes: itself when it fits, else pieces
    ``~id seq/total:part`` cut on character boundaries."""
    if len(text.encode()) <= limit and not text.startswith("~"):
        return [text]
    tag = secrets.token_hex(6)
    room = limit - 40  # the header: ~ + 12 hex + " " + two numbers up to 6 digits + "/" + ":"
    parts: list[str] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + room)
        while len(text[start:end].encode()) > room:
            end -= max(1, (end - start) // 8)
        parts.append(text[start:end])
        start = end
    return [f"~{tag} {n}/{len(parts)}:{part}" for n, part in enumerate(parts)]


class Joiner:
    """Puts pieces back together; whole payloads pass through."""

    def __init__(self) -> None:
        self._open: dict[str, list[str]] = {}

    def add(self, payload: str) -> str | None:
        """The whole text once its last piece came, None meanwhile."""
        if not payload.startswith("~"):
            return payload
        head, _, part = payload.partition(":")
        tag, _, counts = head[1:].partition(" ")
        seq, _, total = counts.partition("/")
        got = self._open.setdefault(tag, [])
        if int(seq) != len(got):  # a piece lost (never within one transaction): drop it all
            self._open.pop(tag, None)
            return None
        got.append(part)
        if len(got) < int(total):
            return None
        del self._open[tag]
        return "".join(got)


class PgBus:
    """Sends and receives texts between instances on one PostgreSQL database."""

    def __init__(self, store: StorePort, url: str, instance: str) -> None:
        self.store = store
        self._dsn = engine_url(url).set(drivername="postgresql").render_as_string(False)
        self.channels = (channel_of(instance), BROADCAST)
        self._conn: psycopg2.extensions.connection | None = None
        self._handler: Callable[[str], None] | None = None
        self._joiner = Joiner()
        self._lost: asyncio.Future[None] | None = None
        self._fd = -1

    @property
    def listening(self) -> bool:
        """The listening connection is up."""
        return self._conn is not None

    async def send(self, instance: str | None, texts: list[str]) -> None:
        """To ``instance``, or to every instance (``None``), together and in order. May raise
        ``StoreError``."""
        channel = BROADCAST if instance is None else channel_of(instance)
        await self.store.notify(channel, [p for text in texts for p in pieces(text)])

    async def listen(self, handler: Callable[[str], None]) -> None:
        """Until cancelled: hand each text sent to this instance (or to all) to ``handler``.
        The connection is made off the event loop, and made again after it breaks."""
        self._handler = handler
        loop = asyncio.get_running_loop()
        failures = 0
        try:
            while True:
                try:
                    conn = await loop.run_in_executor(None, self._open)
                except psycopg2.Error as exc:
                    failures += 1
                    (log.warning if failures == 1 else log.debug)(
                        "instance_listener_failed", reason=str(exc).strip(), failures=failures
                    )
                    await asyncio.sleep(_RECONNECT)
                    continue
                failures = 0
                self._conn, self._fd = conn, conn.fileno()
                self._lost = loop.create_future()
                loop.add_reader(self._fd, self._readable)
                log.info("instance_listener_up", channels=list(self.channels))
                await self._lost
                await asyncio.sleep(_RECONNECT)
        finally:
            self._drop()

    def _open(self) -> psycopg2.extensions.connection:
        conn = psycopg2.connect(self._dsn, connect_timeout=5)
        try:
            conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
            with conn.cursor() as cur:
                for channel in self.channels:
                    cur.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except psycopg2.Error:
            conn.close()
            raise
        return conn

    def _readable(self) -> None:
        conn = self._conn
        assert conn is not None and self._handler is not None
        try:
            conn.poll()
        except psycopg2.Error as exc:
            log.warning("instance_listener_lost", reason=str(exc).strip())
            self._drop()
            if self._lost is not None and not self._lost.done():
                self._lost.set_result(None)
            return
        while conn.notifies:
            text = self._joiner.add(conn.notifies.pop(0).payload)
            if text is not None:
                self._handler(text)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        # The fd as it was: a broken connection no longer tells it.
        asyncio.get_running_loop().remove_reader(self._fd)
        conn.close()
