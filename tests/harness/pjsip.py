"""Test-side handle of a PJSIP user agent subprocess (tests/harness/pjsip_agent.py).

Every method is a coroutine of the test's event loop: commands go to the agent as JSON lines,
events come back into per-account queues.

    agent = await PjsipAgent.start()
    alice = await agent.add_account("alice", kamailio, transport="tcp")
    status = await alice.send_message("sip:bob@sip.test", "hi")
    msg = await alice.next_message(timeout=5)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness import process
from tests.harness.kamailio import KamailioServer
from tests.harness.values import SIP_DOMAIN

AGENT_SCRIPT = Path(__file__).with_name("pjsip_agent.py")


@dataclass(frozen=True, slots=True)
class RegState:
    """Outcome of a REGISTER (expiration 0 after unregistering)."""

    code: int
    reason: str
    expiration: int


@dataclass(frozen=True, slots=True)
class MessageStatus:
    """Final response to a MESSAGE the agent sent."""

    to: str
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """A MESSAGE the agent received (PJSIP answered it with 200)."""

    from_uri: str
    to_uri: str
    contact: str
    content_type: str
    body: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The first value of a header field, by case-insensitive name."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


@dataclass(frozen=True, slots=True)
class BuddyState:
    """Presence of a subscribed URI as PJSIP understood the NOTIFY."""

    uri: str
    online: bool
    status: str
    status_text: str
    note: str
    activity: str
    sub_state: str
    term_code: int
    term_reason: str


class SipAccount:
    """One SIP user inside an agent; its events arrive in its own queues."""

    def __init__(self, agent: PjsipAgent, index: int, uri: str) -> None:
        self.agent = agent
        self.index = index
        self.uri = uri
        self.reg_states: asyncio.Queue[RegState] = asyncio.Queue()
        self.messages: asyncio.Queue[ReceivedMessage] = asyncio.Queue()
        self.buddy_states: asyncio.Queue[BuddyState] = asyncio.Queue()
        self.typings: asyncio.Queue[tuple[str, bool]] = asyncio.Queue()  # (from URI, typing)
        # MESSAGE statuses come back per destination in send order (PJSIP keeps no id we could
        # pass through), so each destination has a FIFO of waiting futures.
        self.pending: defaultdict[str, deque[asyncio.Future[MessageStatus]]] = defaultdict(deque)

    async def send_message(
        self,
        to: str,
        body: str,
        content_type: str = "text/plain",
        headers: list[tuple[str, str]] | None = None,
        timeout: float = 10.0,
    ) -> MessageStatus:
        """Send a MESSAGE and wait for its final status."""
        future: asyncio.Future[MessageStatus] = asyncio.get_running_loop().create_future()
        self.pending[to].append(future)
        await self.agent.call(
            "send_message",
            acc=self.index,
            to=to,
            body=body,
            content_type=content_type,
            headers=[list(h) for h in headers or []],
        )
        return await asyncio.wait_for(future, timeout)

    async def next_message(self, timeout: float = 10.0) -> ReceivedMessage:
        """The next MESSAGE received by this account."""
        return await asyncio.wait_for(self.messages.get(), timeout)

    async def send_typing(self, to: str, typing: bool) -> None:
        """Send an RFC 3994 isComposing (active or idle) to ``to``."""
        await self.agent.call("send_typing", acc=self.index, to=to, typing=typing)

    async def next_typing(self, timeout: float = 10.0) -> tuple[str, bool]:
        """The next typing indication received: (from URI, typing)."""
        return await asyncio.wait_for(self.typings.get(), timeout)

    async def next_reg_state(self, timeout: float = 10.0) -> RegState:
        """The next registration outcome."""
        return await asyncio.wait_for(self.reg_states.get(), timeout)

    async def subscribe(self, uri: str) -> None:
        """SUBSCRIBE to the presence of uri (states arrive via next_buddy_state)."""
        await self.agent.call("subscribe", acc=self.index, uri=uri)

    async def unsubscribe(self, uri: str) -> None:
        """End the presence subscription to uri."""
        await self.agent.call("unsubscribe", acc=self.index, uri=uri)

    async def next_buddy_state(self, timeout: float = 10.0) -> BuddyState:
        """The next presence or subscription-state change of any subscribed URI."""
        return await asyncio.wait_for(self.buddy_states.get(), timeout)

    async def publish(self, status: str = "online", note: str = "") -> None:
        """Set own presence (online, away, busy, offline); PUBLISHed if the account publishes."""
        await self.agent.call("publish", acc=self.index, status=status, note=note)

    async def register(self, timeout: float = 10.0) -> RegState:
        """REGISTER again and wait for the outcome."""
        await self.agent.call("register", acc=self.index)
        return await self.next_reg_state(timeout)

    async def unregister(self, timeout: float = 10.0) -> RegState:
        """REGISTER with Expires 0 and wait for the outcome."""
        await self.agent.call("unregister", acc=self.index)
        return await self.next_reg_state(timeout)


class PjsipAgent:
    """A PJSIP process holding up to 8 SIP accounts."""

    def __init__(self, proc: asyncio.subprocess.Process, workdir: Path) -> None:
        self.proc = proc
        self.name = "pjsip"
        self.dir = workdir
        self.accounts: list[SipAccount] = []
        self._ids = 0
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, timeout: float = 10.0) -> PjsipAgent:
        """Start an agent process and wait until its endpoint runs."""
        workdir = Path(tempfile.mkdtemp(prefix="sipxmpp-pjsip-"))
        with (workdir / "agent.err").open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(AGENT_SCRIPT),
                str(workdir / "pjsip.log"),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
            )
        agent = cls(proc, workdir)
        process.RUNNING.append(agent)
        try:
            await asyncio.wait_for(asyncio.shield(agent._ready), timeout)
        except BaseException:
            await agent.close()
            raise
        return agent

    def log_tail(self, lines: int = 60) -> str:
        """The agent's stderr and PJSIP log, last lines of each."""
        parts = []
        for path in (self.dir / "agent.err", self.dir / "pjsip.log"):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(parts)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            msg = json.loads(raw)
            if "reply" in msg:
                if msg.get("ok") and "uri" in msg:
                    # A new account: create it before reading on, since its first events may
                    # already be the next lines (the awaiting add_account resumes later).
                    self.accounts.append(SipAccount(self, msg["acc"], msg["uri"]))
                future = self._replies.pop(msg["reply"], None)
                if future is not None and not future.done():
                    future.set_result(msg)
                continue
            try:
                self._dispatch(msg)
            except Exception as exc:  # a harness bug must show in the log, not kill the reader
                with (self.dir / "agent.err").open("a") as err:
                    err.write(f"harness: cannot dispatch {msg!r}: {exc!r}\n")
        # The process is gone: whoever waits for a reply must not wait forever.
        for future in self._replies.values():
            if not future.done():
                future.set_exception(RuntimeError("PJSIP agent exited"))
        if not self._ready.done():
            self._ready.set_exception(RuntimeError("PJSIP agent exited before it was ready"))

    def _dispatch(self, msg: dict[str, Any]) -> None:
        event = msg["event"]
        if event == "ready":
            self._ready.set_result(None)
            return
        if "acc" not in msg:
            return
        acc = self.accounts[msg["acc"]]
        if event == "reg_state":
            acc.reg_states.put_nowait(RegState(msg["code"], msg["reason"], msg["expiration"]))
        elif event == "message":
            acc.messages.put_nowait(
                ReceivedMessage(
                    from_uri=msg["from"],
                    to_uri=msg["to"],
                    contact=msg["contact"],
                    content_type=msg["content_type"],
                    body=msg["body"],
                    headers=tuple((k, v) for k, v in msg["headers"]),
                )
            )
        elif event == "typing":
            acc.typings.put_nowait((msg["from"], msg["typing"]))
        elif event == "message_status":
            waiting = acc.pending.get(msg["to"])
            if waiting:
                waiting.popleft().set_result(MessageStatus(msg["to"], msg["code"], msg["reason"]))
        elif event == "buddy_state":
            fields = {k: v for k, v in msg.items() if k not in ("event", "acc")}
            acc.buddy_states.put_nowait(BuddyState(**fields))

    async def call(self, op: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
        """Send one command and return the agent's reply; raise if it failed."""
        assert self.proc.stdin is not None
        self._ids += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[self._ids] = future
        self.proc.stdin.write(json.dumps({"id": self._ids, "op": op, **args}).encode() + b"\n")
        await self.proc.stdin.drain()
        reply = await asyncio.wait_for(future, timeout)
        if not reply["ok"]:
            raise RuntimeError(f"PJSIP agent: {op} failed: {reply['error']}")
        return reply

    async def add_account(
        self,
        user: str,
        proxy: KamailioServer | str,
        *,
        transport: str = "udp",
        register: bool = True,
        publish: bool = False,
        password: str = "",
        domain: str = SIP_DOMAIN,
        expires: int = 300,
        timeout: float = 10.0,
    ) -> SipAccount:
        """Add sip:user@domain with `proxy` (a KamailioServer or "host:port") as outbound proxy.

        With register=True, waits for the REGISTER outcome and raises unless it is 200.
        """
        proxy_uri = proxy.uri if isinstance(proxy, KamailioServer) else f"sip:{proxy}"
        reply = await self.call(
            "add_account",
            user=user,
            domain=domain,
            proxy=proxy_uri,
            transport=transport,
            register=register,
            publish=publish,
            password=password,
            expires=expires,
        )
        acc: SipAccount = self.accounts[int(reply["acc"])]
        if register:
            state = await acc.next_reg_state(timeout)
            if state.code != 200:
                raise RuntimeError(f"REGISTER of {acc.uri} got {state.code} {state.reason}")
        return acc

    async def close(self, timeout: float = 5.0) -> None:
        """Unregister, stop the process (killing it if it hangs) and remove its temp dir."""
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.call("quit", timeout=timeout)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        if self in process.RUNNING:
            process.RUNNING.remove(self)
        if not os.environ.get(process.KEEP_ENV):
            shutil.rmtree(self.dir, ignore_errors=True)
