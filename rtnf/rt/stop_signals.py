"""SIGINT and SIGTERM as a request to stop: `with stop_on_signals(event):` sets `event` instead
of killing the process, so whatever waits on it can finish cleanly (final flush, summary).

The handler does not call `event.set()` itself. Python runs a signal handler in the main thread
between two bytecodes, possibly while that thread is inside `event.wait()` and holds the
event's lock, which is not reentrant: `set()` would wait for it forever (this hung `rtnf run`
once). The handler starts a short-lived thread that sets the event as soon as the lock is free.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM set `stop`; the previous handlers are restored on
    leaving it. Only in the main thread, where Python delivers signals (elsewhere: no effect)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def request_stop(*_: object) -> None:
        threading.Thread(target=stop.set, name="rtnf-stop", daemon=True).start()

    for sig in STOP_SIGNALS:
        signal.signal(sig, request_stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
