"""Scoping liblsl's discovery before pylsl loads (RIGS.md: tests and demos stay on loopback).

liblsl reads its configuration once, when the library loads, from the file named by LSLAPICFG.
`configure_lsl` must therefore run before the first `import pylsl`; `import_pylsl` does both.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from pathlib import Path
from types import ModuleType

from rtnf.errors import RtnfError

# rig.lsl.session_id's default: every rtnf process on a machine (the simulated rig, `rtnf run`,
# a receiver) uses it, so they see each other's streams.
DEFAULT_SESSION_ID = "rtnf"
LOOPBACK_CONFIG = """\
[ports]
IPv6 = disable
[multicast]
ResolveScope = machine
AddressesOverride = {{127.0.0.1}}
TTLOverride = 0
[lab]
KnownPeers = {{127.0.0.1}}
SessionID = {session_id}
[log]
level = -1
"""


def loopback_config_text(session_id: str = "") -> str:
    """A liblsl config that keeps discovery on this machine (no broadcast or multicast) and
    logs only warnings and errors; an empty `session_id` gets a fresh one (seen by no other
    process)."""
    return LOOPBACK_CONFIG.format(session_id=session_id or f"rtnf-{uuid.uuid4().hex[:12]}")


def configure_lsl(setting: str = "loopback", session_id: str = DEFAULT_SESSION_ID) -> str | None:
    """Point LSLAPICFG at the configuration named by `setting`; return the file used.

    `loopback`: a loopback-only file (written once per process unless LSLAPICFG already names
    one); `system`: leave liblsl's own configuration alone; otherwise a path to a config file.
    """
    if setting == "system":
        return os.environ.get("LSLAPICFG")
    if setting == "loopback":
        current = os.environ.get("LSLAPICFG")
        if current and Path(current).is_file() and "ResolveScope = machine" in Path(current).read_text():
            return current
        path = Path(tempfile.gettempdir()) / f"rtnf-lsl-loopback-{os.getpid()}.cfg"
        path.write_text(loopback_config_text(session_id))
    else:
        path = Path(setting).expanduser()
        if not path.is_file():
            raise RtnfError(f"rig.lsl.config = {setting!r}: no such liblsl config file")
    if "pylsl" in sys.modules and os.environ.get("LSLAPICFG") != str(path):
        raise RtnfError("pylsl was imported before rtnf configured LSL discovery; "
                        "import rtnf.stream.lslconfig first")
    os.environ["LSLAPICFG"] = str(path)
    return str(path)


def import_pylsl(setting: str = "loopback", session_id: str = DEFAULT_SESSION_ID) -> ModuleType:
    """Configure discovery, then import pylsl (with a clear error if liblsl is missing)."""
    configure_lsl(setting, session_id)
    try:
        import pylsl
    except (ImportError, RuntimeError) as exc:
        raise RtnfError(f"pylsl cannot load liblsl ({exc}); install pylsl>=1.18 (its wheel ships "
                        "liblsl on x86_64 glibc>=2.35) or set PYLSL_LIB to liblsl's path") from None
    return pylsl
