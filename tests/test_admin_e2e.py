"""The operator's view end to end (DESIGN 9): a slixmpp admin client runs each XEP-0050 command
on the gateway's domain, a stranger is refused, and ``/metrics`` is read over HTTP after
messages both ways. PJSIP <-> Kamailio (copying REGISTERs) <-> gateway <-> Prosody and
ejabberd."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from slixmpp.exceptions import IqError

from component.admin.commands import DROPPED
from tests.gateway_fixture import RunningGateway, component_jid, gateway_behind_kamailio
from tests.harness.kamailio import KamailioServer
from tests.harness.pjsip import PjsipAgent, SipAccount
from tests.harness.ports import free_port
from tests.harness.values import COMPONENT_DOMAIN, LOOPBACK
from tests.harness.xmppclient import XmppClient
from tests.harness.xmppserver import XmppServer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.parametrize("xmpp_server", ["prosody", "ejabberd"], indirect=True),
]

ClientFactory = Callable[[str], Awaitable[XmppClient]]
World = tuple[RunningGateway, KamailioServer, XmppClient, str]
_sip_users = iter(range(1, 10_000))


@pytest.fixture
async def world(
    tmp_path: Path,
    xmpp_server: XmppServer,
    kamailio_factory: Callable[..., KamailioServer],
    xmpp_client_factory: ClientFactory,
) -> AsyncIterator[World]:
    """A gateway whose admin.jids names a fresh XMPP user, with /metrics on a free port, behind
    Kamailio copying REGISTERs (so the gateway knows who is online)."""
    admin = await xmpp_client_factory("admin")
    admin.register_plugin("xep_0050")
    metrics = f"{LOOPBACK}:{free_port()}"

    def kamailio(port: int) -> KamailioServer:
        return kamailio_factory(port, copy_register=True)

    async with gateway_behind_kamailio(
        tmp_path,
        xmpp_server.component_port,
        kamailio,
        presence={"sip_server": False},
        admin={"jids": [str(admin.boundjid.bare)]},
        metrics={"listen": metrics},
    ) as (running, proxy):
        yield running, proxy, admin, f"http://{metrics}/metrics"


async def _sip_user(agent: PjsipAgent, kamailio: KamailioServer) -> SipAccount:
    return await agent.add_account(f"opsuser{next(_sip_users)}", kamailio)


def _sip_uri_of(client: XmppClient) -> str:
    user, domain = str(client.boundjid.bare).split("@")
    return f"sip:{user}*{domain}@jabber.sip.test"


async def _run(client: XmppClient, node: str, **form: str | list[str]) -> dict[str, Any]:
    """Run command ``node``: execute, then (if it asks) submit ``form``; the last command's
    status, note and form values."""
    xep_0050 = client.plugin["xep_0050"]
    reply = await xep_0050.send_command(COMPONENT_DOMAIN, node, timeout=15)  # type: ignore[no-untyped-call]
    command = reply["command"]
    if command["status"] == "executing":
        submit = client.plugin["xep_0004"].make_form(ftype="submit")  # type: ignore[no-untyped-call]
        for var, value in form.items():
            submit.add_field(var=var, value=value)
        reply = await xep_0050.send_command(  # type: ignore[no-untyped-call]
            COMPONENT_DOMAIN,
            node,
            action="complete",
            payload=submit,
            sessionid=command["sessionid"],
            timeout=15,
        )
        command = reply["command"]
    notes = [text for _type, text in command["notes"]]
    has_form = command.xml.find("{jabber:x:data}x") is not None
    values = command["form"].get_values() if has_form else {}
    return {"status": command["status"], "notes": notes, "values": values, "iq": reply}


async def _asked(client: XmppClient, node: str) -> Any:
    """Execute ``node`` and return its first form (the command asks for one)."""
    reply = await client.plugin["xep_0050"].send_command(COMPONENT_DOMAIN, node, timeout=15)  # type: ignore[no-untyped-call]
    assert reply["command"]["status"] == "executing"
    return reply["command"]


async def _online(running: RunningGateway, aor: str, online: bool = True) -> None:
    store = running.store
    assert store is not None

    async def check() -> bool:
        user = await store.seen_user(aor)
        return user is not None and user.online is online

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while not await check():
        assert loop.time() < deadline, f"{aor} never became online={online}"
        await asyncio.sleep(0.1)


async def _chat_from(client: XmppClient, sender_bare: str) -> Any:
    while True:
        msg = await client.next_message(timeout=10, with_body=True)
        if str(msg["from"].bare) == sender_bare:
            return msg


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return _samples(await response.text())


def _msgs(samples: dict[Any, float], direction: str, outcome: str) -> float:
    key = ("sipxmpp_messages_total", (("direction", direction), ("outcome", outcome)))
    return samples[key]


async def test_a_stranger_sees_no_commands_and_is_forbidden(
    world: World, xmpp_client_factory: ClientFactory
) -> None:
    _, _, admin, metrics_url = world
    listed = await admin.plugin["xep_0050"].get_commands(COMPONENT_DOMAIN, timeout=15)  # type: ignore[no-untyped-call]
    nodes = {node for _jid, node, _name in listed["disco_items"]["items"]}
    assert nodes == {"stats", "user", "queue", "announce"}  # slixmpp keeps items in a set
    eve = await xmpp_client_factory("eve")
    eve.register_plugin("xep_0050")
    hidden = await eve.plugin["xep_0050"].get_commands(COMPONENT_DOMAIN, timeout=15)  # type: ignore[no-untyped-call]
    assert list(hidden["disco_items"]["items"]) == []
    for node in ("stats", "announce"):
        with pytest.raises(IqError) as refused:
            await eve.plugin["xep_0050"].send_command(COMPONENT_DOMAIN, node, timeout=15)  # type: ignore[no-untyped-call]
        assert refused.value.condition == "forbidden"
    samples = await _scrape(metrics_url)
    assert samples["sipxmpp_xmpp_errors_sent_total", (("condition", "forbidden"),)] == 2


async def test_each_command_and_the_metrics_after_messages_both_ways(
    world: World, pjsip_agent: PjsipAgent, xmpp_client_factory: ClientFactory
) -> None:
    running, kamailio, admin, metrics_url = world
    before = await _scrape(metrics_url)
    alice = await _sip_user(pjsip_agent, kamailio)
    carol = await _sip_user(pjsip_agent, kamailio)
    bob = await xmpp_client_factory("bob")
    await _online(running, alice.uri)
    # Messages both ways.
    assert (await alice.send_message(_sip_uri_of(bob), "hello bob")).code == 202
    msg = await _chat_from(bob, component_jid(alice.uri))
    msg.reply("hello alice").send()
    assert (await alice.next_message()).body == "hello alice"
    # Carol goes offline: two messages to her wait in the queue (a 404 for a user seen).
    await carol.unregister()
    await _online(running, carol.uri, online=False)
    for text in ("first for carol", "second for carol"):
        bob.send_chat(component_jid(carol.uri), text)
    store = running.store
    assert store is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while len(await store.waiting_messages()) < 2:
        assert loop.time() < deadline, "the messages to carol were never queued"
        await asyncio.sleep(0.1)
    first, second = await store.waiting_messages()

    stats = await _run(admin, "stats")
    assert stats["status"] == "completed"
    values = stats["values"]
    assert values["messages_sip_to_xmpp"].startswith("delivered 1,")
    assert values["messages_xmpp_to_sip"].startswith("delivered 1, queued 2,")
    assert values["queue"].startswith("2 waiting, oldest")
    assert values["xmpp_link"].startswith("up for ")
    # The one alias transport of the test settings, which no transport serves here.
    [transport] = values["transports"]  # a text-multi field: a list of lines
    assert transport.split()[:1] == ["irc.xmpp.test"]

    user = await _run(admin, "user", address=carol.uri.removeprefix("sip:"))
    assert user["values"]["state"] == "offline"
    queued = user["values"]["queued"]
    assert [line.split()[0] for line in queued] == [f"#{first.id}", f"#{second.id}"]

    # The queue, oldest first; the first is retried (still offline: it waits again, one try
    # more), the second dropped (bob is told).
    command = await _asked(admin, "queue")
    options = [option["value"] for option in command["form"].get_fields()["message"]["options"]]
    assert options[:2] == [str(first.id), str(second.id)]
    retried = await _run(admin, "queue", message=str(first.id), action="retry")
    assert retried["notes"] == [f"Message {first.id} retried."]
    [again] = [m for m in await store.waiting_messages() if m.id == first.id]
    assert again.attempts > first.attempts
    dropped = await _run(admin, "queue", message=str(second.id), action="drop")
    assert dropped["notes"] == [f"Message {second.id} dropped; its sender is told."]
    while True:
        error = await bob.next_message(timeout=10)
        if error["type"] == "error":
            break
    assert error["error"]["condition"] == "recipient-unavailable"
    assert DROPPED in error["error"]["text"]
    assert [m.id for m in await store.waiting_messages()] == [first.id]

    announced = await _run(admin, "announce", body=["Maintenance tonight", "at 22:00."])
    assert announced["notes"] == ["Announcement sent to 1 SIP users online."]
    notice = await alice.next_message()
    assert notice.body == "Maintenance tonight\nat 22:00."
    assert "jabber_gateway" in notice.from_uri

    # /metrics over HTTP: the counters moved, and it parses as Prometheus text.
    after = await _scrape(metrics_url)
    for direction, outcome, moved in (
        ("sip_to_xmpp", "delivered", 1),
        ("xmpp_to_sip", "delivered", 1),
        ("xmpp_to_sip", "queued", 2),
        ("xmpp_to_sip", "failed", 1),  # the dropped one
    ):
        assert _msgs(after, direction, outcome) - _msgs(before, direction, outcome) == moved
    assert after["sipxmpp_queue_depth", ()] == 1
    assert after["sipxmpp_queue_oldest_age_seconds", ()] >= 0
    assert after["sipxmpp_xmpp_link_up", ()] == 1
    assert after["sipxmpp_xmpp_link_state", (("state", "up"),)] == 1
    assert after["sipxmpp_xmpp_errors_sent_total", (("condition", "recipient-unavailable"),)] >= 1
    responses = after["sipxmpp_sip_responses_sent_total", (("class", "2xx"),)]
    assert responses > before.get(("sipxmpp_sip_responses_sent_total", (("class", "2xx"),)), 0)
    assert ("sipxmpp_event_loop_lag_seconds", ()) in after
    assert ("sipxmpp_sip_transactions", (("kind", "server"),)) in after
    states = {
        labels: value
        for (name, labels), value in after.items()
        if name == "sipxmpp_transport_state"
    }
    assert sum(states.values()) == 1 and len(states) == 3  # one state of up, down, unknown
