"""A ZeroMQ SUB socket for publishers rtnf does not trust, bounded in messages and in bytes.

- ZMQ_MAXMSGSIZE: a message part over `max_message_bytes` is dropped by ZeroMQ before it is
  read into memory, so a flood of huge messages costs none. libzmq then drops the connection to
  that publisher and does not reconnect by itself (a protocol error), so the subscriber watches
  its socket's events and re-attaches (disconnect + connect) when a connection drops (counted in
  `dropped_connections`; messages sent until it is back are lost, as with any PUB/SUB gap).
- A reader thread moves every message out of ZeroMQ as it arrives into the subscriber's own
  queue (`rtnf.stream.handover.HandOver`): at most `max_queued_messages` messages and
  `max_queued_bytes` bytes (the parts' lengths; `QUEUE_BYTES`, 64 MiB, by default). A message
  that does not fit is dropped and counted in `rejected` (`QUEUE_FULL`), never fatal.
- ZMQ_RCVHWM: ZeroMQ's own queue holds at most max_queued_bytes // max_message_bytes messages,
  so it too holds at most max_queued_bytes in single-part messages; beyond it ZeroMQ stops
  reading the connection (TCP holds the rest, then the publisher drops). ZeroMQ bounds each part
  of a message, not their number.
So a subscriber holds at most about twice max_queued_bytes, whatever its publishers send. The
sources (`ZmqSource`, `OpenEphysSource`) poll it and decode what it receives.
"""

from __future__ import annotations

import threading
from collections import Counter

import zmq

from rtnf.errors import RtnfError
from rtnf.stream.handover import QUEUE_FULL, HandOver

QUEUE_BYTES = 64 << 20  # what one subscriber's own queue may hold (ZeroMQ's holds as much again)
READ_WAIT_S = 0.05  # the reader thread's longest wait, so it notices a close promptly


class Subscriber:
    """One SUB socket, read by a thread of its own into a bounded queue (see the module)."""

    def __init__(self, address: str, topics: list[bytes], max_message_bytes: int,
                 max_queued_messages: int, context: zmq.Context | None = None, *,
                 max_queued_bytes: int = QUEUE_BYTES, rejected: Counter | None = None):
        """Connects to `address` for `topics` and starts reading; messages dropped because the
        queue is full are counted in `rejected` (the subscriber's own counter if None)."""
        if max_message_bytes > max_queued_bytes:
            raise RtnfError(f"ZeroMQ source {address}: messages of up to {max_message_bytes} "
                            f"bytes (realtime.max_message_bytes) do not fit its queue of "
                            f"{max_queued_bytes} bytes")
        self.address, self.dropped_connections = address, 0
        self.rejected = Counter() if rejected is None else rejected
        self.queue: HandOver[list[bytes]] = HandOver(max_queued_messages, max_queued_bytes)
        self.socket = (context or zmq.Context.instance()).socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, max_queued_bytes // max_message_bytes)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        for topic in topics:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic)
        self.events = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.socket.connect(address)
        # From here on only the reader thread touches the sockets, until `close` has joined it.
        self.stopping = threading.Event()
        self.reader = threading.Thread(target=self._read, name=f"rtnf-zmq:{address}",
                                       daemon=True)
        self.reader.start()

    def poll(self, timeout: float) -> bool:
        """Whether a message is waiting (after at most `timeout` seconds)."""
        return self.queue.wait(timeout)

    def receive(self) -> list[bytes] | None:
        """The next message's parts, or None when none is waiting."""
        taken = self.queue.take(1)
        return taken[0] if taken else None

    def close(self) -> None:
        self.stopping.set()
        self.reader.join()
        self.socket.disable_monitor()
        self.events.close(linger=0)
        self.socket.close(linger=0)

    def _read(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.events, zmq.POLLIN)
        while not self.stopping.is_set():
            ready = dict(poller.poll(READ_WAIT_S * 1000))
            if self.events in ready:
                self._reattach()
            if self.socket in ready:
                self._drain()

    def _reattach(self) -> None:
        """Connect again after a connection dropped (libzmq does not after a protocol error)."""
        while self.events.poll(0):
            self.events.recv_multipart()
        self.dropped_connections += 1
        self.socket.disconnect(self.address)
        self.socket.connect(self.address)

    def _drain(self) -> None:
        """Move what ZeroMQ holds into the queue; a message that does not fit is counted."""
        while not self.stopping.is_set():
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not self.queue.put(parts, sum(len(part) for part in parts)):
                self.rejected[QUEUE_FULL] += 1
