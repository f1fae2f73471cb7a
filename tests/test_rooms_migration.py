"""Revision 0002 (room passwords) on SQLite and PostgreSQL: seats stored before it survive the
upgrade without a password, and the downgrade keeps the seats and drops only the passwords."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool

from component.rooms.ports import StoredMemberships
from component.store import Store, migrate
from component.store.migrate import engine_url
from component.values import Membership
from tests.test_store import scratch_postgres_database

ROOM = "room@conference.xmpp.test"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'rooms.db'}"
        return
    with scratch_postgres_database("sipxmpp_rooms") as pg:
        yield pg


def _sql(url: str, statement: str) -> list[tuple[object, ...]]:
    engine = create_engine(engine_url(url), poolclass=NullPool)
    try:
        with engine.begin() as connection:
            result = connection.execute(text(statement))
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


def _columns(url: str) -> set[str]:
    engine = create_engine(engine_url(url), poolclass=NullPool)
    try:
        return {column["name"] for column in inspect(engine).get_columns("room_membership")}
    finally:
        engine.dispose()


async def test_room_password_revision_up_and_down(url: str) -> None:
    migrate.upgrade(url, "0001")
    assert "password" not in _columns(url)
    _sql(
        url,
        "INSERT INTO room_membership (sip_aor, room_jid, nick, state) "
        f"VALUES ('sip:alice@sip.test', '{ROOM}', 'alice', 'joined')",
    )
    migrate.upgrade(url)
    assert migrate.current_revision(url) == migrate.head_revision()
    store = await Store.open(url)
    try:
        # Seats stored before 0003 have no owner instance: the first instance adopts them.
        assert (await store.take_over(None, store.instance, 0.0)).memberships == 1
        seats = StoredMemberships(store)
        assert await seats.list_memberships() == [Membership("sip:alice@sip.test", ROOM, "alice")]
        await seats.save_membership(Membership("sip:bob@sip.test", ROOM, "bob", "s3cret"))
        assert Membership("sip:bob@sip.test", ROOM, "bob", "s3cret") in (
            await seats.list_memberships()
        )
    finally:
        await store.close()
    migrate.downgrade(url, "0001")
    assert "password" not in _columns(url)
    rows = _sql(url, "SELECT sip_aor, nick FROM room_membership ORDER BY sip_aor")
    assert rows == [("sip:alice@sip.test", "alice"), ("sip:bob@sip.test", "bob")]
