"""Pieces of ``bench.presence``: result rows and tables, the restart readings (store counts, log
times, the per-second histogram), Prosody seeding, an XMPP client that sends presence, SIP
watchers, a stand-in presence server and a direct NOTIFY sender.

The SIP parts are sipside ``Endpoint``s in the benchmark process. One endpoint hosts all the
watchers (one socket, a Contact user part per watcher); another stands in for the proxy and
its presence server, so the gateway's SUBSCRIBEs (DESIGN 5.3) and their refreshes after a
restart can be answered and counted. The direct NOTIFY sender runs as its own process
(``python -m bench.presence_load send-notifies ...``), like the gateway, so the reference row
does not share the watchers' event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from xml.sax.saxutils import quoteattr

import structlog

from bench.load import RawXmppClient, Received, percentile
from sipside.dialog import address_uri
from sipside.endpoint import Endpoint, IncomingRequest, make_request
from sipside.errors import SipError
from sipside.message import SipRequest, new_call_id, new_tag
from sipside.peer import Peer
from tests.harness.process import chown
from tests.harness.prosody import ProsodyServer
from tests.harness.values import LOOPBACK, SIP_DOMAIN

PIDF_TYPE = "application/pidf+xml"

# --- pure helpers --------------------------------------------------------------------------------


def per_second(times: Iterable[float], origin: float) -> Counter[int]:
    """How many of ``times`` fall in each whole second after ``origin`` (a histogram)."""
    return Counter(int(t - origin) for t in times)


@dataclass(frozen=True, slots=True)
class Spread:
    """When a burst of requests arrived: count, first and last (seconds after origin), peak."""

    count: int
    first: float
    last: float
    peak_per_second: int

    @property
    def window(self) -> float:
        """Seconds from the first arrival to the last."""
        return self.last - self.first


def spread_of(times: list[float], origin: float) -> Spread:
    """The ``Spread`` of arrival ``times`` measured from ``origin``."""
    if not times:
        return Spread(0, 0.0, 0.0, 0)
    hist = per_second(times, origin)
    return Spread(len(times), min(times) - origin, max(times) - origin, max(hist.values()))


def histogram_line(hist: Counter[int], cells: int = 30) -> str:
    """``second:count`` pairs in order; seconds are grouped so that at most ``cells`` show."""
    if not hist:
        return "-"
    first, last = min(hist), max(hist)
    size = max(1, -(-(last - first + 1) // cells))
    pairs = [
        f"{start}:{sum(hist.get(s, 0) for s in range(start, start + size))}"
        for start in range(first, last + 1, size)
    ]
    return (f"per {size}s: " if size > 1 else "") + " ".join(pairs)


def pidf_body(entity: str, basic: str = "open", note: str | None = None) -> bytes:
    """A minimal PIDF document (RFC 3863) for ``entity``."""
    note_xml = f"<note>{note}</note>" if note else ""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<presence xmlns="urn:ietf:params:xml:ns:pidf" entity={quoteattr(entity)}>'
        f'<tuple id="t1"><status><basic>{basic}</basic></status>{note_xml}</tuple></presence>'
    ).encode()


# --- results and tables --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FanoutRow:
    """One fan-out: N NOTIFYs, how long until all were answered, what it cost."""

    path: str
    n: int
    arrived: int
    seconds: float
    delays: list[float]
    gateway_cpu: float | None
    prosody_cpu: float | None
    sender_cpu: float | None
    notes: str = ""

    def cells(self) -> list[str]:
        """The table cells."""
        per = max(self.arrived, 1)

        def us(cpu: float | None) -> str:
            return "-" if cpu is None else f"{cpu / per * 1e6:.0f}"

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1e3:.0f}"

        rate = self.arrived / self.seconds if self.seconds > 0 else 0.0
        return [
            self.path,
            str(self.n),
            str(self.arrived),
            f"{self.seconds:.2f}",
            f"{rate:,.0f}",
            ms(percentile(self.delays, 0.50)),
            ms(percentile(self.delays, 0.99)),
            us(self.gateway_cpu),
            us(self.prosody_cpu),
            us(self.sender_cpu),
            self.notes,
        ]


FANOUT_HEADER = [
    "path",
    "N",
    "answered",
    "secs",
    "NOTIFY/s",
    "p50 ms",
    "p99 ms",
    "gw us/NOTIFY",
    "prosody us/NOTIFY",
    "sender us/NOTIFY",
    "notes",
]


@dataclass(frozen=True, slots=True)
class MemoryRow:
    """RSS and database growth for N subscriptions of one kind."""

    kind: str
    n: int
    created: int
    seconds: float
    rss_before: int
    rss_after: int
    db_before: int
    db_after: int
    notes: str = ""
    rss_idle: int | None = None  # once the transactions of the creation have ended

    def cells(self) -> list[str]:
        """The table cells."""
        per = max(self.created, 1)
        idle = "-" if self.rss_idle is None else f"{(self.rss_idle - self.rss_before) / per:,.0f}"
        return [
            self.kind,
            str(self.n),
            str(self.created),
            f"{self.seconds:.1f}",
            f"{self.created / self.seconds:,.0f}" if self.seconds > 0 else "-",
            f"{self.rss_before / 2**20:.1f}",
            f"{self.rss_after / 2**20:.1f}",
            f"{(self.rss_after - self.rss_before) / per:,.0f}",
            idle,
            f"{(self.db_after - self.db_before) / per:,.0f}",
            self.notes,
        ]


MEMORY_HEADER = [
    "subscriptions",
    "N",
    "created",
    "secs",
    "subs/s",
    "RSS before MB",
    "RSS after MB",
    "RSS B/sub",
    "idle RSS B/sub",
    "DB B/sub",
    "notes",
]


def format_table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """An aligned text table: the first ``left`` columns and the last (notes) to the left."""
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out: list[str] = []
    for index, line in enumerate(lines):
        cells = [
            cell.ljust(width) if col < left or col == len(header) - 1 else cell.rjust(width)
            for col, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if index == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


@dataclass(frozen=True, slots=True)
class RestartResult:
    """What the restart cost and how the refreshes were spread."""

    stored_sip: int
    stored_xmpp: int
    stop_seconds: float
    options_seconds: float
    resumed_seconds: float | None
    resumed_counts: str
    refreshes: list[float]
    origin: float
    rss_after: int
    notes: str
    rss_empty: int = 0  # the gateway's RSS before any subscription existed

    def lines(self) -> str:
        """The restart report as a small two-column table."""
        spread = spread_of(self.refreshes, self.origin)
        hist = per_second(self.refreshes, self.origin)
        resumed = "-" if self.resumed_seconds is None else f"{self.resumed_seconds:.2f}"
        stored = self.stored_sip + self.stored_xmpp
        per_stored = "-"
        if self.rss_empty and stored:
            growth = (self.rss_after - self.rss_empty) / stored
            per_stored = f"{growth:,.0f} (RSS after resume less RSS before any subscription)"
        rows = [
            [
                "stored subscriptions",
                f"{self.stored_sip} SIP-watcher, {self.stored_xmpp} XMPP-watcher",
            ],
            ["SIGTERM -> exit (s)", f"{self.stop_seconds:.2f}"],
            ["spawn -> first OPTIONS 200 (s)", f"{self.options_seconds:.2f}"],
            ["spawn -> presence_resumed (s)", f"{resumed} ({self.resumed_counts})"],
            ["refresh SUBSCRIBEs at proxy", f"{spread.count} of {self.stored_xmpp} due"],
            ["first / last refresh after spawn (s)", f"{spread.first:.1f} / {spread.last:.1f}"],
            ["refresh spread window (s)", f"{spread.window:.1f}"],
            ["peak refreshes in one second", str(spread.peak_per_second)],
            ["gateway RSS after resume (MB)", f"{self.rss_after / 2**20:.1f}"],
            ["RSS per stored subscription (B)", per_stored],
            ["per-second histogram (s:count)", histogram_line(hist)],
            ["notes", self.notes or "-"],
        ]
        return format_table(["restart", "value"], rows)


def stored_counts(db_path: Path) -> tuple[int, int]:
    """(SIP-watcher, XMPP-watcher) subscriptions in the store."""
    with contextlib.closing(sqlite3.connect(db_path, timeout=30)) as db:
        sip = db.execute("SELECT count(*) FROM sip_watcher_subscription").fetchone()[0]
        xmpp = db.execute("SELECT count(*) FROM xmpp_watcher_subscription").fetchone()[0]
    return int(sip), int(xmpp)


def make_refreshes_overdue(db_path: Path, when: float) -> int:
    """Move every stored XMPP-watcher refresh to ``when`` (in the past): a long outage."""
    with contextlib.closing(sqlite3.connect(db_path, timeout=30)) as db:
        cursor = db.execute(
            "UPDATE xmpp_watcher_subscription SET dialog = json_set(dialog, '$.refresh_at', ?) "
            "WHERE dialog IS NOT NULL",
            (when,),
        )
        db.commit()
        return cursor.rowcount


def add_stored_sip_watchers(db_path: Path, count: int) -> int:
    """Store ``count`` more SIP-watcher subscriptions, copies of a stored one under new watchers
    (``sip:st<i>@...``) and Call-IDs: stored subscriptions beyond those the benchmark made, for
    the restart. Returns how many were added (0 if none was stored to copy)."""
    with contextlib.closing(sqlite3.connect(db_path, timeout=30)) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM sip_watcher_subscription LIMIT 1").fetchone()
        if row is None or count <= 0:
            return 0
        user = str(row["watcher_aor"])[4:].split("@", 1)[0]
        call_id = str(json.loads(row["dialog"])["call_id"])
        columns = list(row.keys())

        def copy(i: int) -> list[object]:
            new_call_id_ = f"st{i}-{new_call_id()}"
            values: list[object] = []
            for name in columns:
                value = row[name]
                if isinstance(value, str) and name != "target_jid":
                    value = value.replace(call_id, new_call_id_)
                    value = value.replace(f"sip:{user}@", f"sip:st{i}@")
                values.append(value)
            return values

        marks = ", ".join("?" for _ in columns)
        db.executemany(
            f"INSERT INTO sip_watcher_subscription ({', '.join(columns)}) VALUES ({marks})",
            (copy(i) for i in range(count)),
        )
        db.commit()
    return count


def log_event_time(path: Path, event: str, since: float) -> tuple[float, dict[str, object]] | None:
    """The POSIX time and fields of the first ``event`` logged at or after ``since``."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        if f'"{event}"' not in line:
            continue
        try:
            entry = json.loads(line)
            at = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError):
            continue
        if entry.get("event") == event and at >= since - 1.0:
            return at, entry
    return None


# --- Prosody accounts and rosters, written before the users log in -------------------------------


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _prosody_dir(prosody: ProsodyServer, store: str) -> Path:
    # Prosody's datamanager escapes every non-alphanumeric byte of the host as %xx.
    host = "".join(c if c.isalnum() else f"%{ord(c):02x}" for c in prosody.domain)
    data = prosody.dir / "data"
    path = data / host / store
    for part in (data / host, path):
        if not part.exists():
            part.mkdir(mode=0o750)
            chown(part, "prosody")
    return path


def seed_prosody_user(
    prosody: ProsodyServer,
    user: str,
    password: str,
    contacts: Iterable[str] = (),
    subscription: str = "from",
) -> None:
    """Write the account and roster files of ``user`` into Prosody's internal storage.

    ``prosodyctl register`` costs a Lua start per user and a roster built by subscription
    handshakes rewrites the whole roster file per contact (quadratic for 10,000 contacts), so
    the benchmark writes both files directly, as Prosody 0.12 stores them. The user must log
    in after this (Prosody reads a roster at login). ``contacts`` are bare JIDs with the given
    ``subscription`` ("from": they see the user's presence).
    """
    if not user.isalnum():
        raise ValueError(f"user {user!r}: only letters and digits keep the file name simple")
    account = _prosody_dir(prosody, "accounts") / f"{user}.dat"
    account.write_text(f'return {{\n\t["password"] = {_lua_string(password)};\n}};\n')
    chown(account, "prosody")
    items = [
        f'\t[{_lua_string(jid)}] = {{\n\t\t["subscription"] = {_lua_string(subscription)};\n'
        '\t\t["groups"] = {};\n\t};\n'
        for jid in contacts
    ]
    roster = _prosody_dir(prosody, "roster") / f"{user}.dat"
    head = 'return {\n\t[false] = {\n\t\t["version"] = 1;\n\t\t["pending"] = {};\n\t};\n'
    roster.write_text(head + "".join(items) + "};\n")
    chown(roster, "prosody")


# --- an XMPP user that sends presence ------------------------------------------------------------


class PresenceClient(RawXmppClient):
    """``RawXmppClient`` plus raw presence out, and a count of the presence types it got."""

    def __init__(self, user: str, domain: str, password: str) -> None:
        super().__init__(user, domain, password, self._ignore)
        self.presence_in: Counter[str] = Counter()
        # Senders of presence (not of subscription stanzas: Prosody sends those only to
        # resources that fetched the roster, RFC 6121 2.1.6 "interested resources").
        self.presence_from: set[str] = set()

    @staticmethod
    def _ignore(_msg: Received) -> None:
        return None

    def _stanza(self, element: ET.Element) -> None:
        # Presence (thousands) and roster pushes would pile up in the login queue: count them.
        if element.tag == "presence":
            ptype = element.get("type", "available")
            self.presence_in[ptype] += 1
            if ptype in ("available", "unavailable"):
                self.presence_from.add(element.get("from", "").split("/", 1)[0])
        elif element.tag == "iq" and element.get("type") == "set":
            return
        else:
            super()._stanza(element)

    def send_presence(
        self, to: str | None = None, ptype: str | None = None, inner: str = ""
    ) -> None:
        """Write one ``<presence>`` (broadcast when ``to`` is None)."""
        attrs = (f" to={quoteattr(to)}" if to else "") + (
            f" type={quoteattr(ptype)}" if ptype else ""
        )
        self._write(f"<presence{attrs}>{inner}</presence>")


# --- SIP watchers: one endpoint, many subscriptions ----------------------------------------------


@dataclass(slots=True)
class Round:
    """One measured fan-out: which dialogs must see ``marker``, and when each did."""

    marker: bytes
    expected: dict[str, int]  # Call-ID -> watcher index
    arrived: dict[int, float] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class WatcherPool:
    """SIP users that SUBSCRIBE to XMPP users through one endpoint and answer NOTIFY with 200."""

    def __init__(self) -> None:
        self.endpoint = Endpoint([f"udp:{LOOPBACK}:0"], self._on_request)
        self.dialogs: dict[str, str] = {}  # Call-ID -> watcher AOR
        self.notifies = 0
        self.last_notify_at = 0.0
        self.last_body = b""
        self.current: Round | None = None

    async def start(self) -> None:
        """Bind the socket."""
        await self.endpoint.start()

    @property
    def peer(self) -> Peer:
        """Where the watchers' socket listens."""
        return self.endpoint.local_peers["udp"]

    def _on_request(self, incoming: IncomingRequest) -> None:
        incoming.respond(200)
        request = incoming.request
        if request.method != "NOTIFY":
            return
        now = time.perf_counter()
        self.notifies += 1
        self.last_notify_at = now
        row = self.current
        if row is None or not request.body:
            return
        index = row.expected.get(request.call_id)
        if index is not None and index not in row.arrived and row.marker in request.body:
            row.arrived[index] = now
            self.last_body = request.body
            if len(row.arrived) == len(row.expected):
                row.done.set()

    async def subscribe_all(
        self, users: list[str], target: str, gateway: Peer, window: int, timeout: float
    ) -> Counter[str]:
        """SUBSCRIBE ``sip:user@sip.test`` to ``target`` for every user, ``window`` at a time.

        Returns the outcome counts ("202", "timeout", ...); bounded by ``timeout`` overall.
        """
        outcomes: Counter[str] = Counter()
        gate = asyncio.Semaphore(window)

        async def one(user: str) -> None:
            async with gate:
                outcomes[await self._subscribe(user, target, gateway)] += 1

        tasks = [asyncio.ensure_future(one(user)) for user in users]
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        outcomes["unfinished"] += len(pending)
        await asyncio.gather(*pending, return_exceptions=True)
        return outcomes

    async def _subscribe(self, user: str, target: str, gateway: Peer) -> str:
        aor = f"sip:{user}@{SIP_DOMAIN}"
        call_id = new_call_id()
        request = make_request(
            "SUBSCRIBE",
            target,
            from_=f"<{aor}>;tag={new_tag()}",
            to=f"<{target}>",
            call_id=call_id,
            headers=[
                ("Contact", f"<{self.endpoint.contact_for('udp', user)}>"),
                ("Event", "presence"),
                ("Expires", "3600"),
                ("Accept", PIDF_TYPE),
            ],
        )
        self.dialogs[call_id] = aor
        try:
            response = await self.endpoint.request(request, gateway)
        except SipError as exc:
            return type(exc).__name__
        return str(response.status)

    def round_for(self, users: set[str], marker: bytes) -> Round:
        """A ``Round`` expecting ``marker`` on the dialogs of ``users`` (SIP user parts)."""
        expected: dict[str, int] = {}
        for call_id, aor in self.dialogs.items():
            user = aor[4:].split("@", 1)[0]
            if user in users:
                expected[call_id] = len(expected)
        return Round(marker, expected)

    async def close(self) -> None:
        """Close the socket."""
        await self.endpoint.close()


# --- the stand-in for the proxy and its presence server ------------------------------------------


class PresenceServerStandIn:
    """Answers the gateway's SUBSCRIBEs with 200 and a NOTIFY active, and logs their times.

    Initial SUBSCRIBEs (no To tag) and refreshes are counted apart; ``refresh_times`` holds
    the wall-clock arrival of every refresh, for the restart histogram.
    """

    def __init__(self, expires: int = 3600) -> None:
        self.endpoint = Endpoint([f"udp:{LOOPBACK}:0"], self._on_request)
        self.expires = expires
        self.initial = 0
        self.refresh_times: list[float] = []
        self.notify_outcomes: Counter[str] = Counter()
        self._tag = new_tag()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind the socket."""
        await self.endpoint.start()

    @property
    def uri(self) -> str:
        """The ``sip.proxy`` value pointing at this stand-in."""
        return f"sip:{self.endpoint.local_peers['udp'].hostport()}"

    def _on_request(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        if request.method != "SUBSCRIBE":
            incoming.respond(200)
            return
        refresh = request.to_tag is not None
        if refresh:
            self.refresh_times.append(time.time())
        else:
            self.initial += 1
        expires = request.header("Expires") or str(self.expires)
        incoming.respond(
            200,
            to_tag=None if refresh else self._tag,
            headers=[
                ("Expires", expires),
                ("Contact", f"<{self.endpoint.contact_for('udp')}>"),
            ],
        )
        if expires.strip() != "0":
            # RFC 6665 4.2.1: the notifier sends a NOTIFY after accepting (and refreshing).
            task = asyncio.ensure_future(self._notify(request, incoming.source, int(expires)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _notify(self, subscribe: SipRequest, source: Peer, expires: int) -> None:
        to = subscribe.header("To") or ""
        entity = address_uri(to)
        from_ = to if subscribe.to_tag else f"{to};tag={self._tag}"
        contact = address_uri(subscribe.header("Contact") or "")
        request = make_request(
            "NOTIFY",
            contact,
            from_=from_,
            to=subscribe.header("From") or "",
            call_id=subscribe.call_id,
            cseq=subscribe.cseq[0],
            headers=[
                ("Contact", f"<{self.endpoint.contact_for('udp')}>"),
                ("Event", "presence"),
                ("Subscription-State", f"active;expires={expires}"),
                ("Content-Type", PIDF_TYPE),
            ],
            body=pidf_body(entity),
        )
        try:
            response = await self.endpoint.request(request, source)
            self.notify_outcomes[str(response.status)] += 1
        except SipError as exc:
            self.notify_outcomes[type(exc).__name__] += 1

    async def close(self) -> None:
        """Cancel NOTIFYs in flight and close the socket."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.endpoint.close()


async def options_answered(endpoint: Endpoint, target: Peer, timeout: float = 0.5) -> bool:
    """True if ``target`` answers an OPTIONS keep-alive with 200 within ``timeout``."""
    uri = f"sip:{target.hostport()}"
    request = make_request(
        "OPTIONS",
        uri,
        from_=f"<sip:bench@{SIP_DOMAIN}>;tag={new_tag()}",
        to=f"<{uri}>",
        call_id=new_call_id(),
    )
    with contextlib.suppress(SipError, TimeoutError):
        response = await asyncio.wait_for(endpoint.request(request, target), timeout)
        return response.status == 200
    return False


# --- the direct reference: a plain endpoint sends N NOTIFYs (own process) ------------------------


async def send_notifies(
    target: Peer, users: list[str], call_ids: list[str], body: bytes, window: int
) -> dict[str, float]:
    """NOTIFY each watcher contact once, ``window`` in flight; returns seconds and outcomes."""
    endpoint = Endpoint([f"udp:{LOOPBACK}:0"], _refuse)
    await endpoint.start()
    gate = asyncio.Semaphore(window)
    failed = 0

    async def one(user: str, call_id: str) -> None:
        nonlocal failed
        uri = f"sip:{user}@{target.hostport()}"
        request = make_request(
            "NOTIFY",
            uri,
            from_=f"<sip:direct@{SIP_DOMAIN}>;tag={new_tag()}",
            to=f"<sip:{user}@{SIP_DOMAIN}>;tag={new_tag()}",
            call_id=call_id,
            headers=[
                ("Event", "presence"),
                ("Subscription-State", "active;expires=3600"),
                ("Content-Type", PIDF_TYPE),
            ],
            body=body,
        )
        async with gate:
            try:
                response = await endpoint.request(request, target)
                failed += response.status != 200
            except SipError:
                failed += 1

    began = time.perf_counter()
    cpu0 = time.process_time()
    await asyncio.gather(*(one(u, c) for u, c in zip(users, call_ids, strict=True)))
    result = {
        "seconds": time.perf_counter() - began,
        "cpu": time.process_time() - cpu0,
        "failed": float(failed),
    }
    await endpoint.close()
    return result


def _refuse(incoming: IncomingRequest) -> None:
    incoming.respond(405)


def direct_sender_main(argv: list[str]) -> int:
    """``send-notifies HOST:PORT WINDOW JOBFILE``: wait for a line on stdin, send, print JSON.

    JOBFILE is JSON ``{"users": [...], "call_ids": [...], "body": "..."}``.
    """
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    hostport, window, jobfile = argv
    host, _, port = hostport.rpartition(":")
    job = json.loads(Path(jobfile).read_text())
    print("ready", flush=True)
    sys.stdin.readline()
    result = asyncio.run(
        send_notifies(
            Peer("udp", host, int(port)),
            job["users"],
            job["call_ids"],
            job["body"].encode(),
            int(window),
        )
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "send-notifies":
        raise SystemExit("usage: python -m bench.presence_load send-notifies HOST:PORT WINDOW JOB")
    raise SystemExit(direct_sender_main(sys.argv[2:]))
