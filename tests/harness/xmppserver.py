"""What every test XMPP server offers, so tests can run against Prosody and ejabberd alike."""

from __future__ import annotations

import abc
import time

from tests.harness.ports import free_port, wait_for_port
from tests.harness.process import TIMINGS, ServerProcess
from tests.harness.values import (
    COMPONENT_DOMAIN,
    COMPONENT_SECRET,
    LOOPBACK,
    MUC_DOMAIN,
    XMPP_DOMAIN,
)


class XmppServer(abc.ABC):
    """A private XMPP server on loopback: c2s and component ports, MUC, user registration."""

    name = "xmpp"
    owner: str | None = None
    start_timeout = 90.0

    host = LOOPBACK
    domain = XMPP_DOMAIN
    muc_domain = MUC_DOMAIN
    component_domain = COMPONENT_DOMAIN
    component_secret = COMPONENT_SECRET

    def __init__(self) -> None:
        self.process = ServerProcess(self.name, owner=self.owner)
        self.dir = self.process.dir
        self.c2s_port = free_port()
        self.component_port = free_port()
        #: Wall seconds of each start() (first start, then restarts), for the report.
        self.start_times: list[float] = []
        self.write_config()

    @abc.abstractmethod
    def write_config(self) -> None:
        """Write the main config (which includes the repository's snippet) into self.dir."""

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The foreground command line of the server."""

    def environment(self) -> dict[str, str] | None:
        """Environment of the server process (None: inherit)."""
        return None

    @abc.abstractmethod
    def register(self, user: str, password: str) -> None:
        """Create the account user@domain with the given password."""

    def start(self) -> None:
        """Start the server and wait until both its c2s and component ports accept."""
        began = time.monotonic()
        proc = self.process.spawn(self.command(), env=self.environment(), as_owner=True)
        deadline = self.start_timeout
        for port in (self.c2s_port, self.component_port):
            deadline -= wait_for_port(port, max(deadline, 1.0), proc)
        self.start_times.append(time.monotonic() - began)
        TIMINGS.append((self.name, self.start_times[-1]))

    def ensure_running(self) -> bool:
        """Start the server again if it died (a crash in an earlier test); True if it did."""
        if self.process.running:
            return False
        self.process.stop()  # reap what is left of the dead one before reusing its ports
        self.start()
        return True

    def stop(self) -> None:
        """Stop the server; its data (accounts, rooms) stays for a later start()."""
        self.process.stop()

    def restart(self) -> None:
        """Stop and start again with the same config and data (the "server restarts" tests)."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its temp dir."""
        self.process.close()

    def jid(self, user: str) -> str:
        """The bare JID of a local user."""
        return f"{user}@{self.domain}"
