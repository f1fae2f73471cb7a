"""The health state, the store's outage handling and the /health and /metrics endpoints.

The store tests lock a real SQLite file from a second connection (``BEGIN EXCLUSIVE``), as
another process would; the HTTP tests run the real aiohttp server on a free loopback port and
read it with aiohttp's client.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from component.http.status import GatewayMetrics, StatusServer, health_body
from component.ports import Part
from component.runtime.health import Health, watch_database
from component.store import StoreUnavailable, upgrade
from component.store.store import Store
from tests.harness.ports import free_port
from tests.harness.values import LOOPBACK

AOR = "sip:alice@sip.test"


def _all_up() -> Health:
    health = Health()
    for part in Part:
        health.report(part, True, "test")
    return health


# --- the health state --------------------------------------------------------------------------


def test_every_part_starts_down_and_all_up_needs_each() -> None:
    health = Health()
    assert not health.all_up
    assert set(health.states()) == set(Part)
    health.report(Part.DATABASE, True)
    health.report(Part.XMPP, True)
    assert not health.all_up
    health.report(Part.SIP, True)
    assert health.all_up


def test_only_changes_count() -> None:
    health = Health()
    health.report(Part.DATABASE, True, "opened")
    for _ in range(50):  # every failed call of an outage reports it; one change is recorded
        health.report(Part.DATABASE, False, "locked")
    health.report(Part.DATABASE, True, "answered a probe")
    assert health.changes == 3
    assert health.detail(Part.DATABASE) == "answered a probe"


class FakeProbed:
    def __init__(self, answers_after: int) -> None:
        self.down = True
        self.probes = 0
        self.answers_after = answers_after

    async def probe(self) -> bool:
        self.probes += 1
        if self.probes >= self.answers_after:
            self.down = False
        return not self.down


async def test_watch_probes_only_while_down() -> None:
    store = FakeProbed(answers_after=3)
    watch = asyncio.create_task(watch_database(store, interval=0.001))
    try:
        for _ in range(2000):
            if not store.down:
                break
            await asyncio.sleep(0.001)
        assert not store.down
        probes = store.probes
        for _ in range(20):
            await asyncio.sleep(0.001)
        assert store.probes == probes == 3  # up again: no more probes
    finally:
        watch.cancel()


# --- the store in an outage (SQLite locked by another connection) ------------------------------


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def locker(db_path: Path) -> Iterator[sqlite3.Connection]:
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        yield other
    finally:
        if other.in_transaction:
            other.execute("ROLLBACK")
        other.close()


async def test_a_locked_database_marks_the_store_down_until_a_probe_answers(
    db_path: Path, locker: sqlite3.Connection
) -> None:
    health = Health()
    store = await Store.open(f"sqlite:///{db_path}", health=health, busy_timeout=0.2)
    try:
        assert health.is_up(Part.DATABASE)
        assert await store.probe()
        locker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreUnavailable):
            await store.mark_user_seen(AOR, 1.0)
        assert store.down
        assert not health.is_up(Part.DATABASE)
        assert "locked" in health.detail(Part.DATABASE)
        # WAL lets a plain read through the lock: the probe asks for the write lock instead.
        assert not await store.probe()
        assert store.down
        locker.execute("ROLLBACK")
        # Still down until a probe: calls fail at once rather than each finding out.
        with pytest.raises(StoreUnavailable, match="waiting for it to answer"):
            await store.mark_user_seen(AOR, 2.0)
        assert await store.probe()
        assert not store.down
        assert health.is_up(Part.DATABASE)
        await store.mark_user_seen(AOR, 3.0)
        assert await store.user_seen_before(AOR)
        assert health.changes == 3  # up (opened), down, up: once each, not per call
    finally:
        await store.close()


async def test_calls_queued_behind_the_failing_one_fail_without_waiting_for_the_lock(
    db_path: Path, locker: sqlite3.Connection
) -> None:
    store = await Store.open(f"sqlite:///{db_path}", busy_timeout=0.3)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        calls = [store.mark_user_seen(f"sip:u{i}@sip.test", 1.0) for i in range(20)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) for r in results)
        # Only the first waited for the busy timeout; the others were refused on the worker.
        assert sum("waiting for it to answer" in str(r) for r in results) == 19
    finally:
        await store.close()


# --- the endpoints -----------------------------------------------------------------------------


def test_health_body_names_what_is_down() -> None:
    health = _all_up()
    assert health_body(health)[0] == 200
    health.report(Part.DATABASE, False, "connection refused")
    status, body = health_body(health)
    assert status == 503
    assert body["down"] == ["database"]
    assert body["parts"] == {
        "database": {"state": "down", "detail": "connection refused"},
        "xmpp": {"state": "up", "detail": "test"},
        "sip": {"state": "up", "detail": "test"},
    }


@pytest.fixture
async def served() -> AsyncIterator[tuple[Health, str]]:
    health = _all_up()
    server = StatusServer(health, GatewayMetrics(health), host=LOOPBACK, port=free_port())
    await server.start()
    try:
        yield health, f"http://{LOOPBACK}:{server.port}"
    finally:
        await server.close()


async def test_health_endpoint_follows_the_state(served: tuple[Health, str]) -> None:
    health, base = served
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{base}/health") as response:
            assert response.status == 200
            body = await response.json()
        assert body["status"] == "up" and body["down"] == []
        assert {name: p["state"] for name, p in body["parts"].items()} == {
            "database": "up",
            "xmpp": "up",
            "sip": "up",
        }
        health.report(Part.DATABASE, False, "server closed the connection")
        health.report(Part.XMPP, False, "component stream down")
        async with client.get(f"{base}/health") as response:
            assert response.status == 503
            body = await response.json()
        assert body["status"] == "down"
        assert body["down"] == ["database", "xmpp"]
        assert body["parts"]["database"]["detail"] == "server closed the connection"


async def test_metrics_endpoint_has_an_up_gauge_per_part(served: tuple[Health, str]) -> None:
    health, base = served
    health.report(Part.SIP, False, "closed")
    async with aiohttp.ClientSession() as client, client.get(f"{base}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values == {
        "sipxmpp_database_up": 1.0,
        "sipxmpp_xmpp_link_up": 1.0,
        "sipxmpp_sip_up": 0.0,
    }


def test_each_gateway_has_its_own_registry() -> None:
    first, second = _all_up(), Health()
    assert b"sipxmpp_database_up 1.0" in GatewayMetrics(first).exposition()
    assert b"sipxmpp_database_up 0.0" in GatewayMetrics(second).exposition()


async def test_unknown_paths_are_404(served: tuple[Health, str]) -> None:
    _, base = served
    async with aiohttp.ClientSession() as client, client.get(f"{base}/nothing") as response:
        assert response.status == 404
