"""The operator's ad-hoc commands (DESIGN 9): statistics, one SIP user, the queue, announcements.

Only the JIDs of ``admin.jids`` may list or run them; anyone else is refused ``forbidden``. The
commands see our values and ports only: the statistics source, the store, the retry queue and
the notices. XEP-0050 and XEP-0004 stanzas are the XMPP adapter's (``component.xmpp.adhoc``);
here a command is a first step (:meth:`AdminDesk.start`) and, for those that ask, a second one
with the submitted values (:meth:`AdminDesk.submit`).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Protocol

from component.addresses import AddressBook, HomeUser, bare_jid
from component.errors import forbidden, malformed, not_found
from component.logs import get_logger
from component.ports import Clock, Outcome, Way
from component.store import QueuedMessage, StorePort

from .model import (
    Ask,
    CommandInfo,
    Done,
    FieldType,
    Form,
    FormField,
    GatewayStats,
    StatsSource,
    Step,
)

log = get_logger("component.admin")

STATS = "stats"
USER = "user"
QUEUE = "queue"
ANNOUNCE = "announce"
COMMANDS = (
    CommandInfo(STATS, "Gateway statistics"),
    CommandInfo(USER, "A SIP user's subscriptions, rooms and queued messages"),
    CommandInfo(QUEUE, "Message queue (retry now, drop)"),
    CommandInfo(ANNOUNCE, "Announce to every SIP user online"),
)
QUEUE_SHOWN = 50  # entries the queue command lists, oldest first
RETRY, DROP = "retry", "drop"
DROPPED = "dropped by the gateway operator"


class QueueControl(Protocol):
    """The retry queue's operator actions (``component.messaging.retry.DurableQueue``)."""

    async def retry_now(self, message_id: int) -> bool:
        """Try the waiting message now; False if it waits no more."""
        ...

    async def drop(self, message_id: int, reason: str) -> bool:
        """Fail the waiting message and tell its sender ``reason``; False if it waits no more."""
        ...


class Notices(Protocol):
    """Notices to SIP users from ``sip.registrar`` (``MessageRouter.notice``)."""

    async def notice(self, aor: str, text: str) -> None:
        """Send ``text`` to ``aor``."""
        ...


class AdminDesk:
    """The admin commands (implements ``component.admin.model.AdminCommands``)."""

    def __init__(
        self,
        admins: Iterable[str],
        *,
        book: AddressBook,
        stats: StatsSource,
        store: StorePort,
        queue: QueueControl,
        notices: Notices,
        clock: Clock,
    ) -> None:
        self.admins = frozenset(bare_jid(jid).lower() for jid in admins)
        self.book = book
        self.stats = stats
        self.store = store
        self.queue = queue
        self.notices = notices
        self.clock = clock

    def allowed(self, jid: str) -> bool:
        """Whether ``jid`` is one of ``admin.jids`` (any resource)."""
        return bare_jid(jid).lower() in self.admins

    def commands(self) -> tuple[CommandInfo, ...]:
        """Every command, in the order they are listed."""
        return COMMANDS

    async def start(self, node: str, requester: str) -> Step:
        """The first step of command ``node``: a result, or the form it needs."""
        self._check(requester)
        log.info("admin_command_started", node=node, jid=requester)
        if node == STATS:
            return Done(form=stats_form(await self.stats.snapshot()))
        if node == USER:
            return Ask(_USER_FORM)
        if node == QUEUE:
            return await self._queue_form()
        if node == ANNOUNCE:
            return Ask(_ANNOUNCE_FORM)
        raise not_found(f"no command {node!r}")

    async def submit(self, node: str, requester: str, values: Mapping[str, list[str]]) -> Step:
        """The second step: the form's values in, the command's result out."""
        self._check(requester)
        if node == USER:
            return Done(form=await self._user(_one(values, "address")))
        if node == QUEUE:
            return await self._queue_action(_one(values, "message"), _one(values, "action"))
        if node == ANNOUNCE:
            return await self._announce("\n".join(values.get("body", [])).strip(), requester)
        raise malformed(f"command {node!r} takes no form")

    def _check(self, requester: str) -> None:
        if not self.allowed(requester):
            log.warning("admin_command_forbidden", jid=requester)
            raise forbidden("only the gateway's administrators may run its commands")

    # --- one SIP user ---------------------------------------------------------------------------

    async def _user(self, address: str) -> Form:
        aor = self._aor(address)
        target_jid = self.book.jid_for_sip_uri(aor)
        seen = await self.store.seen_user(aor)
        watching = [s for s in await self.store.sip_watcher_subscriptions() if s.watcher_aor == aor]
        watched = await self.store.xmpp_watcher_subscriptions(aor)
        seats = await self.store.memberships(sip_aor=aor)
        queued = [m for m in await self.store.waiting_messages() if aor in (m.sender, m.recipient)]
        now = self.clock()
        state = "never seen" if seen is None else "online" if seen.online else "offline"
        return Form(
            f"SIP user {aor}",
            (
                _text("address", "SIP address", aor),
                _text("jid", "XMPP address", target_jid),
                _text("state", "State", state),
                _multi(
                    "watching",
                    "Watches (SIP user -> XMPP)",
                    [f"{s.target_jid} ({s.state})" for s in watching],
                ),
                _multi(
                    "watched_by",
                    "Watched by (XMPP -> SIP user)",
                    [f"{s.watcher_jid} ({s.state})" for s in watched],
                ),
                _multi("rooms", "Rooms", [f"{m.room_jid} as {m.nick} ({m.state})" for m in seats]),
                _multi("queued", "Queued messages", [_entry(m, now) for m in queued]),
            ),
            result=True,
        )

    def _aor(self, address: str) -> str:
        text = address.strip()
        if not text:
            raise malformed("a SIP address is required")
        target = self.book.classify_request_uri(text if text.startswith("sip:") else f"sip:{text}")
        if not isinstance(target, HomeUser):
            raise malformed(f"{text} is not a user of the home SIP domain")
        return target.uri

    # --- the queue ------------------------------------------------------------------------------

    async def _queue_form(self) -> Step:
        waiting = await self.store.waiting_messages(QUEUE_SHOWN)
        if not waiting:
            return Done(note="The queue is empty.")
        now = self.clock()
        entries = tuple((_entry(m, now), str(m.id)) for m in waiting)
        return Ask(
            Form(
                "Message queue",
                (
                    FormField(
                        "message", FieldType.LIST_SINGLE, "Message", options=entries, required=True
                    ),
                    FormField(
                        "action",
                        FieldType.LIST_SINGLE,
                        "Action",
                        values=(RETRY,),
                        options=(("Retry now", RETRY), ("Drop (the sender is told)", DROP)),
                        required=True,
                    ),
                ),
                instructions=f"{len(waiting)} waiting, oldest first. Pick one and an action.",
            )
        )

    async def _queue_action(self, message: str, action: str) -> Step:
        try:
            message_id = int(message)
        except ValueError:
            raise malformed("pick a message of the list") from None
        if action == RETRY:
            done = await self.queue.retry_now(message_id)
        elif action == DROP:
            done = await self.queue.drop(message_id, DROPPED)
        else:
            raise malformed("the action is retry or drop")
        if not done:
            return Done(
                note=f"Message {message_id} waits no more (delivered, failed or in flight)."
            )
        log.info("admin_queue_action", action=action, message=message_id)
        verb = "retried" if action == RETRY else "dropped; its sender is told"
        return Done(note=f"Message {message_id} {verb}.")

    # --- announcements --------------------------------------------------------------------------

    async def _announce(self, body: str, requester: str) -> Step:
        if not body:
            raise malformed("the announcement is empty")
        users = await self.store.online_users()
        for user in users:
            await self.notices.notice(user.aor, body)
        log.info("admin_announcement_sent", jid=requester, users=len(users))
        return Done(note=f"Announcement sent to {len(users)} SIP users online.")


_USER_FORM = Form(
    "A SIP user",
    (FormField("address", FieldType.TEXT_SINGLE, "SIP address", required=True),),
    instructions="The SIP address of the user (alice@sip.example.org).",
)
_ANNOUNCE_FORM = Form(
    "Announcement",
    (FormField("body", FieldType.TEXT_MULTI, "Text", required=True),),
    instructions="Sent as a notice to every SIP user the gateway knows online.",
)
_WAYS = ((Way.TO_XMPP, "Messages SIP -> XMPP"), (Way.TO_SIP, "Messages XMPP -> SIP"))


def stats_form(stats: GatewayStats) -> Form:
    """The statistics command's result."""
    fields = [
        _text(
            f"messages_{way}",
            label,
            ", ".join(f"{o} {stats.message_count(way, o)}" for o in Outcome),
        )
        for way, label in _WAYS
    ]
    oldest = stats.queue_oldest_age
    link = stats.link_state
    if stats.link_up_since is not None:
        link += f" for {_duration(stats.now - stats.link_up_since)}"
    fields += [
        _text("xmpp_errors", "XMPP errors sent", _tally(stats.xmpp_errors)),
        _text("sip_refusals", "SIP requests refused", _tally(stats.sip_refusals)),
        _text("sip_responses", "SIP responses sent", _tally(stats.sip_responses)),
        _text(
            "queue",
            "Queue",
            f"{stats.queue_depth} waiting"
            + ("" if oldest is None else f", oldest {_duration(oldest)}"),
        ),
        _text(
            "subscriptions",
            "Subscriptions",
            f"SIP -> XMPP {stats.sip_watchers}, XMPP -> SIP {stats.xmpp_watchers}",
        ),
        _text("rooms", "Rooms", f"{stats.rooms} rooms, {stats.occupants} SIP users seated"),
        _multi(
            "transports",
            "Transports",
            [
                f"{t.domain} {t.state}"
                + ("" if t.since is None else f" since {_when(t.since)}")
                + ("" if not t.detail else f" ({t.detail})")
                for t in stats.transports
            ],
        ),
        _text("xmpp_link", "XMPP link", f"{link}, {stats.link_reconnects} reconnects"),
    ]
    return Form("Gateway statistics", tuple(fields), result=True)


def _entry(message: QueuedMessage, now: float) -> str:
    """One queued message in a line: its id, age, sender, recipient and last error."""
    error = f" ({message.last_error})" if message.last_error else ""
    return (
        f"#{message.id} {_duration(now - message.created_at)} old: "
        f"{message.sender} -> {message.recipient}, {message.attempts} tries{error}"
    )


def _one(values: Mapping[str, list[str]], var: str) -> str:
    found = values.get(var) or []
    if len(found) != 1:
        raise malformed(f"the form needs one value for {var}")
    return found[0]


def _text(var: str, label: str, value: str) -> FormField:
    return FormField(var, FieldType.TEXT_SINGLE, label, values=(value,))


def _multi(var: str, label: str, lines: list[str]) -> FormField:
    return FormField(var, FieldType.TEXT_MULTI, label, values=tuple(lines) or ("none",))


def _tally(counts: Mapping[str, int]) -> str:
    if not counts:
        return "none"
    return ", ".join(f"{key} {n}" for key, n in sorted(counts.items()))


def _duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def _when(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


__all__ = ["COMMANDS", "AdminDesk", "Notices", "QueueControl", "stats_form"]
