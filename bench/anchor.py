"""The performance anchor of DESIGN 12: Kamailio's ``xmpp`` module, the C gateway sipxmpp
replaces, run as an XEP-0114 component of the same Prosody the gateway uses.

Debian's build of the module crashes in component mode; the anchor directory beside the
repository (``../shared/anchors/kamailio-xmpp`` from its root, or ``--anchor-dir``) holds a
``build.sh`` that builds it with a one-line fix, and the Kamailio config that runs it. The module
is built once into a cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``, then
``sipxmpp-bench/kamailio-xmpp``) and found there afterwards.

The module gets a component domain of its own (``MODULE_DOMAIN``), so it and the gateway are
connected to Prosody at the same time and their rows can be measured one after the other.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sipside.peer import Peer
from tests.harness.kamailio import MODULE_DIR
from tests.harness.ports import free_port, wait_for_port
from tests.harness.process import ServerProcess
from tests.harness.prosody import ProsodyServer
from tests.harness.values import COMPONENT_SECRET, LOOPBACK, REPO_ROOT

#: Where the anchor lives relative to the repository root, unless --anchor-dir says otherwise.
DEFAULT_ANCHOR_DIR = REPO_ROOT.parent / "shared" / "anchors" / "kamailio-xmpp"
CONFIG_NAME = "kamailio-xmpp.cfg"
MODULE_FILE = "xmpp.so"
#: The module's component domain (and SIP gateway domain), beside the gateway's sip.xmpp.test.
MODULE_DOMAIN = "kxmpp.xmpp.test"
BUILD_TIMEOUT = 600.0
SHM_MB = 512  # the anchor's README: at 128 MB tm drops requests silently under load


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sipxmpp-bench/kamailio-xmpp`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sipxmpp-bench" / "kamailio-xmpp"


@dataclass(frozen=True, slots=True)
class Anchor:
    """What running the module needs: the built ``xmpp.so`` and the anchor's Kamailio config."""

    module_dir: Path
    config: Path


def find_or_build(anchor_dir: Path, cache: Path) -> tuple[Anchor | None, str]:
    """The module from ``cache``, built there by the anchor's build.sh if it is not yet.

    Returns the anchor (None when it cannot be had) and a line saying what was done or why not.
    """
    config = anchor_dir / CONFIG_NAME
    if not config.is_file():
        return None, f"Kamailio xmpp module: no {CONFIG_NAME} in {anchor_dir}; gateway rows only"
    module = cache / MODULE_FILE
    if module.is_file():
        return Anchor(cache, config), f"Kamailio xmpp module: built earlier, found in {cache}"
    script = anchor_dir / "build.sh"
    if not script.is_file():
        return None, f"Kamailio xmpp module: no build.sh in {anchor_dir}; gateway rows only"
    print(f"Kamailio xmpp module: building it once into {cache} with {script}", flush=True)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["bash", str(script), str(cache)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"Kamailio xmpp module: build.sh failed ({exc}); gateway rows only"
    if result.returncode != 0 or not module.is_file():
        why = (result.stderr.strip() or result.stdout.strip()).splitlines()[-3:]
        return None, (
            f"Kamailio xmpp module: build.sh exited with {result.returncode} "
            f"({' / '.join(why) or 'no output'}); gateway rows only"
        )
    return Anchor(cache, config), f"Kamailio xmpp module: built into {cache}"


class AnchorProsody(ProsodyServer):
    """The harness's Prosody with a second component domain for the module."""

    def write_config(self) -> None:
        super().write_config()
        # After the Include of the gateway's snippet: a Component line opens a new section.
        with self.config_path.open("a") as config:
            config.write(
                f'\nComponent "{MODULE_DOMAIN}"\n    component_secret = "{COMPONENT_SECRET}"\n'
            )


class ModuleKamailio:
    """Kamailio running the anchor's config: registrar for sip.test and the xmpp module as
    component ``MODULE_DOMAIN`` of the XMPP server at ``component_port``."""

    def __init__(self, anchor: Anchor, component_port: int) -> None:
        self.anchor = anchor
        self.host = LOOPBACK
        self.port = free_port()
        self.component_port = component_port
        self.process = ServerProcess("kamailio-xmpp")

    @property
    def uri(self) -> str:
        """Where its SIP side listens (UDP and TCP)."""
        return f"sip:{self.host}:{self.port}"

    @property
    def peer(self) -> Peer:
        """Its SIP address over UDP, to send requests straight to it."""
        return Peer("udp", self.host, self.port)

    def command(self) -> list[str]:
        """The foreground command line: the fixed module first on the module path."""
        run = self.process.dir / "run"
        run.mkdir(exist_ok=True)
        defines = {
            "SIP_PORT": str(self.port),
            "XMPP_PORT": str(self.component_port),
            "XMPP_SECRET": f'"{COMPONENT_SECRET}"',
            "GW_DOMAIN": f'"{MODULE_DOMAIN}"',
            # XMPP -> SIP requests come back to this Kamailio, which looks the user up.
            "OUTBOUND_PROXY": f'"{self.uri}"',
        }
        argv = [
            "kamailio",
            "-f",
            str(self.anchor.config),
            "-L",
            f"{self.anchor.module_dir}:{MODULE_DIR}",
            "-DD",
            "-E",
            "-m",
            str(SHM_MB),
            "-Y",
            str(run),
            "-P",
            str(self.process.dir / "kamailio.pid"),
        ]
        for name, value in defines.items():
            argv += ["-A", f"{name}={value}"]
        return argv

    def start(self) -> None:
        """Start it and wait until its SIP listener accepts (the XMPP link comes up after)."""
        proc = self.process.spawn(self.command())
        wait_for_port(self.port, 30.0, proc)

    def close(self) -> None:
        """Stop all its processes and remove its temp dir."""
        self.process.close()

    def log_tail(self, lines: int = 20) -> str:
        """The end of its output, for a report of why it did not work."""
        return self.process.log_tail(lines)
