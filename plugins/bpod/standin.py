"""A Bpod stand-in: receives rtnf's soft codes and prints each one with a timestamp.

For trying the closed loop without a state machine (plugins/bpod/README.md). It stands in for
both of rtnf's Bpod outputs at once:

- the App serial port (outputs.bpod.serial_port): a pseudo-terminal whose name is also linked at
  --app-link (default /tmp/rtnf-bpod-app), so rtnf can be started with
  `--set outputs.bpod.serial_port=/tmp/rtnf-bpod-app`; each byte n is printed as the event the
  state machine would raise, APP_SoftCode<n> (POSIX only: ptys do not exist on Windows);
- pybpod's net_port (outputs.bpod.net_port): a UDP socket on --host:--udp-port (default
  127.0.0.1:36000); each datagram is read as pybpod-api's Bpod.handle_inline does (stripped text,
  `SoftCode<k>` -> soft code int(last character) - 1) and printed with the event that pybpod's
  state machine would see, 'SoftCode<k>'.

    python plugins/bpod/standin.py [--udp-port 36000] [--app-link /tmp/rtnf-bpod-app] [--json]
                                   [--no-udp | --no-app-port] [--seconds S]

Lines look like `12:03:04.512 app-port byte 1 -> APP_SoftCode1 (running)`; with --json each
line is one JSON object: {"t": unix time, "via": "app-port" | "udp", "soft_code": n,
"event": name, "command": name or null, "raw": bytes as text}. The first line says where it
listens ({"ready": ...} with --json). Ctrl-C (or --seconds) stops it and removes the link.

A pty carries no modem lines on Linux, so the stand-in cannot show rtnf's DTR; a real App port
(USB CDC-ACM) does, and rtnf asserts DTR when it opens the port (plugins/bpod/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# What rtnf-bpod.yaml's rule sends, to label the codes (any other code is printed unlabelled).
COMMANDS = {1: "running", 2: "resting"}


def stamp(now: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"


def udp_event(datagram: bytes) -> tuple[int | None, str | None]:
    """(soft code pybpod triggers, event its state machine sees) for a datagram, as pybpod-api's
    handle_inline reads it; (None, None) for anything that is not `SoftCode<k>`, k = 1..9."""
    text = datagram.decode(errors="replace").strip()
    if not text.startswith("SoftCode") or not text[-1:].isdigit() or text[-1] == "0":
        return None, None
    k = int(text[-1])
    return k - 1, f"SoftCode{k}"


class Printer:
    def __init__(self, as_json: bool):
        self.as_json = as_json

    def ready(self, listening: dict[str, str]) -> None:
        if self.as_json:
            print(json.dumps({"ready": listening}), flush=True)
        else:
            for what, where in listening.items():
                print(f"Bpod stand-in: {what} on {where}", flush=True)

    def code(self, now: float, via: str, code: int | None, event: str | None, raw: bytes,
             command: str | None) -> None:
        if self.as_json:
            print(json.dumps({"t": now, "via": via, "soft_code": code, "event": event,
                              "command": command, "raw": raw.decode(errors="replace")}),
                  flush=True)
        elif event is None:
            print(f"{stamp(now)} {via} {raw!r} ignored (not SoftCode1..SoftCode9)", flush=True)
        else:
            label = f" ({command})" if command else ""
            detail = f"byte {code}" if via == "app-port" else f"{raw.decode()!r} -> soft code {code}"
            print(f"{stamp(now)} {via} {detail} -> {event}{label}", flush=True)


def open_app_port(link: Path) -> tuple[int, int, str]:
    """A pty in raw mode, its slave's name linked at `link`: (master fd, slave fd, slave name).
    The slave stays open here so the master never reads EIO while rtnf reopens the port."""
    import tty

    master, slave = os.openpty()
    tty.setraw(master)
    name = os.ttyname(slave)
    if link.is_symlink() or link.exists():
        if not link.is_symlink():
            raise SystemExit(f"{link} exists and is not a link: choose another --app-link")
        link.unlink()
    link.symlink_to(name)
    return master, slave, name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="UDP address to bind")
    parser.add_argument("--udp-port", type=int, default=36000,
                        help="UDP port (rtnf's outputs.bpod.net_port); 0: any free port")
    parser.add_argument("--no-udp", action="store_true", help="App port only")
    parser.add_argument("--app-link", type=Path, default=Path("/tmp/rtnf-bpod-app"),
                        help="where to link the pty standing in for the App port "
                             "(rtnf's outputs.bpod.serial_port)")
    parser.add_argument("--no-app-port", action="store_true", help="UDP only")
    parser.add_argument("--seconds", type=float, help="stop after this long (default: Ctrl-C)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)

    printer = Printer(args.json)

    def stop(signum, frame):  # Ctrl-C and SIGTERM (also when started in the background)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    selector = selectors.DefaultSelector()
    listening: dict[str, str] = {}
    app = udp = None
    try:
        if not args.no_app_port and os.name == "posix":
            app = open_app_port(args.app_link)
            selector.register(app[0], selectors.EVENT_READ, "app-port")
            listening["app-port"] = f"{args.app_link} -> {app[2]}"
        if not args.no_udp:
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((args.host, args.udp_port))
            udp.setblocking(False)
            selector.register(udp, selectors.EVENT_READ, "udp")
            listening["udp"] = f"{args.host}:{udp.getsockname()[1]}"
        if not listening:
            parser.error("nothing to listen on: leave UDP or the App port (POSIX) on")
        printer.ready(listening)
        deadline = None if args.seconds is None else time.monotonic() + args.seconds
        while deadline is None or time.monotonic() < deadline:
            wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
            for key, _ in selector.select(wait):
                now = time.time()
                if key.data == "app-port":
                    for byte in os.read(app[0], 256):
                        printer.code(now, "app-port", byte, f"APP_SoftCode{byte}",
                                     bytes([byte]), COMMANDS.get(byte))
                else:
                    datagram = udp.recv(64)  # pybpod reads at most 64 bytes per datagram
                    code, event = udp_event(datagram)
                    command = COMMANDS.get(code + 1) if code is not None else None
                    printer.code(now, "udp", code, event, datagram, command)
    except KeyboardInterrupt:
        pass
    finally:
        selector.close()
        if app is not None:
            os.close(app[0])
            os.close(app[1])
            with contextlib.suppress(OSError):
                if args.app_link.is_symlink() and os.readlink(args.app_link) == app[2]:
                    args.app_link.unlink()
        if udp is not None:
            udp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
