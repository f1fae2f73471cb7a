"""Running the real gateway in the test's event loop, against the harness's servers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from component.app import Gateway
from component.runtime.health import Health
from component.settings import Settings
from component.store import upgrade
from component.store.store import Store
from tests.harness.kamailio import KamailioServer
from tests.harness.ports import free_port
from tests.harness.values import COMPONENT_DOMAIN, COMPONENT_SECRET, JDOMAIN, LOOPBACK, SIP_DOMAIN


def gateway_settings(
    *, xmpp_port: int, sip_port: int, proxy: str, db_url: str, **sections: dict[str, Any]
) -> Settings:
    """Settings of DESIGN 9 with the test's ports; extra sections override per key."""
    values: dict[str, dict[str, Any]] = {
        "xmpp": {
            "component": COMPONENT_DOMAIN,
            "host": LOOPBACK,
            "port": xmpp_port,
            "secret": COMPONENT_SECRET,
        },
        "sip": {
            "listen": [f"udp:{LOOPBACK}:{sip_port}", f"tcp:{LOOPBACK}:{sip_port}"],
            "domain": SIP_DOMAIN,
            "jdomain": JDOMAIN,
            "proxy": proxy,
        },
        "database": {"url": db_url},
        "timers": {"sleep_time": 1.0, "delay_time": 30.0},
        # The per-source rate limit has tests of its own; bursts sent on purpose here must
        # not turn into refusals.
        "limits": {
            "sip_rate": 100000.0,
            "sip_burst": 100000,
            "xmpp_rate": 100000.0,
            "xmpp_burst": 100000,
        },
    }
    for name, overrides in sections.items():
        values.setdefault(name, {}).update(overrides)
    return Settings.model_validate(values)


@dataclass
class RunningGateway:
    """A gateway task plus what it was built from, so tests can stop and start it again."""

    settings: Settings
    gateway: Gateway | None = None
    store: Store | None = None
    health: Health | None = None
    task: asyncio.Task[None] | None = None
    history: list[Gateway] = field(default_factory=list)

    async def start(self, timeout: float = 20.0) -> Gateway:
        """Open the store, run the gateway and wait for its XMPP link."""
        self.health = Health()
        self.store = await Store.open(self.settings.database.url, health=self.health)
        self.gateway = Gateway(self.settings, self.store, self.health)
        self.history.append(self.gateway)
        self.task = asyncio.create_task(self.gateway.run())
        await wait_until(lambda: self.gateway is not None and self.gateway.xmpp.connected, timeout)
        return self.gateway

    async def stop(self) -> None:
        """SIGTERM path: stop, drain, close."""
        if self.gateway is not None and self.task is not None:
            self.gateway.stop()
            await asyncio.wait_for(self.task, 30)
        if self.store is not None:
            await self.store.close()
        self.gateway = self.task = self.store = None


async def wait_until(predicate: Any, timeout: float, step: float = 0.05) -> None:
    """Poll ``predicate`` until true; fail with a clear message after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(step)


def prepared_db(tmp_path: Path) -> str:
    """A migrated SQLite store in the test's temp dir."""
    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    upgrade(url)
    return url


@contextlib.asynccontextmanager
async def gateway_behind_kamailio(
    tmp_path: Path,
    xmpp_port: int,
    kamailio_factory: Callable[..., KamailioServer],
    **sections: dict[str, Any],
) -> AsyncIterator[tuple[RunningGateway, KamailioServer]]:
    """Kamailio in front of a running gateway whose component connects to ``xmpp_port``."""
    sip_port = free_port()
    kamailio = kamailio_factory(sip_port)
    settings = gateway_settings(
        xmpp_port=xmpp_port,
        sip_port=sip_port,
        proxy=kamailio.uri,
        db_url=prepared_db(tmp_path),
        **sections,
    )
    running = RunningGateway(settings)
    await running.start()
    try:
        yield running, kamailio
    finally:
        await running.stop()


def component_jid(sip_uri: str) -> str:
    """The component JID of a home SIP user (DESIGN 3.1)."""
    user = sip_uri.split(":", 1)[1].split("@", 1)[0]
    return f"{user}@{COMPONENT_DOMAIN}"
