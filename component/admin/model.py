"""The operator's values (DESIGN 9): the gateway's statistics, and the XEP-0004 forms and steps
of the admin commands, as plain frozen values the XMPP adapter turns into stanzas."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from component.ports import Outcome, Way


@dataclass(frozen=True, slots=True)
class TransportInfo:
    """One alias transport as last probed: ``up``, ``down`` or ``unknown`` (not probed yet),
    since when, and the last probe's error."""

    domain: str
    state: str
    since: float | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class GatewayStats:
    """Everything the metrics endpoint and the statistics command show, read at one time."""

    now: float
    parts_up: Mapping[str, bool] = field(default_factory=dict)
    store_read: bool = True  # False: the database was down, the store's figures are missing
    messages: Mapping[tuple[Way, Outcome], int] = field(default_factory=dict)
    xmpp_errors: Mapping[str, int] = field(default_factory=dict)
    sip_responses: Mapping[str, int] = field(default_factory=dict)  # "2xx" -> count
    sip_refusals: Mapping[str, int] = field(default_factory=dict)  # reason -> count
    queue_depth: int = 0
    queue_oldest_age: float | None = None
    sip_watchers: int = 0  # SIP users watching XMPP entities (DESIGN 5.2)
    xmpp_watchers: int = 0  # XMPP users watching SIP users (DESIGN 5.3)
    rooms: int = 0
    occupants: int = 0  # SIP users' seats
    transports: tuple[TransportInfo, ...] = ()
    link_state: str = "idle"
    link_up_since: float | None = None
    link_reconnects: int = 0
    xmpp_rate_limited: int = 0  # inbound stanzas refused: their sender sent too many
    sip_client_transactions: int = 0
    sip_server_transactions: int = 0
    loop_lag: float = 0.0

    def message_count(self, way: Way, outcome: Outcome) -> int:
        """How many messages went ``way`` with ``outcome``."""
        return self.messages.get((way, outcome), 0)


class StatsSource(Protocol):
    """Where the statistics come from (``component.http.readings.Readings``)."""

    async def snapshot(self) -> GatewayStats:
        """The statistics now (without the store's figures while the database is down)."""
        ...


class FieldType(enum.StrEnum):
    """The XEP-0004 3.3 field types the admin forms use."""

    FIXED = "fixed"
    TEXT_SINGLE = "text-single"
    TEXT_MULTI = "text-multi"
    LIST_SINGLE = "list-single"
    HIDDEN = "hidden"


@dataclass(frozen=True, slots=True)
class FormField:
    """One field of a form: ``options`` are (label, value) pairs of a list field."""

    var: str | None
    type: FieldType
    label: str | None = None
    values: tuple[str, ...] = ()
    options: tuple[tuple[str, str], ...] = ()
    required: bool = False


@dataclass(frozen=True, slots=True)
class Form:
    """A XEP-0004 data form: ``form`` to fill in, or ``result`` to read."""

    title: str
    fields: tuple[FormField, ...]
    instructions: str | None = None
    result: bool = False


@dataclass(frozen=True, slots=True)
class Ask:
    """The command needs this form filled in (XEP-0050 status executing)."""

    form: Form


@dataclass(frozen=True, slots=True)
class Done:
    """The command is done (XEP-0050 status completed), with a note and or a result form."""

    note: str | None = None
    form: Form | None = None


Step = Ask | Done


@dataclass(frozen=True, slots=True)
class CommandInfo:
    """One ad-hoc command: its node and its human name."""

    node: str
    name: str


class AdminCommands(Protocol):
    """What the XMPP adapter asks of the admin commands (``component.admin.commands``)."""

    def allowed(self, jid: str) -> bool:
        """Whether ``jid`` (any resource) may list and run the commands."""
        ...

    def commands(self) -> tuple[CommandInfo, ...]:
        """Every command, in the order to list them."""
        ...

    async def start(self, node: str, requester: str) -> Step:
        """Run command ``node`` for ``requester`` (allowed); raises ``Refusal``."""
        ...

    async def submit(self, node: str, requester: str, values: Mapping[str, list[str]]) -> Step:
        """Go on with the values of the form ``start`` asked for; raises ``Refusal``."""
        ...
