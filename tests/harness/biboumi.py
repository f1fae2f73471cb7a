"""A private biboumi (the XMPP <-> IRC transport) for tests, attached to a test Prosody.

biboumi runs as the ``_biboumi`` user with its own config, SQLite database and log in a temp dir,
identd off (``identd_port=0``). It connects to Prosody as the component ``irc.xmpp.test``
(``ProsodyWithTransport`` declares it after the gateway's own snippet). biboumi tries the IRC
ports 6697, 6670 and 6667 unless a user's server options say otherwise, and those options live
in its database per user and server: :meth:`Biboumi.set_irc_port` writes them so a test's IRC
server on a free port is reached at once.
"""

from __future__ import annotations

import sqlite3
import time

from tests.harness.process import TIMINGS, ServerProcess, chown
from tests.harness.prosody import ProsodyServer
from tests.harness.values import ALIAS_DOMAIN, LOOPBACK

TRANSPORT_SECRET = "ircsecret"

_CONFIG = """\
hostname={domain}
password={secret}
xmpp_server_ip={host}
port={port}
identd_port=0
db_name={dir}/biboumi.sqlite
log_file={dir}/biboumi.log
log_level=0
policy_directory={dir}
realname_customization=true
realname_from_jid=false
ca_file=
outgoing_bind=
"""

_COMPONENT = f"""
Component "{ALIAS_DOMAIN}"
    component_secret = "{TRANSPORT_SECRET}"
"""


class ProsodyWithTransport(ProsodyServer):
    """The test Prosody with the transport's component declared as well."""

    name = "prosody-irc"

    def write_config(self) -> None:
        super().write_config()
        with self.config_path.open("a") as config:
            config.write(_COMPONENT)


class Biboumi:
    """biboumi attached to ``component_port`` of a Prosody that declares ``irc.xmpp.test``."""

    name = "biboumi"
    domain = ALIAS_DOMAIN

    def __init__(self, component_port: int) -> None:
        self.process = ServerProcess(self.name, owner="_biboumi")
        self.dir = self.process.dir
        self.component_port = component_port
        self.db_path = self.dir / "biboumi.sqlite"
        self.config_path = self.dir / "biboumi.cfg"
        self.config_path.write_text(
            _CONFIG.format(
                domain=self.domain,
                secret=TRANSPORT_SECRET,
                host=LOOPBACK,
                port=component_port,
                dir=self.dir,
            )
        )
        self.process.extra_logs.append(self.dir / "biboumi.log")

    def start(self, timeout: float = 20.0) -> None:
        """Start it and wait until its component session is up (its log says so)."""
        began = time.monotonic()
        log = self.dir / "biboumi.log"
        seen = log.stat().st_size if log.exists() else 0
        proc = self.process.spawn(["biboumi", str(self.config_path)], as_owner=True)
        deadline = began + timeout
        while True:
            text = log.read_text(errors="replace")[seen:] if log.exists() else ""
            if "Authenticated with the XMPP server" in text:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"biboumi exited with {proc.returncode}: {text[-500:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"biboumi not connected after {timeout:.0f}s: {text[-500:]}")
            time.sleep(0.05)
        TIMINGS.append((self.name, time.monotonic() - began))

    def stop(self) -> None:
        """Stop it (its database stays for a later start)."""
        self.process.stop()

    def close(self) -> None:
        """Stop it and remove its temp dir."""
        self.process.close()

    def set_irc_port(self, owner_jid: str, server: str, port: int) -> None:
        """Make ``owner_jid`` reach IRC ``server`` on plain ``port`` (no TLS ports tried)."""
        with sqlite3.connect(self.db_path) as db:
            db.execute(
                "DELETE FROM ircserveroptions_ WHERE owner_ = ? AND server_ = ?",
                (owner_jid, server),
            )
            db.execute(
                "INSERT INTO ircserveroptions_ (owner_, server_, ports_, tlsports_)"
                " VALUES (?, ?, ?, ?)",
                (owner_jid, server, str(port), ""),
            )
        chown(self.db_path, "_biboumi")


__all__ = ["TRANSPORT_SECRET", "Biboumi", "ProsodyWithTransport"]
