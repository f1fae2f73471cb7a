"""Shared fixtures: real servers (session scope where starting is slow) and test clients.

Any test that uses a server fixture is marked `slow` automatically, so `-m 'not slow'` is the
quick run. When a test fails, the tail of every running server's and agent's logs is attached
to its report.
"""

from __future__ import annotations

import atexit
import itertools
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from component.store.memory import MemoryStore
from tests.harness import process
from tests.harness.ejabberd import EjabberdServer
from tests.harness.kamailio import KamailioServer
from tests.harness.pjsip import PjsipAgent
from tests.harness.ports import free_port
from tests.harness.prosody import ProsodyServer
from tests.harness.xmppclient import XmppClient
from tests.harness.xmppserver import XmppServer

SERVER_FIXTURES = frozenset(
    {
        "prosody",
        "ejabberd",
        "xmpp_server",
        "kamailio",
        "kamailio_factory",
        "pjsip_agent",
        "pjsip_factory",
        "xmpp_client_factory",
    }
)

XMPP_PASSWORD = "password"
_user_numbers = itertools.count(1)


def pytest_configure(config: pytest.Config) -> None:
    """Make sure no server outlives the test run, even one cut short by `timeout` (SIGTERM)."""
    atexit.register(process.stop_all)
    if threading.current_thread() is threading.main_thread():
        # Servers run in sessions of their own, so they do not get the signal themselves;
        # as KeyboardInterrupt it unwinds pytest and the fixtures' teardown stops them.
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that starts real servers as slow."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the running servers' log tails to a failing test's report."""
    outcome: Any = yield
    report = outcome.get_result()
    if report.failed:
        for source in process.RUNNING:
            report.sections.append((f"{source.name} log", source.log_tail()))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line with the wall time of each kind of server start, when any was started."""
    if not process.TIMINGS:
        return
    by_name: dict[str, list[float]] = {}
    for name, seconds in process.TIMINGS:
        by_name.setdefault(name, []).append(seconds)
    parts = [f"{name} {max(times):.2f}s max/{len(times)} starts" for name, times in by_name.items()]
    terminalreporter.write_line("server start times: " + ", ".join(parts))


def _started(server: XmppServer) -> Iterator[XmppServer]:
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def prosody() -> Iterator[XmppServer]:
    """A Prosody for the whole session (component port, MUC, plaintext c2s)."""
    yield from _started(ProsodyServer())


@pytest.fixture(scope="session")
def ejabberd() -> Iterator[XmppServer]:
    """An ejabberd for the whole session: it takes seconds to start, so only one."""
    yield from _started(EjabberdServer())


@pytest.fixture(scope="session", params=["prosody", "ejabberd"])
def xmpp_server(request: pytest.FixtureRequest) -> XmppServer:
    """Each XMPP server in turn: tests using this run once per server."""
    server: XmppServer = request.getfixturevalue(request.param)
    return server


@pytest.fixture(autouse=True)
def _xmpp_server_alive(request: pytest.FixtureRequest) -> Iterator[None]:
    """Revive a session's XMPP server that an earlier test crashed; blame the test that did.

    A crash (ejabberd 23.01 segfaults on some hostile stanzas) must fail the test that caused
    it, not every later test that shares the session's server.
    """
    names = [n for n in ("xmpp_server", "prosody", "ejabberd") if n in request.fixturenames]
    servers: list[XmppServer] = [request.getfixturevalue(n) for n in names]
    for server in servers:
        server.ensure_running()
    yield
    for server in servers:
        proc = server.process.proc
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{server.name} died during this test (exit status {proc.returncode})")


@pytest.fixture
async def xmpp_client_factory(
    xmpp_server: XmppServer,
) -> AsyncIterator[Callable[[str], Awaitable[XmppClient]]]:
    """Make a fresh user (name prefix + a number), register it in-band, log it in.

    The clients are disconnected after the test; the accounts stay.
    """
    clients: list[XmppClient] = []

    async def make(prefix: str) -> XmppClient:
        user = f"{prefix}{next(_user_numbers)}"
        client = XmppClient(xmpp_server.jid(user), XMPP_PASSWORD, register=True)
        clients.append(client)
        await client.start(xmpp_server.c2s_port)
        return client

    yield make
    for client in clients:
        await client.stop()


@pytest.fixture
def kamailio_factory() -> Iterator[Callable[..., KamailioServer]]:
    """Start a Kamailio per call: `kamailio_factory(gateway_port, presence=True, ...)`."""
    servers: list[KamailioServer] = []

    def make(gateway_port: int | None = None, **modes: Any) -> KamailioServer:
        server = KamailioServer(gateway_port or free_port(), **modes)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def kamailio(kamailio_factory: Callable[..., KamailioServer]) -> KamailioServer:
    """A plain Kamailio (registrar + gateway route) for one test; it starts in milliseconds."""
    return kamailio_factory()


@pytest.fixture
async def pjsip_factory() -> AsyncIterator[Callable[[], Awaitable[PjsipAgent]]]:
    """Start PJSIP agent processes (8 accounts each at most); all closed after the test."""
    agents: list[PjsipAgent] = []

    async def make() -> PjsipAgent:
        agent = await PjsipAgent.start()
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        await agent.close()


@pytest.fixture
async def pjsip_agent(pjsip_factory: Callable[[], Awaitable[PjsipAgent]]) -> PjsipAgent:
    """One PJSIP agent process for a test."""
    return await pjsip_factory()


@pytest.fixture
def memory_store() -> MemoryStore:
    """An empty in-memory store port for core tests; ``tests/test_store.py`` holds it to the
    real store's semantics."""
    return MemoryStore()
