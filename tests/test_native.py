"""The compiled SIP stack and hot modules (scripts/build_native.py) are used only while the build
matches the sources."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import sipside

REPO = Path(__file__).resolve().parents[1]


def _run(cwd: Path, code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "SIPXMPP_PURE"}
    environ["PYTHONPATH"] = str(cwd)
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def _copy_sources(tmp_path: Path) -> Path:
    """A checkout holding the compiled modules' sources only, and a build directory of our
    making."""
    shutil.copytree(REPO / "sipside", tmp_path / "sipside", ignore=shutil.ignore_patterns("*.so"))
    for name in sipside.HOT_MODULES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tmp_path / name)
    (tmp_path / "build" / "native" / "sipside").mkdir(parents=True)
    return tmp_path


WHERE = "import sipside, sipside.peer as m; print(sipside.NATIVE, m.__file__)"


def test_a_build_stamped_for_other_sources_is_not_used(tmp_path: Path) -> None:
    root = _copy_sources(tmp_path)
    (root / "build" / "native" / "STAMP").write_text("0" * 64 + "\n")
    native, where = _run(root, WHERE).split()
    assert native == "False"
    assert where == str(root / "sipside" / "peer.py")


def test_a_matching_stamp_puts_the_build_first_and_an_edit_undoes_it(tmp_path: Path) -> None:
    root = _copy_sources(tmp_path)
    stamp = _run(root, "import sipside; print(sipside.source_stamp())")
    (root / "build" / "native" / "STAMP").write_text(stamp + "\n")
    # Nothing compiled there: the package path falls through to the sources, but says native.
    assert _run(root, WHERE).split()[0] == "True"
    assert _run(root, WHERE, SIPXMPP_PURE="1").split()[0] == "False"
    peer = root / "sipside" / "peer.py"
    original = peer.read_text()
    peer.write_text(original + "\n# edited\n")
    assert _run(root, WHERE).split()[0] == "False"
    peer.write_text(original)
    assert _run(root, WHERE).split()[0] == "True"
    hot = root / "component" / "values.py"  # one of the gateway's modules compiled with them
    hot.write_text(hot.read_text() + "\n# edited\n")
    assert _run(root, WHERE).split()[0] == "False"


def test_the_build_setup_made_is_what_the_gateway_imports() -> None:
    # scripts/setup builds it (gcc is one of its packages); the stamp must match these sources,
    # and a process without SIPXMPP_PURE (as the gateway runs) imports the compiled modules.
    assert sipside.STAMP_FILE.read_text().strip() == sipside.source_stamp(), (
        "build/native does not match the sources: run python3 scripts/build_native.py"
    )
    out = _run(
        REPO,
        "import sipside.message as m, sipside.endpoint as e, component.sip.gate as g, "
        "component.settings as s; print(m.__file__, e.__file__, g.__file__, s.__file__)",
    )
    *compiled, settings = out.split()
    assert settings == str(REPO / "component" / "settings.py")  # not one of the hot modules
    for path in compiled:
        assert path.startswith(str(sipside.NATIVE_DIR)) and path.endswith(".so")
