"""A ZeroMQ SUB socket for publishers rtnf does not trust: bounded in ZeroMQ itself.

- ZMQ_MAXMSGSIZE: a message part over the limit is dropped by ZeroMQ before it is read into
  memory, so a flood of huge messages costs none. libzmq then drops the connection to that
  publisher and does not reconnect by itself (a protocol error), so the subscriber watches its
  socket's events and re-attaches (disconnect + connect) when a connection drops (counted in
  `dropped_connections`; messages sent until it is back are lost, as with any PUB/SUB gap).
- RCVHWM: at most `high_water_mark` messages wait in ZeroMQ's queue.
The sources (`ZmqSource`, `OpenEphysSource`) poll it and decode what it receives.
"""

from __future__ import annotations

import zmq

class Subscriber:
    def __init__(self, address: str, topics: list[bytes], max_message_bytes: int,
                 high_water_mark: int, context: zmq.Context | None = None):
        self.address, self.dropped_connections = address, 0
        self.socket = (context or zmq.Context.instance()).socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, high_water_mark)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        for topic in topics:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic)
        self.events = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.socket.connect(address)

    def poll(self, timeout: float) -> bool:
        """Whether a message is waiting (after at most `timeout` seconds); re-attaches first if
        the connection dropped."""
        dropped = False
        while self.events.poll(0):
            self.events.recv_multipart()
            dropped = True
        if dropped:
            self.dropped_connections += 1
            self.socket.disconnect(self.address)
            self.socket.connect(self.address)
        return bool(self.socket.poll(int(timeout * 1000)))

    def receive(self) -> list[bytes] | None:
        """The next message's parts, or None when none is waiting."""
        try:
            return self.socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None

    def close(self) -> None:
        self.socket.disable_monitor()
        self.events.close(linger=0)
        self.socket.close(linger=0)
