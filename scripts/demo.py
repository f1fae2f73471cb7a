"""A working demo of the gateway on this machine, printed as a readable transcript.

Starts Prosody and Kamailio on loopback (the test harness's private instances, with the
repository's config snippets), runs `sipxmpp run` as its own process, registers a PJSIP user
agent (alice, SIP) and logs in an XMPP client (bob), lets them chat both ways and see each
other's presence, then stops everything. Run it with `scripts/demo`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from component.store.migrate import upgrade  # noqa: E402
from tests.harness.kamailio import KamailioServer  # noqa: E402
from tests.harness.pjsip import PjsipAgent  # noqa: E402
from tests.harness.ports import free_port, wait_for_port  # noqa: E402
from tests.harness.prosody import ProsodyServer  # noqa: E402
from tests.harness.xmppclient import XmppClient  # noqa: E402


def say(who: str, text: str) -> None:
    print(f"  {who:<28} {text}", flush=True)


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


async def demo(workdir: Path) -> int:
    step("starting Prosody (XMPP server, domain xmpp.test)")
    prosody = ProsodyServer()
    prosody.start()
    sip_port = free_port()
    step("starting Kamailio (SIP proxy and registrar, domain sip.test)")
    kamailio = KamailioServer(sip_port, presence=True)
    kamailio.start()
    gateway: subprocess.Popen[bytes] | None = None
    agent: PjsipAgent | None = None
    bob: XmppClient | None = None
    try:
        config = workdir / "gateway.toml"
        db_url = f"sqlite:///{workdir / 'gateway.db'}"
        config.write_text(
            "[xmpp]\n"
            'component = "sip.xmpp.test"\nhost = "127.0.0.1"\n'
            f"port = {prosody.component_port}\n"
            'secret = "secret"\n\n'
            "[sip]\n"
            f'listen = ["udp:127.0.0.1:{sip_port}", "tcp:127.0.0.1:{sip_port}"]\n'
            'domain = "sip.test"\njdomain = "jabber.sip.test"\n'
            f'proxy = "{kamailio.uri}"\n\n'
            f'[database]\nurl = "{db_url}"\n'
        )
        upgrade(db_url)
        step("starting the gateway: sipxmpp run -c gateway.toml")
        log = (workdir / "gateway.log").open("wb")
        gateway = subprocess.Popen(
            [sys.executable, "-m", "component", "run", "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        wait_for_port(sip_port, 20.0)

        step("alice registers at Kamailio with a PJSIP user agent; bob logs in to Prosody")
        agent = await PjsipAgent.start()
        alice = await agent.add_account("alice", kamailio, publish=True)
        say("alice (SIP)", f"registered as {alice.uri}")
        prosody.register("bob", "password")
        bob = XmppClient("bob@xmpp.test", "password")
        await bob.start(prosody.c2s_port)
        say("bob (XMPP)", "logged in as bob@xmpp.test")
        await asyncio.sleep(1.0)  # the gateway's component link comes up

        step("SIP -> XMPP")
        status = await alice.send_message(
            "sip:bob*xmpp.test@jabber.sip.test", "Hi Bob, it's Alice!"
        )
        say(
            "alice -> sip:bob*xmpp.test@...",
            f"'Hi Bob, it's Alice!'  ({status.code} {status.reason})",
        )
        msg = await bob.next_message(timeout=10, with_body=True)
        say(f"bob <- {msg['from']}", repr(msg["body"]))

        step("XMPP -> SIP (bob replies to what arrived)")
        msg.reply("Hello Alice! Grüße from XMPP.").send()
        got = await alice.next_message(timeout=10)
        say(f"alice <- {got.from_uri}", repr(got.body))

        step("presence: bob asks to see alice's presence")
        bob.subscribe("alice@sip.xmpp.test")
        try:
            answer = await bob.next_presence(timeout=10, ptype="subscribed")
            say(f"bob <- {answer['from']}", "subscribed")
            await alice.publish("away", "at lunch")
            say("alice", "publishes: away, 'at lunch'")
            while True:
                pres = await bob.next_presence(timeout=10)
                shown = pres["show"] or "available"
                say(f"bob <- {pres['from']}", f"presence: {shown} {pres['status']!r}")
                if pres["show"] == "away":
                    break
        except TimeoutError:
            say("bob", "no presence update from alice arrived within 10 s")
            return 1

        step("done: stopping everything")
        return 0
    finally:
        if bob is not None:
            await bob.stop()
        if agent is not None:
            await agent.close()
        if gateway is not None:
            gateway.send_signal(signal.SIGTERM)
            try:
                gateway.wait(30)
            except subprocess.TimeoutExpired:
                gateway.kill()
        kamailio.close()
        prosody.close()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="sipxmpp-demo-") as tmp:
        return asyncio.run(demo(Path(tmp)))


if __name__ == "__main__":
    raise SystemExit(main())
