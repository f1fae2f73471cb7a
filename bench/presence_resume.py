"""Memory a resumed SIP-watcher subscription keeps, measured in process (beside bench.presence).

Run ``python -m bench.presence_resume [--made N] [--stored N] [--top K]``. It makes ``--made``
SIP users watch one XMPP user through the SIP side and the presence core as ``app.py`` wires
them (approved, SUBSCRIBE answered 202, first NOTIFY answered 200; fake transactions and XMPP
port) on a SQLite store in a temporary directory, and copies the stored rows up to ``--stored``
(``bench.presence_load.add_stored_sip_watchers``, as ``bench.presence --stored`` does). Then a
fresh Python process opens the store, builds the SIP side and resumes, and prints:

- RSS growth across ``resume`` per resumed subscription (``/proc/self/statm``), best of
  ``--rounds`` fresh processes;
- in one more fresh process under tracemalloc: the Python heap the resumed subscriptions keep,
  per subscription, and the ``--top`` tracebacks that keep most of it.

Unlike the gateway's RSS in ``bench.presence`` this is deterministic: no other traffic, the
same rows every run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import structlog

from bench.load import proc_rss_bytes
from bench.presence_load import add_stored_sip_watchers
from component.addresses import AddressBook
from component.ports import SipPort
from component.presence.core import PresenceCore
from component.runtime.presence_driver import CoreSerial
from component.runtime.signal import UserStateSignal
from component.sip.side import SipSide
from component.sip.transactions import Deliver
from component.store import ApprovalDirection, ApprovalState, RosterApproval
from component.store.migrate import upgrade
from component.store.store import Store
from sipside.message import SipRequest, make_response, parse_message
from sipside.peer import Peer
from tests.test_presence import FakeOnline, FakeXmpp, NoTexts

BOOK = AddressBook(
    component="sip.xmpp.test",
    sip_domain="sip.test",
    jdomain="jabber.sip.test",
    registrar="sip:jabber_gateway@sip.test",
)
TARGET_JID = "bob@xmpp.test"
TARGET_URI = "sip:bob*xmpp.test@jabber.sip.test"
PHONE = Peer("udp", "127.0.0.1", 5062)
NOW = 1_700_000_000.0


class Sends:
    """The transactions: keeps what was sent until ``answer_all`` answers it 200."""

    def __init__(self) -> None:
        self.sent: list[tuple[SipRequest, Deliver]] = []

    def send(self, request: SipRequest, peer: Peer | None, deliver: Deliver) -> None:
        self.sent.append((request, deliver))

    def contact_for(self, transport: str) -> str:
        return "sip:127.0.0.1:5070"

    async def answer_all(self, now: float) -> None:
        while self.sent:
            sent, self.sent = self.sent, []
            for request, deliver in sent:
                await deliver(make_response(request, 200), now)


class Incoming:
    """A SUBSCRIBE as the endpoint hands it over; keeps the status it was answered."""

    def __init__(self, request: SipRequest) -> None:
        self.request = request
        self.source = PHONE
        self.status = 0

    def send(self, response: object) -> None:
        self.status = getattr(response, "status", 0)


def side_on(store: Store, sends: Sends) -> SipSide:
    """The SIP side with the presence core it builds, as ``app.py`` wires them."""
    xmpp = FakeXmpp()

    def core(port: SipPort) -> PresenceCore:
        return PresenceCore(
            BOOK,
            sip=port,
            xmpp=xmpp,
            store=store,
            user_online=FakeOnline(),
            user_state=UserStateSignal(),
            sip_server=True,
            priority=9,
        )

    return SipSide(
        BOOK,
        driver=CoreSerial(clock=time.time),
        transactions=sends,
        sender=NoTexts(),
        store=store,
        presence=core,
        rng=random.Random(1),
    )


def subscribe(i: int) -> SipRequest:
    """A SUBSCRIBE from SIP user ``w<i>`` as bench.presence's watchers send it."""
    lines = [
        f"SUBSCRIBE {TARGET_URI} SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bKw{i}",
        f"From: <sip:w{i}@sip.test>;tag=ft{i:08x}",
        f"To: <{TARGET_URI}>",
        f"Call-ID: {random.getrandbits(96):024x}@127.0.0.1",
        "CSeq: 1 SUBSCRIBE",
        "Max-Forwards: 70",
        f"Contact: <sip:w{i}@127.0.0.1:5062;transport=udp>",
        "Event: presence",
        "Expires: 3600",
        "Accept: application/pidf+xml",
        "Content-Length: 0",
    ]
    message = parse_message(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert isinstance(message, SipRequest)
    return message


async def make_store(db_path: Path, made: int, stored: int) -> None:
    """``made`` subscriptions through the SIP side, the rows copied up to ``stored``."""
    url = f"sqlite:///{db_path}"
    upgrade(url)
    store = await Store.open(url)
    try:
        sends = Sends()
        side = side_on(store, sends)
        for i in range(made):
            watcher = BOOK.jid_for_sip_uri(f"sip:w{i}@sip.test")
            await store.save_approval(
                RosterApproval(
                    watcher,
                    TARGET_JID,
                    ApprovalDirection.SIP_WATCHES_XMPP,
                    ApprovalState.APPROVED,
                    NOW,
                )
            )
            incoming = Incoming(subscribe(i))
            await side.on_request(incoming, time.time())
            if incoming.status != 202:
                raise RuntimeError(f"SUBSCRIBE {i} answered {incoming.status}")
        await sends.answer_all(time.time())
    finally:
        await store.close()
    add_stored_sip_watchers(db_path, stored - made)


async def resume_once(db_path: Path, trace: int) -> dict[str, object]:
    """Open the store, build the SIP side, resume; RSS and (with ``trace``) heap growth."""
    store = await Store.open(f"sqlite:///{db_path}")
    try:
        side = side_on(store, Sends())
        gc.collect()
        if trace:
            tracemalloc.start(trace)
        before = tracemalloc.take_snapshot() if trace else None
        rss0 = proc_rss_bytes(os.getpid())
        cpu = time.process_time()
        sip, _, _ = await side.resume(time.time())
        cpu = time.process_time() - cpu
        gc.collect()
        rss1 = proc_rss_bytes(os.getpid())
        result: dict[str, object] = {"resumed": sip, "rss": rss1 - rss0, "cpu": cpu}
        if before is not None:
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            stats = after.compare_to(before, "traceback")
            result["heap"] = sum(s.size_diff for s in stats)
            result["top"] = [
                [s.size_diff, s.count_diff, [str(f) for f in s.traceback.format()[-6:]]]
                for s in sorted(stats, key=lambda s: -s.size_diff)[:trace]
            ]
        return result
    finally:
        await store.close()


def child(db_path: Path, trace: int) -> dict[str, object]:
    """``resume_once`` in a fresh Python process."""
    argv = [sys.executable, "-m", "bench.presence_resume", "--child", str(db_path)]
    out = subprocess.run([*argv, "--top", str(trace)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert isinstance(result, dict)
    return result


def main(argv: list[str] | None = None) -> int:
    """Make the store, resume it in fresh processes, print the figures."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--made", type=int, default=200, help="subscriptions made by SUBSCRIBE")
    parser.add_argument("--stored", type=int, default=20000, help="rows stored in all")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes for RSS")
    parser.add_argument("--top", type=int, default=12, help="tracebacks listed")
    parser.add_argument("--keep", metavar="DB", help="the store file: made once, then reused")
    parser.add_argument("--child", metavar="DB", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.child:
        print(json.dumps(asyncio.run(resume_once(Path(args.child), args.top))))
        return 0
    if not 0 < args.made <= args.stored:
        parser.error("need 0 < --made <= --stored")
    with tempfile.TemporaryDirectory(prefix="sipxmpp-bench-resume-") as tmp:
        db_path = Path(args.keep) if args.keep else Path(tmp) / "gateway.sqlite"
        if not db_path.exists():
            asyncio.run(make_store(db_path, args.made, args.stored))
        rss = [child(db_path, 0) for _ in range(args.rounds)]
        traced = child(db_path, args.top)
    count = int(str(rss[0]["resumed"]))
    per = sorted(int(str(r["rss"])) / count for r in rss)
    print(f"resumed {count:,} SIP-watcher subscriptions ({args.made} made, the rest copies)")
    print(f"RSS growth per subscription: best {per[0]:,.0f} B, worst {per[-1]:,.0f} B")
    cpu = min(float(str(r["cpu"])) for r in rss)
    print(f"resume CPU: {cpu:.2f} s (best), {cpu / count * 1e6:.0f} us per subscription")
    print(f"Python heap kept per subscription: {int(str(traced['heap'])) / count:,.0f} B")
    top = traced["top"]
    assert isinstance(top, list)
    for size, blocks, frames in top:
        print(f"{size / count:8.1f} B {blocks / count:6.2f} blocks  {frames[-1].strip()}")
        for frame in frames[-4:-1]:  # where, and the caller
            print(f"{'':28}{frame.strip()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
