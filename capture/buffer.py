"""The bounded hand-over between the audio thread and the publisher thread.

The audio side only ever ``push``es (constant time, never waits on the network). The publisher
``take``s a batch, which stays *in flight* (still counted against the capacity) until it
``commit``s it after Redis confirmed the write; a failed write is retried with the same batch.

When full, the **oldest waiting** frame is dropped: after an outage the freshest audio is what
a listener still cares about, and the stream shows one contiguous gap instead of a gap at the end.
In-flight frames are never dropped (they may already be in Redis), so the drop count stays exact.
"""

from __future__ import annotations

import threading
from collections import deque

from capture.contract import AudioFrame


class FrameBuffer:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            msg = "capacity must be at least 1 frame"
            raise ValueError(msg)
        self.capacity = capacity
        # A batch may hold at most a quarter of the capacity, so a full buffer always has a
        # waiting frame to drop and the newest audio always gets in.
        self.max_batch = max(1, capacity // 4)
        self._waiting: deque[AudioFrame] = deque()
        self._inflight: list[AudioFrame] = []
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0
        """Frames dropped because the buffer was full, since start."""
        self.high_water = 0
        """The most frames ever held at once."""

    def __len__(self) -> int:
        with self._cond:
            return len(self._waiting) + len(self._inflight)

    @property
    def full(self) -> bool:
        return len(self) >= self.capacity

    @property
    def closed(self) -> bool:
        return self._closed

    def push(self, frame: AudioFrame) -> int:
        """Add ``frame``; returns how many frames were dropped to make room (0 or 1)."""
        with self._cond:
            dropped = 0
            if len(self._waiting) + len(self._inflight) >= self.capacity:
                if self._waiting:
                    self._waiting.popleft()
                    dropped = 1
                else:  # only if capacity < 4: everything is in flight, the new frame goes
                    self.dropped += 1
                    return 1
            self._waiting.append(frame)
            self.dropped += dropped
            self.high_water = max(self.high_water, len(self._waiting) + len(self._inflight))
            self._cond.notify_all()
            return dropped

    def take(self, max_frames: int, timeout: float) -> list[AudioFrame]:
        """The batch in flight, else up to ``max_frames`` waiting ones (waits up to ``timeout``).

        The returned frames stay in the buffer until ``commit``.
        """
        with self._cond:
            if not self._inflight:
                if not self._waiting and not self._closed:
                    self._cond.wait(timeout)
                count = min(max_frames, self.max_batch, len(self._waiting))
                self._inflight = [self._waiting.popleft() for _ in range(count)]
            return list(self._inflight)

    def commit(self, count: int | None = None) -> int:
        """Forget the first ``count`` in-flight frames (all by default): Redis has them."""
        with self._cond:
            count = len(self._inflight) if count is None else min(count, len(self._inflight))
            del self._inflight[:count]
            self._cond.notify_all()
            return count

    def close(self) -> None:
        """No more frames will come; wakes a waiting ``take``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def discard_all(self) -> int:
        """Empty the buffer (shutdown ran out of time); returns how many frames were lost."""
        with self._cond:
            count = len(self._waiting) + len(self._inflight)
            self._waiting.clear()
            self._inflight.clear()
            return count
