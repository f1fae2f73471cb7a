"""The installed package works without the checkout: README "Running it", as an operator does.

The wheel is built from a clean copy of the source tree and installed into a fresh virtualenv
outside the checkout; `sipxmpp check-config`, `db upgrade` and `run` then run from a directory
of their own against a real Prosody. The rest of the suite imports the editable install, which
finds files next to the checkout that a wheel would not ship.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.jid import JID

from tests.harness.ports import free_port
from tests.harness.values import COMPONENT_DOMAIN, COMPONENT_SECRET, LOOPBACK, REPO_ROOT
from tests.harness.xmppclient import XmppClient
from tests.harness.xmppserver import XmppServer

pytestmark = pytest.mark.slow

# Everything a build must not see: local state and earlier builds (setuptools reuses build/).
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".*_cache",
    ".hypothesis",
    "*.db",
    "*.log",
)


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 180) -> str:
    result = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{argv[:4]} exited {result.returncode}:\n{result.stderr}"
    return result.stdout


def _installed(tmp_path: Path, env: dict[str, str]) -> Path:
    """Build the wheel, install it into a new virtualenv, and return the venv's bin directory."""
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT, source, ignore=_NOT_SOURCE)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    # Isolated build: pip fetches the build-system requirements (setuptools) from the index.
    _run([*pip, "wheel", "--no-deps", "--wheel-dir", str(wheels), str(source)], tmp_path, env)
    (wheel,) = wheels.glob("sipxmpp-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    # The dependencies come from this interpreter's site directories, through a .pth file
    # rather than --system-site-packages: the latter would also run the editable install's
    # import hook, which serves any module the wheel lacks from the checkout.
    site_dirs = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = _run([str(python), "-c", where], tmp_path, env).strip()
    Path(purelib, "_dependencies.pth").write_text("\n".join(site_dirs) + "\n")
    # --force-reinstall: this interpreter's editable install has the same name and version.
    install = ["install", "--no-deps", "--no-index", "--force-reinstall", str(wheel)]
    _run([*pip, "--python", str(python), *install], tmp_path, env)
    shown = _run([str(python), "-c", "import component; print(component.__file__)"], tmp_path, env)
    assert Path(shown.strip()).is_relative_to(venv), shown
    return venv / "bin"


def _gateway_toml(xmpp: XmppServer, database: Path) -> str:
    port = free_port()
    return f"""\
[xmpp]
component = "{COMPONENT_DOMAIN}"
host = "{LOOPBACK}"
port = {xmpp.component_port}
secret = "{COMPONENT_SECRET}"

[sip]
listen = ["udp:{LOOPBACK}:{port}", "tcp:{LOOPBACK}:{port}"]
proxy = ""

[database]
url = "sqlite:///{database}"
"""


async def _component_identities(
    client: XmppClient, gateway: subprocess.Popen[bytes], log: Path, timeout: float
) -> set[tuple[str, str]]:
    """disco#info of the component domain, asked until the gateway's component answers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        assert gateway.poll() is None, (
            f"sipxmpp run exited {gateway.returncode}:\n{log.read_text()}"
        )
        try:
            info = await client.plugin["xep_0030"].get_info(jid=JID(COMPONENT_DOMAIN), timeout=5)
        except (IqError, IqTimeout):  # Prosody answers an error until the component is up
            assert loop.time() < deadline, f"no component answer:\n{log.read_text()}"
            await asyncio.sleep(0.2)
            continue
        return {(category, kind) for category, kind, *_ in info["disco_info"]["identities"]}


async def test_installed_wheel_checks_upgrades_and_runs(
    prosody: XmppServer, tmp_path: Path
) -> None:
    # Nothing from the test run may point the gateway back at the checkout or another database.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIPXMPP_", "PYTHON"))}
    sipxmpp = str(_installed(tmp_path, env) / "sipxmpp")
    workdir = tmp_path / "operator"
    workdir.mkdir()
    (workdir / "gateway.toml").write_text(_gateway_toml(prosody, workdir / "sipxmpp.db"))
    config = ["-c", "gateway.toml"]

    assert "config OK" in _run([sipxmpp, "check-config", *config], workdir, env)
    upgraded = _run([sipxmpp, "db", "upgrade", *config], workdir, env)
    assert "upgraded to head" in upgraded

    log = workdir / "gateway.log"
    with log.open("wb") as out:
        gateway = subprocess.Popen(
            [sipxmpp, "run", *config], cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        client = XmppClient(prosody.jid(f"operator{uuid.uuid4().hex[:8]}"), "pw", register=True)
        await client.start(prosody.c2s_port)
        try:
            identities = await _component_identities(client, gateway, log, timeout=30)
        finally:
            await client.stop()
        assert ("gateway", "sip") in identities
        gateway.send_signal(signal.SIGTERM)
        status = await asyncio.to_thread(gateway.wait, 30)
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()
    assert status == 0, log.read_text()
    assert "xmpp_link_up" in log.read_text()
