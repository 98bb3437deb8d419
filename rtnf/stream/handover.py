"""The queue through which a source's reader thread hands what it read over to `poll`.

A source that reads on a thread of its own (each LSL inlet's reader, each ZeroMQ subscriber's)
puts what it read into a `HandOver`, bounded in items and in bytes: the reader never blocks,
and whatever would exceed either bound is refused, for the reader to drop and count under
`QUEUE_FULL` in the source's `rejected` counter. So the memory waiting for the loop never
exceeds `max_bytes` (as the reader measures its items), however fast the input arrives or
however long the loop stops reading.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

QUEUE_FULL = "queue full (not read in time)"  # the reason dropped input is counted under

Item = TypeVar("Item")


class HandOver(Generic[Item]):
    """A thread-safe FIFO of at most `max_items` items and `max_bytes` bytes."""

    def __init__(self, max_items: int, max_bytes: int):
        self.max_items, self.max_bytes = max_items, max_bytes
        self.queued_bytes = 0  # the sizes of the items waiting, as given to `put`
        self._items: deque[tuple[Item, int]] = deque()
        self._changed = threading.Condition()

    def put(self, item: Item, size: int) -> bool:
        """Queue `item` of `size` bytes, unless either bound would be exceeded (False)."""
        with self._changed:
            if len(self._items) >= self.max_items or self.queued_bytes + size > self.max_bytes:
                return False
            self._items.append((item, size))
            self.queued_bytes += size
            self._changed.notify()
        return True

    def wait(self, timeout: float) -> bool:
        """Whether an item is waiting, after at most `timeout` seconds."""
        with self._changed:
            return bool(self._changed.wait_for(lambda: self._items, timeout))

    def take(self, limit: int) -> list[Item]:
        """Up to `limit` items, oldest first, without waiting."""
        with self._changed:
            taken = [self._items.popleft() for _ in range(min(limit, len(self._items)))]
            self.queued_bytes -= sum(size for _, size in taken)
        return [item for item, _ in taken]
