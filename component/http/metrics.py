"""The gateway's metrics (DESIGN 9): what is counted as it happens, and what is read on demand.

:class:`GatewayMetrics` is the ``Metrics`` port: messages each way by outcome, XMPP errors sent
by condition, and when the XMPP link last came up. Everything else is already counted or kept
by its owner and read at scrape time by :class:`Readings`: SIP responses by class and the
transactions in flight (the SIP endpoint), the SIP gate's refusals, the XMPP link's state and
reconnects, the loop lag, each alias transport's probed state (``TransportBoard``), and from
the store the queue, subscriptions and rooms.
One :class:`~component.admin.model.GatewayStats` serves both the Prometheus exposition (here,
with prometheus-client's metric families on a registry of the gateway's own) and the admin
statistics command.
"""

from __future__ import annotations

import enum
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from component.admin.model import GatewayStats, TransportInfo
from component.logs import get_logger
from component.ports import Clock, Outcome, Part, Way
from component.runtime.loop_lag import LoopLag
from component.store import StorePort, StoreUnavailable
from component.transports.board import TransportState, TransportView
from component.xmpp.stream import LinkState, LinkStats
from sipside.endpoint import Stats as EndpointStats

log = get_logger("component.http.metrics")

#: Gauge name and help of each part: 1 while it is up, 0 while it is down.
UP_GAUGES: dict[Part, tuple[str, str]] = {
    Part.DATABASE: ("sipxmpp_database_up", "Whether the database answers (1) or not (0)."),
    Part.XMPP: ("sipxmpp_xmpp_link_up", "Whether the XMPP component link is up (1) or not (0)."),
    Part.SIP: ("sipxmpp_sip_up", "Whether the SIP listeners are open (1) or not (0)."),
}


class HealthState(Protocol):
    """What the metrics read of the health state (``component.runtime.health.Health``)."""

    def states(self) -> Mapping[Part, bool]:
        """Each part and whether it is up."""
        ...


class GatewayMetrics:
    """The ``Metrics`` port, and the exposition of a :class:`GatewayStats` in the text format."""

    def __init__(self, health: HealthState, *, clock: Clock = time.time) -> None:
        self.health = health
        self.clock = clock
        self.messages: Counter[tuple[Way, Outcome]] = Counter()
        self.xmpp_errors: Counter[str] = Counter()
        self.link_up_since: float | None = None

    def message(self, way: Way, outcome: Outcome) -> None:
        """``Metrics``: one chat message went ``way`` with ``outcome``."""
        self.messages[way, outcome] += 1

    def xmpp_error(self, condition: str) -> None:
        """``Metrics``: one XMPP error stanza sent."""
        self.xmpp_errors[condition] += 1

    def link(self, up: bool, now: float) -> None:
        """``Metrics``: the XMPP link came up (or went down) at ``now``."""
        self.link_up_since = now if up else None

    def exposition(self, stats: GatewayStats | None = None) -> bytes:
        """The Prometheus text format: the parts' up gauges, and ``stats`` when given."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(self.health.states(), stats))
        return generate_latest(registry)


class SipCounts(Protocol):
    """What the metrics read of the SIP endpoint (``sipside.endpoint.Endpoint``)."""

    @property
    def stats(self) -> EndpointStats:
        """Its counters (responses sent by status among them)."""
        ...

    @property
    def transactions(self) -> tuple[int, int]:
        """Live (client, server) transactions."""
        ...


class LinkCounts(Protocol):
    """What the metrics read of the XMPP link (``component.xmpp.link.XmppLink``)."""

    @property
    def state(self) -> enum.Enum:
        """Where the link is in its life (``LinkState``)."""
        ...

    @property
    def stats(self) -> LinkStats:
        """Its counters (reconnects among them)."""
        ...


class Refusals(Protocol):
    """What the metrics read of the SIP gate (``component.sip.gate.SipGate``)."""

    @property
    def refusals(self) -> Mapping[str, int]:
        """Requests refused, by reason."""
        ...


class TransportStates(Protocol):
    """What the metrics read of the transports (``component.transports.board.TransportBoard``)."""

    def views(self) -> list[TransportView]:
        """Every alias transport's state, by domain."""
        ...


class Readings:
    """Reads every figure of :class:`GatewayStats` from its owner (implements ``StatsSource``)."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        *,
        store: StorePort,
        sip: SipCounts,
        link: LinkCounts,
        gate: Refusals,
        lag: LoopLag,
        transports: TransportStates,
        clock: Clock = time.time,
    ) -> None:
        self.metrics = metrics
        self.store = store
        self.sip = sip
        self.link = link
        self.gate = gate
        self.lag = lag
        self.transports = transports
        self.clock = clock

    async def snapshot(self) -> GatewayStats:
        """The figures now; without the store's while the database is down."""
        now = self.clock()
        metrics, sip, link = self.metrics, self.sip, self.link
        responses: Counter[str] = Counter()
        for status, count in sip.stats.by_status.items():
            responses[f"{status // 100}xx"] += count
        client, server = sip.transactions
        stats = GatewayStats(
            now=now,
            parts_up={str(part): up for part, up in metrics.health.states().items()},
            messages=dict(metrics.messages),
            xmpp_errors=dict(metrics.xmpp_errors),
            sip_responses=dict(responses),
            sip_refusals=dict(self.gate.refusals),
            link_state=str(link.state.value),
            link_up_since=metrics.link_up_since,
            link_reconnects=link.stats.reconnects,
            xmpp_rate_limited=link.stats.rate_limited,
            sip_client_transactions=client,
            sip_server_transactions=server,
            loop_lag=self.lag.last,
            transports=tuple(
                TransportInfo(view.domain, view.state.value, view.since, view.last_error)
                for view in self.transports.views()
            ),
        )
        try:
            return await self._with_store(stats, now)
        except StoreUnavailable:
            return replace(stats, store_read=False)

    async def _with_store(self, stats: GatewayStats, now: float) -> GatewayStats:
        store = self.store
        counts = await store.counts()
        oldest = await store.waiting_messages(1)
        seats = await store.memberships()
        return replace(
            stats,
            queue_depth=counts.queued + counts.inflight,
            queue_oldest_age=max(now - oldest[0].created_at, 0.0) if oldest else None,
            sip_watchers=counts.sip_watchers,
            xmpp_watchers=counts.xmpp_watchers,
            rooms=len({seat.room_jid for seat in seats}),
            occupants=len(seats),
        )


class _Families(Collector):
    """The metric families of one scrape."""

    def __init__(self, parts: Mapping[Part, bool], stats: GatewayStats | None) -> None:
        self.parts = parts
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        for part, (name, doc) in UP_GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=1.0 if self.parts.get(part) else 0.0)
        if self.stats is not None:
            yield from _stats_families(self.stats)


def _stats_families(stats: GatewayStats) -> Iterator[Metric]:
    messages = CounterMetricFamily(
        "sipxmpp_messages",
        "Chat messages by direction and outcome (queued: entered the retry queue).",
        labels=["direction", "outcome"],
    )
    for way in Way:
        for outcome in Outcome:
            messages.add_metric([str(way), str(outcome)], stats.message_count(way, outcome))
    yield messages
    yield _counter(
        "sipxmpp_xmpp_errors_sent",
        "XMPP error stanzas sent, by condition.",
        "condition",
        stats.xmpp_errors,
    )
    yield _counter(
        "sipxmpp_sip_responses_sent",
        "SIP responses sent, by class.",
        "class",
        stats.sip_responses,
    )
    yield _counter(
        "sipxmpp_sip_requests_refused",
        "SIP requests refused before any work (rate limit, busy, stopping, store down).",
        "reason",
        stats.sip_refusals,
    )
    yield CounterMetricFamily(
        "sipxmpp_xmpp_stanzas_rate_limited",
        "Inbound XMPP stanzas refused because their sender sent too many.",
        value=stats.xmpp_rate_limited,
    )
    transactions = GaugeMetricFamily(
        "sipxmpp_sip_transactions", "SIP transactions in flight.", labels=["kind"]
    )
    transactions.add_metric(["client"], stats.sip_client_transactions)
    transactions.add_metric(["server"], stats.sip_server_transactions)
    yield transactions
    link = GaugeMetricFamily(
        "sipxmpp_xmpp_link_state",
        "The XMPP link's state (1 for the current one).",
        labels=["state"],
    )
    for state in LinkState:
        link.add_metric([state.value], 1.0 if state.value == stats.link_state else 0.0)
    yield link
    yield CounterMetricFamily(
        "sipxmpp_xmpp_link_reconnects",
        "XMPP link reconnection attempts.",
        value=stats.link_reconnects,
    )
    if stats.link_up_since is not None:
        yield GaugeMetricFamily(
            "sipxmpp_xmpp_link_up_seconds",
            "How long the XMPP link has been up.",
            value=max(stats.now - stats.link_up_since, 0.0),
        )
    yield GaugeMetricFamily(
        "sipxmpp_event_loop_lag_seconds",
        "How late the last timer of the event loop fired.",
        value=stats.loop_lag,
    )
    transports = GaugeMetricFamily(
        "sipxmpp_transport_state",
        "Each alias transport's probed state (1 for the current one).",
        labels=["transport", "state"],
    )
    for transport in stats.transports:
        for probed in TransportState:
            transports.add_metric(
                [transport.domain, probed.value], 1.0 if transport.state == probed.value else 0.0
            )
    yield transports
    if stats.store_read:
        yield from _store_families(stats)


def _store_families(stats: GatewayStats) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "sipxmpp_queue_depth", "Messages waiting in the retry queue.", value=stats.queue_depth
    )
    if stats.queue_oldest_age is not None:
        yield GaugeMetricFamily(
            "sipxmpp_queue_oldest_age_seconds",
            "Age of the oldest message waiting.",
            value=stats.queue_oldest_age,
        )
    subscriptions = GaugeMetricFamily(
        "sipxmpp_subscriptions",
        "Presence subscriptions, by who watches whom.",
        labels=["direction"],
    )
    subscriptions.add_metric(["sip_watches_xmpp"], stats.sip_watchers)
    subscriptions.add_metric(["xmpp_watches_sip"], stats.xmpp_watchers)
    yield subscriptions
    yield GaugeMetricFamily("sipxmpp_rooms", "Chat rooms SIP users are in.", value=stats.rooms)
    yield GaugeMetricFamily(
        "sipxmpp_room_occupants", "SIP users' seats in chat rooms.", value=stats.occupants
    )


def _counter(name: str, doc: str, label: str, counts: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, count in sorted(counts.items()):
        family.add_metric([key], count)
    return family


__all__ = ["GatewayMetrics", "HealthState", "Readings"]
