"""The health and metrics endpoints (DESIGN 9), served on ``metrics.listen`` by aiohttp.

``GET /health`` answers 200 with each part's state when every part is up, 503 naming the parts
that are down; ``GET /metrics`` is the Prometheus text exposition of the gateway's figures
(:mod:`component.http.metrics`), read at each scrape, on a registry of the gateway's own (never
prometheus-client's global one, so two gateways in one process do not share gauges).
The server runs on the gateway's event loop; it reads the health state and changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from component.admin.model import StatsSource
from component.http.metrics import GatewayMetrics
from component.logs import get_logger
from component.ports import Part

log = get_logger("component.http.status")


class HealthState(Protocol):
    """What the endpoints read of the health state (``component.runtime.health.Health``)."""

    def states(self) -> Mapping[Part, bool]:
        """Each part and whether it is up."""
        ...

    def detail(self, part: Part) -> str:
        """What was said when ``part`` last changed state."""
        ...


def health_body(health: HealthState) -> tuple[int, dict[str, object]]:
    """The status and JSON body of ``GET /health``: 200 when all parts are up, else 503."""
    states = health.states()
    down = [str(part) for part, up in states.items() if not up]
    parts = {
        str(part): {"state": "up" if up else "down", "detail": health.detail(part)}
        for part, up in states.items()
    }
    return (503 if down else 200), {
        "status": "down" if down else "up",
        "down": down,
        "parts": parts,
    }


class StatusServer:
    """``/health`` and ``/metrics`` on ``host:port`` (port 0: any free one, see :attr:`port`)."""

    def __init__(
        self,
        health: HealthState,
        metrics: GatewayMetrics,
        *,
        host: str,
        port: int,
        readings: StatsSource | None = None,
    ) -> None:
        self.health = health
        self.metrics = metrics
        self.readings = readings
        self.host = host
        self._port = port
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        self._site: web.TCPSite | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one the kernel chose when 0 was asked)."""
        for address in self._runner.addresses if self._site is not None else ():
            return int(address[1])
        return self._port

    async def start(self) -> None:
        """Listen; raises OSError when the address cannot be bound."""
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self._port)
        await self._site.start()
        log.info("status_server_started", host=self.host, port=self.port)

    async def close(self) -> None:
        """Stop listening and close open connections."""
        await self._runner.cleanup()
        self._site = None

    async def _health(self, _request: web.Request) -> web.Response:
        status, body = health_body(self.health)
        return web.json_response(body, status=status)

    async def _metrics(self, _request: web.Request) -> web.Response:
        stats = None if self.readings is None else await self.readings.snapshot()
        return web.Response(
            body=self.metrics.exposition(stats), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


__all__ = ["GatewayMetrics", "HealthState", "StatusServer", "health_body"]
