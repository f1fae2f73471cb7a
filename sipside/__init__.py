"""SIP side: an asyncio SIP SIMPLE stack. Knows nothing of XMPP.

Its modules may also run compiled: ``scripts/build_native.py`` compiles them with mypyc (from
PyPI, with the test extras) into ``build/native/`` and stamps the build with a hash of these
sources. When the stamp matches the sources as they are now, the compiled modules are imported
instead of these files (``NATIVE`` says which); after any edit the stamp no longer matches
and the pure-Python modules are used until the next build, so a stale build never runs.
``SIPXMPP_PURE=1`` in the environment forces the pure-Python modules.

The same build compiles the gateway's modules on the SIP -> XMPP chat path (``HOT_MODULES``),
with the stack, so that calls between them are native too. This package knows them only as
files to compile and to import compiled: a finder on ``sys.meta_path`` (installed here, and
``component`` imports this package before any module of its own) loads their build.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parent
NATIVE_DIR = ROOT / "build" / "native"
STAMP_FILE = NATIVE_DIR / "STAMP"

# The gateway's modules a chat message runs through each way (bench.gateway_path, bench.xmpp_in)
# and a status change to SIP watchers (bench.presence_fanout), relative to the checkout.
# Compiled, a module may not bind one name to two exception types in one function, and a
# generic class may not be a dataclass (mypyc); the tests run both ways.
HOT_MODULES = (
    "component/addresses.py",
    "component/http/metrics.py",
    "component/messaging/conversations.py",
    "component/messaging/notifications.py",
    "component/messaging/retry.py",
    "component/messaging/router.py",
    "component/presence/core.py",
    "component/presence/sip_watches_xmpp.py",
    "component/ratelimit.py",
    "component/rooms/core.py",
    "component/runtime/presence_driver.py",
    "component/runtime/rooms_driver.py",
    "component/sip/answers.py",
    "component/sip/bodies.py",
    "component/sip/deadlines.py",
    "component/sip/gate.py",
    "component/sip/sender.py",
    "component/sip/side.py",
    "component/sip/transactions.py",
    "component/sip/watch_dialogs.py",
    "component/transports/board.py",
    "component/transports/service.py",
    "component/values.py",
    "component/xmpp/acks.py",
    "component/xmpp/confirm.py",
    "component/xmpp/link.py",
    "component/xmpp/stanzas.py",
    "component/xmpp/stream.py",
)


def compiled_sources() -> list[Path]:
    """The modules a native build compiles: every module of this package but this one, and
    the gateway's hot modules."""
    own = sorted(path for path in _HERE.glob("*.py") if path.name != "__init__.py")
    return own + [ROOT / name for name in HOT_MODULES]


def source_stamp() -> str:
    """What a native build of the sources as they are now is stamped with."""
    digest = hashlib.sha256(sys.version.encode())
    for path in compiled_sources():
        name = path.relative_to(ROOT).as_posix()
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


class _HotModuleFinder:
    """Finds the build of each hot module under NATIVE_DIR; None (the sources) where absent."""

    def __init__(self) -> None:
        suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        self.built = {
            name.removesuffix(".py").replace("/", "."): NATIVE_DIR / name.replace(".py", suffix)
            for name in HOT_MODULES
        }

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        built = self.built.get(fullname)
        if built is None or not built.exists():
            return None
        return importlib.util.spec_from_file_location(fullname, built)


def _native_build_matches() -> bool:
    if os.environ.get("SIPXMPP_PURE"):
        return False
    try:
        stamp = STAMP_FILE.read_text().strip()
    except OSError:
        return False
    return stamp == source_stamp()


NATIVE = _native_build_matches()
if NATIVE:
    # The compiled modules are found first; their shared runtime is a top-level module.
    sys.modules[__name__].__path__.insert(0, str(NATIVE_DIR / "sipside"))
    sys.path.append(str(NATIVE_DIR))
    sys.meta_path.insert(0, _HotModuleFinder())
